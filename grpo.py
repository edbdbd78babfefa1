"""GRPO's maths as pure functions on tensors (in the manner of EasyR1's core_algos.py).

Each takes tensors and returns tensors (plus a dict of metrics where it reports some) and each is
tested against hand-computed numbers in tests/test_grpo_core.py. train_grpo.py is the loop that
calls them.

Formulas (M is the response mask of a sequence, built from sampler lengths, never token values):

    advantage   A_i = (r_i - mean_g(r)) / (std_g(r) + eps)       per group g of one prompt's G samples
                std_g: Bessel (unbiased, divide by n-1) like EasyR1 and TRL; a group of one sample
                has std 0 and advantage 0. scale="batch": std over the whole batch; "none": Dr. GRPO.
    ratio       rho_t = exp(clamp(logp_t - old_logp_t, -20, 20))
    policy      l_t = -min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A)
                dual clip (A < 0, constant c > 1):  l_t = min(l_t, -c A)
    KL (k3)     kl_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1      ("low_var_kl"), loss += beta*kl
    aggregate   seq_mean:   (1/B) sum_i [sum_t l M / sum_t M]
                token_mean: sum l M / (response tokens of the whole optimizer step)
                dr_grpo:    sum l M / (B * max_completion_length)
    reward      r = r_acc + lambda_v * r_visual * [r_acc > 0] + lambda_f * r_format
                (AVAR eq. 4c, lambda_v = 0.3, lambda_f = 0.1; r_visual is the attention ratio
                 image/system of the response tokens over layers 0-7, zero for a wrong answer)
"""

import torch
from torch.utils.checkpoint import checkpoint


# ---------------------------------------------------------------------------------------------
# masks and small helpers
# ---------------------------------------------------------------------------------------------

def response_mask(lengths, T):
    """(B,) response lengths from the sampler -> (B, T) bool mask of the first `lengths[i]` tokens.

    The lengths include the stop token (<|im_end|>), which the policy must learn to emit. Never derive
    this mask from token values: in Qwen the pad token equals eos.
    """
    positions = torch.arange(T, device=lengths.device)  # (T,)
    return positions.unsqueeze(0) < lengths.unsqueeze(1)  # (B, T)


def masked_mean(x, mask):
    """Mean of x over the positions where mask is true (0 when the mask is empty)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


# ---------------------------------------------------------------------------------------------
# rewards and advantages
# ---------------------------------------------------------------------------------------------

def total_reward(acc, visual, fmt, lambda_v=0.3, lambda_f=0.1):
    """AVAR 4c: r = r_acc + lambda_v * r_visual * [r_acc > 0] + lambda_f * r_format.   all (N,)

    The visual term is gated by correctness here even if the caller already zeroed it: a wrong
    answer must never be paid for looking at the image. torch.where (not a multiply) so that a NaN
    visual score of a wrong answer (e.g. an empty response) cannot leak into the reward.
    """
    acc, visual, fmt = acc.float(), visual.float(), fmt.float()
    gated_visual = torch.where(acc > 0, visual, torch.zeros_like(visual))
    return acc + lambda_v * gated_visual + lambda_f * fmt  # (N,)


def group_advantages(rewards, group_ids, scale="group", eps=1e-6):
    """GRPO advantages A_i = (r_i - mean_g) / (std_g + eps), one scalar per sample.

    rewards: (N,) float, group_ids: (N,) long; samples with equal id form one group (a prompt's G
    rollouts); ids need not be contiguous or sorted.
    scale: "group" divides by the group's std, "batch" by the std of all N rewards (the mean is
    still the group's), "none" does not divide (Dr. GRPO).
    std convention: Bessel (unbiased, sum of squares / (n - 1)), as in EasyR1 and TRL. A group of a
    single sample has std defined as 0 (not NaN), so its advantage is 0. eps = 1e-6 as in EasyR1
    (TRL uses 1e-4).

    Returns adv (N,) float32 and metrics:
        zero_spread_frac: fraction of groups whose rewards are all equal (size-1 groups included);
                          they carry zero advantage and so no gradient;
        zero_spread_mask: (N,) bool, samples in such groups, so the caller can drop them;
        num_groups, reward_std (mean of the groups' std).
    """
    assert scale in ("group", "batch", "none"), scale
    r = rewards.float()  # (N,)
    uniq, g = torch.unique(group_ids, return_inverse=True)  # g: (N,) dense group index in [0, G)
    num_groups = uniq.numel()

    count = torch.zeros(num_groups, device=r.device).index_add_(0, g, torch.ones_like(r))  # (G,)
    mean = torch.zeros(num_groups, device=r.device).index_add_(0, g, r) / count  # (G,)
    centered = r - mean[g]  # (N,)
    sq = torch.zeros(num_groups, device=r.device).index_add_(0, g, centered * centered)  # (G,)
    std = torch.sqrt(sq / (count - 1).clamp(min=1.0))  # (G,) Bessel; a 1-sample group gets 0

    # "all rewards equal" tested exactly with max == min, not with std < tol
    gmax = torch.full((num_groups,), float("-inf"), device=r.device).scatter_reduce(0, g, r, "amax")
    gmin = torch.full((num_groups,), float("inf"), device=r.device).scatter_reduce(0, g, r, "amin")
    zero_spread = gmax == gmin  # (G,)

    if scale == "group":
        adv = centered / (std[g] + eps)
    elif scale == "batch":
        batch_std = r.std(correction=1) if r.numel() > 1 else r.new_zeros(())
        adv = centered / (batch_std + eps)
    else:
        adv = centered
    # centered is exactly 0 in a zero-spread group only up to rounding of the mean; make it exact
    adv = torch.where(zero_spread[g], torch.zeros_like(adv), adv)

    metrics = {
        "zero_spread_frac": zero_spread.float().mean().item() if num_groups else 0.0,
        "zero_spread_mask": zero_spread[g],  # (N,) bool
        "num_groups": num_groups,
        "reward_std": std.mean().item() if num_groups else 0.0,
    }
    return adv, metrics


# ---------------------------------------------------------------------------------------------
# log-probabilities
# ---------------------------------------------------------------------------------------------

def _chunk_logprobs(logits, targets, temperature, with_entropy):
    # logits (B, C, V) any dtype, targets (B, C) -> logp (B, C) float32 [, entropy (B, C) float32]
    x = logits.float() / temperature  # the only float32 copy: one chunk, not the whole sequence
    lse = torch.logsumexp(x, dim=-1)  # (B, C)
    logp = x.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    if not with_entropy:
        return logp
    # H = -sum p log p = lse - sum p x
    entropy = lse - (torch.softmax(x, dim=-1) * x).sum(-1)
    return logp, entropy


def token_logprobs(logits, targets, temperature=1.0, chunk_size=512, vocab_size=None,
                   return_entropy=False):
    """Per-token log pi(target) in float32, computed chunk by chunk over the sequence.

    logits: (B, T, V) in the model's dtype (bf16 is fine); logits[:, t] must already be the
    prediction for targets[:, t] (the caller does the shift by one).  targets: (B, T) long.
    temperature: the sampling temperature; the training forward must divide by the same value
    as the sampler or the first update's ratio is not 1.
    vocab_size: if given, only logits[..., :vocab_size] are used (Qwen pads its embedding matrix
    past the tokenizer size; those ids can never be sampled).
    Returns logp (B, T) float32, and entropy (B, T) float32 of the tempered distribution if
    return_entropy.

    Why chunks: log-softmax in bf16 is too coarse for PPO ratios, but a float32 copy of (B, T, V)
    with V = 152k is several GB. Each chunk of `chunk_size` positions is upcast on its own; under
    autograd each chunk is checkpointed so its float32 copy is freed after the forward and rebuilt
    in the backward (the gradient w.r.t. logits, in the logits' dtype, is unavoidable).
    """
    if vocab_size is not None:
        logits = logits[..., :vocab_size]
    T = logits.shape[1]
    use_ckpt = torch.is_grad_enabled() and logits.requires_grad
    logps, entropies = [], []
    for s in range(0, T, chunk_size):
        lg, tg = logits[:, s:s + chunk_size], targets[:, s:s + chunk_size]
        if use_ckpt:
            out = checkpoint(_chunk_logprobs, lg, tg, temperature, return_entropy, use_reentrant=False)
        else:
            out = _chunk_logprobs(lg, tg, temperature, return_entropy)
        if return_entropy:
            logps.append(out[0])
            entropies.append(out[1])
        else:
            logps.append(out)
    logp = torch.cat(logps, dim=1)  # (B, T)
    if return_entropy:
        return logp, torch.cat(entropies, dim=1)
    return logp


# ---------------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------------

def policy_loss(logp, old_logp, advantages, mask, clip_low=0.2, clip_high=0.2, dual_clip=None):
    """Clipped surrogate (PPO/GRPO), per token.

    logp: (B, T) float32 with grad; old_logp: (B, T) from the no-grad pass before the first update
    on this rollout batch; advantages: (B,) (broadcast over tokens) or (B, T); mask: (B, T).
        ratio = exp(clamp(logp - old_logp, -20, 20))
        l     = -min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A)
        dual clip, for A < 0 only: l = min(l, -dual_clip * A)   (EasyR1: dual_clip = 3)
    Outside the clip region (A > 0 and ratio > 1 + clip_high, or A < 0 and ratio < 1 - clip_low)
    l is a constant and its gradient w.r.t. logp is 0. On the first update ratio == 1 exactly and
    l = -A: the loss value says nothing there, watch the reward.

    Returns per_token_loss (B, T) (not masked: pass it with the mask to `aggregate`) and metrics,
    0-dim detached tensors over the masked tokens: clip_frac (clipped term active), clip_frac_high,
    clip_frac_low, dual_clip_frac, ratio_mean, ratio_max, approx_kl (mean of old_logp - logp).
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)  # (B, 1) -> broadcast over T
    A = advantages.to(logp.dtype).expand_as(logp)  # (B, T)
    log_ratio = (logp - old_logp).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)  # (B, T)

    pg_unclipped = -A * ratio
    pg_clipped = -A * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(pg_unclipped, pg_clipped)  # -min(rA, clip(r)A)
    clipped = pg_clipped > pg_unclipped  # the constant (clipped) branch is the one taken

    if dual_clip is not None:
        assert dual_clip > 1.0, "dual clip constant must exceed 1"
        pg_dual = -dual_clip * A
        dual = (A < 0) & (per_token > pg_dual)
        per_token = torch.where(A < 0, torch.minimum(per_token, pg_dual), per_token)
    else:
        dual = torch.zeros_like(clipped)

    with torch.no_grad():
        m = mask.bool()
        metrics = {
            "clip_frac": masked_mean(clipped.float(), m),
            "clip_frac_high": masked_mean((clipped & (A > 0)).float(), m),
            "clip_frac_low": masked_mean((clipped & (A < 0)).float(), m),
            "dual_clip_frac": masked_mean(dual.float(), m),
            "ratio_mean": masked_mean(ratio.detach(), m),
            "ratio_max": torch.where(m, ratio.detach(), torch.zeros_like(ratio)).max(),
            "approx_kl": masked_mean(-log_ratio.detach(), m),
        }
    return per_token, metrics


def kl_k3(logp, ref_logp):
    """k3 estimator of KL(pi || pi_ref) per token ("low_var_kl" in EasyR1/verl).   (B, T) float32

        kl = exp(ref - logp) - (ref - logp) - 1     >= 0, and 0 exactly where pi == pi_ref
    The log ratio is clamped to +-20 before exp and kl to +-10 after, as in EasyR1.
    """
    log_ratio = (ref_logp.float() - logp.float()).clamp(-20.0, 20.0)
    kl = torch.exp(log_ratio) - log_ratio - 1.0
    return kl.clamp(-10.0, 10.0)


def aggregate(per_token, mask, mode="token_mean", total_tokens=None, num_seqs=None, max_len=None):
    """Reduce a (B, T) per-token loss to a scalar over the response mask (B, T).

        seq_mean:   sum_i [sum_t l M / sum_t M] / num_seqs          (num_seqs default B)
        token_mean: sum l M / total_tokens                          (total_tokens default sum M)
        dr_grpo:    sum l M / (num_seqs * max_len)                  (defaults B and T)

    Gradient accumulation: the normaliser must be that of the whole optimizer step, not of the
    micro-batch. Pass total_tokens = the step's response-token count (token_mean), or num_seqs = the
    step's sequence count (seq_mean, dr_grpo), and call backward on each micro-batch's loss as is
    (no further division by the number of micro-batches): the micro-batch losses then sum to the
    loss of one big batch, and so do their gradients. For dr_grpo pass max_len = the configured
    max_completion_length (constant), not the padded width of the micro-batch.
    Under DDP/FSDP the gradients are averaged over the W ranks: with global counts (all-reduced over
    ranks) multiply the loss by W, or equivalently pass the global count divided by W.
    A sequence with no response token contributes 0 to seq_mean.
    """
    m = mask.to(per_token.dtype)  # (B, T)
    masked_sum = per_token * m
    B, T = per_token.shape
    if mode == "seq_mean":
        per_seq = masked_sum.sum(-1) / m.sum(-1).clamp(min=1.0)  # (B,)
        return per_seq.sum() / (num_seqs if num_seqs is not None else B)
    if mode == "token_mean":
        denom = total_tokens if total_tokens is not None else m.sum().clamp(min=1.0)
        return masked_sum.sum() / denom
    if mode == "dr_grpo":
        n = num_seqs if num_seqs is not None else B
        L = max_len if max_len is not None else T
        return masked_sum.sum() / (n * L)
    raise ValueError(f"unknown aggregation mode {mode!r}")
