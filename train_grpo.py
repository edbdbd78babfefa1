"""A custom GRPO loop for Qwen2.5-VL with AVAR's visual-anchored reward shaping.

The file has two parts. The top is the RL algorithm as pure functions on tensors (in the manner of
EasyR1's core_algos.py): each takes tensors and returns tensors, plus a dict of metrics, and each
is tested against hand-computed numbers in tests/test_grpo_core.py. Below the marker
`# ---- rollout and training loop ----` sits the loop: sampling G completions per prompt, rewards,
the old/reference log-prob passes, and the optimizer steps.

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

Run:
    python train_grpo.py --data rl.jsonl --model DIR
    torchrun --nproc_per_node=8 train_grpo.py --data rl.jsonl --model DIR
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


# ---- rollout and training loop ----
#
# One step, for `--prompts-per-step` prompts shared out over the processes (each prompt and its G
# samples stay on one process, so a group never spans processes):
#
#   1. rollout    G samples per prompt with model.generate (KV cache; temperature, top-p; a seed made
#                 from (seed, step, rank); ids >= tokenizer size never drawn). Under FSDP the
#                 parameters are gathered once for the whole decode, so that processes whose
#                 samples stop at different lengths issue no per-token collectives.
#   2. rewards    r_acc = grade(extract_answer(text)), r_format = format_ok(text) (grading.py, the
#                 graders of the evaluation); r_visual = vas.visual_reward over the response rows of
#                 prompt + completion, computed for correct answers only; r = total_reward(...).
#   3. advantages group_advantages over the rewards of the whole step (all-gathered, so "batch"
#                 scaling and the zero-spread fraction are global).
#   4. update     --ppo-epochs optimizer steps on the rollout batch, each accumulating gradients over
#                 micro-batches; policy_loss against the log-probs of the policy that sampled
#                 (+ kl_coef * k3 to the frozen initial policy), aggregated with the step's global
#                 token / sequence counts.
#
# The sequence layout of every forward after the rollout (prompt left-padded, completion
# right-padded, so every completion starts at column Lp):
#
#       | pad pad p p p p | c c c c pad |      row 0
#       | p p p p p p p p | c c pad pad |      row 1
#         <---- Lp -----> <---- Lc --->
#
# The model computes M-RoPE positions over the non-padding tokens of each row, so completion token
# t sits at (last prompt position + 1 + t): what generate gave it (cache index + rope_delta). The
# logits of columns Lp-1 .. Lp+Lc-2 predict the completion; masks come from the sampler's lengths.
#
# Multi-process design: train_sft.py's (torchrun, RANK/WORLD_SIZE, gloo on CPU, FSDP2 units per
# vision block and decoder layer, bf16 compute with float32 master weights, atomic step_N
# checkpoints with a `latest` pointer, metrics.jsonl, NaN stop). Under FSDP every process must run
# the same number of forwards and backwards: where processes hold different numbers of
# micro-batches (correct answers for r_visual, --drop-zero-spread), the short ones run zero-weight
# dummy micro-batches.

import argparse  # noqa: E402
import contextlib  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch.distributed as dist  # noqa: E402

import evaluate  # noqa: E402
import grading  # noqa: E402
from data import (IMAGE_PLACEHOLDER, PAD_ROLE, RESPONSE, DataError, ImageProcessor, Tokenizer,  # noqa: E402
                  answer_text, encode_chat, epoch_batches, image_tokens, normalize_record, read_records)
from data import UserError, run_cli  # noqa: E402
from data import prompt_content  # noqa: E402


def build_parser():
    p = argparse.ArgumentParser(
        description="GRPO of Qwen2.5-VL with AVAR's visual-anchored reward shaping (arXiv 2603.03825, 4c)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # data
    p.add_argument("--data", default="toy/rl.jsonl",
                   help="prompts with gold answers, JSON lines or a .json array: {images, question (or EasyR1 problem), "
                        "answer, options?, answer_type?}")
    p.add_argument("--model", default="runs/sft",
                   help="initial policy: a Hugging Face folder, or a run folder whose `latest` names one (train_sft.py's --out)")
    p.add_argument("--out", default="runs/grpo", help="checkpoints, metrics.jsonl, run_config.json")
    p.add_argument("--max-prompt-len", type=int, default=2048,
                   help="prompts longer than this (image tokens included) are dropped and counted (released config: 2048)")
    p.add_argument("--skip-bad", action="store_true", help="drop invalid records (counted) instead of stopping")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="image resize bound; default: the model folder's preprocessor_config.json (as evaluate.py)")
    p.add_argument("--min-pixels", type=int, default=None, help="default: the model folder's preprocessor_config.json")
    # rollouts
    p.add_argument("--prompts-per-step", type=int, default=32,
                   help="prompts per rollout batch, all processes together (each sampled --group-size times)")
    p.add_argument("--group-size", type=int, default=8, help="samples per prompt, G (paper: 8, released config: 5)")
    p.add_argument("--max-new-tokens", type=int, default=256,
                   help="longest completion (released config: 2048; toy responses are < 200 tokens)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (> 0); the training "
                   "forward divides its logits by the same value")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1.0: the full distribution)")
    p.add_argument("--gen-batch", type=int, default=0,
                   help="sequences per generate call on one process (0: all of its prompts x G at once)")
    # rewards
    p.add_argument("--lambda-v", type=float, default=0.3, help="weight of r_visual (AVAR 4c); 0 disables it (no attention pass)")
    p.add_argument("--lambda-f", type=float, default=0.1, help="weight of r_format; 0 disables it")
    p.add_argument("--vas-layers", default="0-7", help="layers of r_visual, e.g. 0-7 or 0,2,4 (released config: 0-7)")
    p.add_argument("--vas-eps", type=float, default=1e-6, help="eps in the denominator of r_visual")
    p.add_argument("--visual-form", default="ratio", choices=["ratio", "share"],
                   help="r_visual per token: V / (S + eps) (the paper's) or V / (V + S + eps), bounded by 1 "
                        "(see vas.visual_reward)")
    # advantages and loss
    p.add_argument("--adv-scale", default="group", choices=["group", "batch", "none"],
                   help="divide centred rewards by the group's std, the batch's std, or nothing (Dr. GRPO)")
    p.add_argument("--adv-eps", type=float, default=1e-6, help="eps of the advantage denominator (EasyR1; TRL: 1e-4)")
    p.add_argument("--drop-zero-spread", action="store_true",
                   help="leave groups whose rewards are all equal (zero advantage) out of the update and its counts")
    p.add_argument("--ppo-epochs", type=int, default=1,
                   help="optimizer steps per rollout batch; with 1 the ratio is exactly 1 and the clip never fires")
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per training forward on one process")
    p.add_argument("--clip-low", type=float, default=0.2, help="ratio clip 1 - eps_low (all implementations: 0.2)")
    p.add_argument("--clip-high", type=float, default=0.3,
                   help="ratio clip 1 + eps_high (released AVAR config / EasyR1: 0.3; DAPO 0.28; TRL 0.2)")
    p.add_argument("--dual-clip", type=float, default=3.0,
                   help="dual-clip constant c for negative advantages (EasyR1: 3); 0 disables")
    p.add_argument("--kl-coef", type=float, default=0.0,
                   help="beta of the k3 KL to the frozen initial policy (paper: 0, released config: 1e-2); "
                        "0 loads no reference model")
    p.add_argument("--loss-agg", default="token_mean", choices=["token_mean", "seq_mean", "dr_grpo"],
                   help="token_mean: / response tokens of the step; seq_mean: mean of per-sequence means; "
                        "dr_grpo: / (sequences x --max-new-tokens)")
    p.add_argument("--logp-chunk", type=int, default=512, help="positions per float32 log-softmax chunk")
    # optimisation
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the prompts")
    p.add_argument("--max-steps", type=int, default=0, help="rollout steps; > 0 overrides --epochs")
    p.add_argument("--lr", type=float, default=1e-6, help="learning rate (paper and released config: 1e-6)")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW decay on matrices (EasyR1: 1e-2)")
    p.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.999))
    p.add_argument("--warmup-steps", type=int, default=0, help="linear warmup, then a constant lr (EasyR1)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max global gradient norm (0: no clipping)")
    p.add_argument("--freeze-vision", action="store_true", help="do not train the vision tower")
    # system
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                   help="compute dtype; auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--fsdp", action="store_true", help="FSDP2 even in one process (always on with several)")
    p.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing of decoder layers and vision blocks")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--seed", type=int, default=0, help="data order and the rollout seeds (seed, step, rank)")
    # checkpoints
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps (and at the end); 0: end only")
    p.add_argument("--keep-last", type=int, default=0, help="keep only the last N checkpoints (0: all)")
    p.add_argument("--save-dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="dtype of the saved weights; auto: the dtype the source config.json states")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue a run: bare --resume reads OUT/latest; or a step_N folder")
    p.add_argument("--checksum", action="store_true",
                   help="log a checksum of the full weights as every process sees them (param_checksums)")
    return p


RANK = 0


def print0(*a, **k):
    if RANK == 0:
        print(*a, **k, flush=True)


# ---------------------------------------------------------------------------------------------
# data: prompts with gold answers
# ---------------------------------------------------------------------------------------------

def _question_of(rec):
    """The text of a normalised record's single user turn, each image part written back as the
    `<image>` placeholder, so the images stay where the record put them (data.prompt_content)."""
    users = [m for m in rec.messages if m["role"] == "user"]
    if len(users) != 1:
        raise ValueError(f"an RL record holds one user turn (the question), not {len(users)}")
    parts = users[0]["content"]
    k = 0  # images that open the question ("<image>\nQ"): images first, then the question, as in evaluation
    while k < len(parts) and (parts[k]["type"] == "image" or not parts[k]["text"].strip()):
        k += 1
    n_lead = sum(p["type"] == "image" for p in parts[:k])
    rest = "".join(p["text"] if p["type"] == "text" else IMAGE_PLACEHOLDER for p in parts[k:])
    return IMAGE_PLACEHOLDER * n_lead + rest.strip()


class PromptDataset:
    """RL records: images (or none), a question, the gold answer; options and answer_type optional.

    The file (JSON lines or a JSON array) is read by data.read_records and data.normalize_record, the
    SFT reader (flat / EasyR1 form {"images", "question" or "problem", "answer" (a string or a
    number)}, also the chat forms with a top-level "answer"), so images, paths and errors follow
    SFT. Each record becomes an evaluate.py record, and `dataset[i]` is evaluate.encode_record of it:
    the default system turn, the images (where `<image>` placed them, else first), then
    data.build_prompt(record) (question, "A. ..." option lines, the answer instruction), then
    the assistant header. Train and eval prompts are so the same by construction. Prompts longer
    than max_prompt_len tokens are dropped and counted.
    """

    def __init__(self, path, tok, improc, max_prompt_len=None, skip_bad=False, max_errors=20):
        if not os.path.exists(path):
            raise DataError(f"{path}: data file does not exist")
        self.path, self.tok, self.improc = path, tok, improc
        self.records, self.lengths, self.where, errors = [], [], [], []
        self.stats = {"lines": 0, "kept": 0, "bad": 0, "too_long": 0, "with_images": 0, "text_only": 0}
        base = os.path.dirname(os.path.abspath(path))
        sizes = {}
        for where, obj, error in read_records(path):  # JSON lines or a JSON array
            self.stats["lines"] += 1
            try:
                if error is not None:
                    raise error
                rec = normalize_record(obj, base, where)
                if obj.get("answer") is None or answer_text(obj["answer"], "answer").strip() == "":
                    raise ValueError("no gold `answer`")
                answer = answer_text(obj["answer"], "answer")
                options = obj.get("options") or []
                if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
                    raise ValueError("`options` must be a list of strings")
                answer_type = obj.get("answer_type")
                if answer_type is not None and answer_type not in grading.ANSWER_TYPES:
                    raise ValueError(f"answer_type {answer_type!r} not in {grading.ANSWER_TYPES}")
                record = dict(id=str(obj.get("id", where)), question=_question_of(rec), options=options,
                              images=[Path(p) if isinstance(p, str) else p for p in rec.images],
                              image_placeholders=True, answer=answer.strip(),
                              answer_type=answer_type or ("multi_choice" if options else None),
                              benchmark=Path(path).stem)
                n_img = [self._image_tokens(p, sizes) for p in rec.images]
                length = len(encode_chat(tok, [{"role": "user", "content": prompt_content(record)}],
                                         n_img, add_generation_prompt=True)["input_ids"])
            except (ValueError, OSError) as e:
                self.stats["bad"] += 1
                errors.append(f"{where}: {e}")
                continue
            if max_prompt_len and length > max_prompt_len:
                self.stats["too_long"] += 1
                continue
            self.records.append(record)
            self.lengths.append(length)
            self.where.append(where)
        self.errors = errors
        self.stats["kept"] = len(self.records)
        self.stats["with_images"] = sum(bool(r["images"]) for r in self.records)
        self.stats["text_only"] = len(self.records) - self.stats["with_images"]
        if errors and not skip_bad:
            more = f"\n  ... and {len(errors) - max_errors} more" if len(errors) > max_errors else ""
            raise DataError(f"{path}: {len(errors)} invalid record(s) (--skip-bad drops them):\n  "
                            + "\n  ".join(errors[:max_errors]) + more)
        if not self.records:
            raise DataError(f"{path}: no usable records ({self.stats})")

    def _image_tokens(self, src, cache):
        if src not in cache:  # the header only: the size gives the token count
            cache[src] = image_tokens(src, self.improc)
        return cache[src]

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        """Record i encoded for generation: input_ids, roles (T,), pixel_values, image_grid_thw, record.
        An image that passed the header check but does not decode (a truncated file) raises
        DataError naming the line and the file."""
        try:
            enc = evaluate.encode_record(self.tok, self.improc, self.records[i])
        except evaluate.IMAGE_ERRORS as e:
            files = ", ".join(map(str, self.records[i]["images"]))
            raise DataError(f"{self.where[i]}: cannot decode image {files} ({e})") from None
        enc["record"] = self.records[i]
        return enc

    def summary(self):
        s = self.stats
        return (f"{self.path}: {s['kept']} prompts ({s['with_images']} with images, {s['text_only']} text-only)"
                f" of {s['lines']}; dropped {s['bad']} invalid, {s['too_long']} too long;"
                f" prompt tokens mean {sum(self.lengths) / len(self.lengths):.0f}, max {max(self.lengths)}")


def resolve_model_dir(path):
    """A Hugging Face folder as is; a run folder (train_sft.py's --out) through its `latest` file
    (model.resolve_checkpoint), resolved once so that the reference model of a resumed run is
    still the initial policy."""
    from model import resolve_checkpoint
    d = resolve_checkpoint(path)
    if not os.path.exists(os.path.join(d, "config.json")):
        raise UserError(f"--model {path}: neither a model folder (config.json) nor a run folder with `latest`"
                        " (train SFT first: python train_sft.py; or pass --model toy/model)")
    return d


# ---------------------------------------------------------------------------------------------
# rollouts
# ---------------------------------------------------------------------------------------------

@dataclass
class Rollout:
    """N = prompts x G sampled sequences of one process; a prompt's samples are consecutive."""
    prompts: list  # N 1-D LongTensors (shared between a prompt's samples)
    roles: list  # N 1-D role tensors of the prompts
    pixel_values: list  # N tensors (n_i, 1176) or None
    image_grid_thw: list  # N tensors (k_i, 3) or None
    records: list  # N evaluate.py records (gold answers)
    completions: torch.Tensor  # (N, max_new_tokens) sampled ids, pad after each row's end
    lengths: torch.Tensor  # (N,) completion lengths, the stop token included
    group_ids: torch.Tensor  # (N,) one exact id per prompt
    texts: list  # N decoded completions (special tokens dropped)
    stopped: torch.Tensor  # (N,) bool: ended on a stop token (not cut at max_new_tokens)


def rollout_seed(seed, step, rank):
    """A 63-bit sampling seed from (seed, step, rank): distinct for every process and step, and
    the same when a resumed run redoes a step."""
    h = hashlib.sha256(f"grpo/{seed}/{step}/{rank}".encode()).digest()
    return int.from_bytes(h[:8], "little") & (2 ** 63 - 1)


def _cat_images(pvs, grids, device):
    pv = [x for x in pvs if x is not None]
    gr = [g for g in grids if g is not None]
    if not pv:
        return None, None
    return torch.cat(pv).to(device), torch.cat(gr).to(device)


def _model_device(model):
    return next(model.parameters()).device


def generate_rollouts(model, tok, encs, group_ids, G, *, max_new_tokens, temperature, top_p, seed,
                      gen_batch=0):
    """Sample G completions of every encoded prompt in `encs` (dataset items); no grad.

    group_ids: one id per prompt (its G samples share it). gen_batch: sequences per generate call
    (0: all), rounded down to whole groups. Each prompt is prefilled once and its KV cache copied
    G times (generate's num_samples). Chunk c is sampled with seed + c. Vision placeholders are
    never sampled (generate bans them), so every completion can be fed back as text. Returns a
    Rollout (tensors on the CPU).
    """
    dev = _model_device(model)
    prompts, roles, pvs, grids, records, gids = [], [], [], [], [], []
    for enc, gid in zip(encs, group_ids):
        for _ in range(G):
            prompts.append(enc["input_ids"])
            roles.append(enc["roles"])
            pvs.append(enc["pixel_values"])
            grids.append(enc["image_grid_thw"])
            records.append(enc["record"])
            gids.append(int(gid))
    N = len(prompts)
    per_call = max(1, gen_batch // G) if gen_batch > 0 else len(encs)  # prompts per generate call
    toks, lens = [], []
    for c, s in enumerate(range(0, len(encs), per_call)):
        chunk = encs[s:s + per_call]
        pv, grid = _cat_images([e["pixel_values"] for e in chunk], [e["image_grid_thw"] for e in chunk], dev)
        t, n = model.generate([e["input_ids"] for e in chunk], pv, grid, max_new_tokens=max_new_tokens,
                              temperature=temperature, top_p=top_p, seed=(seed + c) % 2 ** 63, num_samples=G,
                              stop_ids=tok.stop_ids, pad_id=tok.pad_id, vocab_limit=tok.vocab_size)
        toks.append(t.cpu())
        lens.append(n.cpu())
    completions, lengths = torch.cat(toks), torch.cat(lens)
    stops = torch.tensor(list(tok.stop_ids))
    last = completions.gather(1, (lengths - 1).clamp(min=0)[:, None]).squeeze(1)
    stopped = (lengths > 0) & torch.isin(last, stops)
    texts = [tok.decode_response(completions[i, :int(lengths[i])]) for i in range(N)]
    return Rollout(prompts, roles, pvs, grids, records, completions, lengths,
                   torch.tensor(gids, dtype=torch.long), texts, stopped)


def pack_sequences(ro, idx, pad_id, device):
    """The training layout (see the top of this section) of rollout rows `idx`.

    Returns input_ids, attention_mask (bool), roles (PAD_ROLE on padding, RESPONSE on the
    completion) of shape (B, Lp + Lc); targets (B, Lc) the sampled ids; mask (B, Lc) from the
    sampler's lengths; Lp, Lc; the images of the rows; lengths (B,).
    """
    lengths = ro.lengths[idx]  # (B,)
    B = len(idx)
    Lp = max(len(ro.prompts[i]) for i in idx)
    Lc = max(1, int(lengths.max()))
    input_ids = torch.full((B, Lp + Lc), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(B, Lp + Lc, dtype=torch.bool)
    roles = torch.full((B, Lp + Lc), PAD_ROLE, dtype=torch.long)
    for b, i in enumerate(idx):
        p, n = ro.prompts[i], int(lengths[b])
        input_ids[b, Lp - len(p):Lp] = p  # prompt: left padding
        roles[b, Lp - len(p):Lp] = ro.roles[i]
        attention_mask[b, Lp - len(p):Lp + n] = True
        input_ids[b, Lp:Lp + n] = ro.completions[i, :n]  # completion: right padding
        roles[b, Lp:Lp + n] = RESPONSE
    pv, grid = _cat_images([ro.pixel_values[i] for i in idx], [ro.image_grid_thw[i] for i in idx], device)
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device),
            "roles": roles.to(device), "targets": input_ids[:, Lp:].to(device),
            "mask": response_mask(lengths, Lc).to(device), "Lp": Lp, "Lc": Lc,
            "pixel_values": pv, "image_grid_thw": grid, "lengths": lengths.to(device)}


def completion_logprobs(model, batch, temperature, vocab_size=None, chunk_size=512, with_entropy=False):
    """log pi(completion token) (B, Lc) float32 of the sampled tokens (and the entropy (B, Lc) of the
    tempered distribution), from one forward over a pack_sequences batch. Logits / temperature, in
    float32, restricted to the tokenizer's ids, as the sampler drew them."""
    hidden = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["image_grid_thw"],
                   return_hidden=True)  # (B, Lp + Lc, D)
    Lp, Lc = batch["Lp"], batch["Lc"]
    # Only the completion's columns go through the LM head (the prompt's logits, often the larger
    # part with images, are never made); column Lp-1+t predicts completion token t. train_sft.py
    # applies the head the same way, outside the model's forward, also under FSDP.
    logits = model.lm_head(hidden[:, Lp - 1:Lp + Lc - 1])  # (B, Lc, V)
    return token_logprobs(logits, batch["targets"], temperature, chunk_size, vocab_size, return_entropy=with_entropy)


# ---------------------------------------------------------------------------------------------
# rewards
# ---------------------------------------------------------------------------------------------

def accuracy_and_format(texts, records):
    """r_acc (N,) in {0, 1}: grading.grade(extract_answer(text), gold); r_format (N,) in {0, 1}:
    grading.format_ok(text), the full-match <think>...</think><answer>...</answer> check."""
    acc = [float(grading.grade(grading.extract_answer(t), r["answer"], r.get("options"), r.get("answer_type")))
           for t, r in zip(texts, records)]
    fmt = [float(grading.format_ok(t)) for t in texts]
    return torch.tensor(acc), torch.tensor(fmt)


def compute_rewards(model, ro, args, dctx, pad_id, autocast=contextlib.nullcontext()):
    """AVAR 4c on a rollout: acc, fmt, vis (gated: computed for correct answers only), total; (N,) each."""
    acc, fmt = accuracy_and_format(ro.texts, ro.records)
    vis = torch.zeros_like(acc)
    if args.lambda_v != 0:
        import vas
        # parsed without a depth bound: visual_reward keeps the layers the model has (0-7 of 4 = 0-3)
        layers = vas.parse_layers([args.vas_layers], 10 ** 9) if args.vas_layers else None
        vis = visual_rewards(model, ro, acc > 0, dctx, args.micro_batch, layers, args.vas_eps, pad_id, autocast,
                             form=getattr(args, "visual_form", "ratio"))
        if args.lambda_v * float(vis.max()) > 1.0:
            # a ratio this large means the response tokens' system-turn mass is near eps: the visual
            # term then outweighs r_acc = 1 and GRPO optimises attention, not answers
            print0(f"warning: lambda_v * r_visual reaches {args.lambda_v * float(vis.max()):.3g} > r_acc = 1 "
                   f"(max r_visual {float(vis.max()):.3g}): the system turn's attention is near its floor; "
                   f"consider --visual-form share")
    return acc, fmt, vis, total_reward(acc, vis, fmt, args.lambda_v, args.lambda_f)


class Dist:
    """The process group as the loop sees it: rank, world size, device, FSDP on/off."""

    def __init__(self, rank=0, world=1, device=torch.device("cpu"), fsdp=False):
        self.rank, self.world, self.device, self.fsdp = rank, world, device, fsdp

    def sum(self, values):
        """Sum of a list of floats over processes (float64)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.fsdp:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def max(self, value):
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        if self.fsdp:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()

    def gather(self, t):
        """Concatenation over processes of an equal-length 1-D tensor, in rank order."""
        if not self.fsdp:
            return t
        t = t.to(self.device)
        out = torch.empty(t.numel() * self.world, dtype=t.dtype, device=self.device)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(out, t.contiguous())
        return out.cpu()


def balanced_chunks(indices, size, dctx):
    """`indices` cut into chunks of `size`; under FSDP padded with None (a zero-weight dummy pass) up
    to the largest chunk count of any process, so that all run the same number of forwards."""
    chunks = [indices[s:s + size] for s in range(0, len(indices), size)]
    n = int(dctx.max(len(chunks))) if dctx.fsdp else len(chunks)
    return chunks + [None] * (n - len(chunks))


def visual_rewards(model, ro, correct, dctx, micro_batch, layers, eps, pad_id, autocast, form="ratio"):
    """r_visual (N,) for the rows where `correct` (others 0): vas.visual_reward over prompt +
    completion with roles (prompt roles from encode_chat, completion RESPONSE), no grad."""
    import vas
    out = torch.zeros(len(ro.prompts))
    rows = [i for i in range(len(ro.prompts)) if correct[i]]
    for chunk in balanced_chunks(rows, micro_batch, dctx):
        b = pack_sequences(ro, chunk if chunk is not None else [0], pad_id, dctx.device)
        with autocast:
            r = vas.visual_reward(model, b["input_ids"], b["attention_mask"], b["roles"], b["pixel_values"],
                                  b["image_grid_thw"], layers=layers, eps=eps, form=form)
        if dctx.fsdp:
            # visual_reward stops the forward after its last layer (an exception inside the model):
            # FSDP's per-iteration state must be reset before the next forward.
            model.reset_iter_state()
        if chunk is not None:
            out[chunk] = r.float().cpu()
    return out


# ---------------------------------------------------------------------------------------------
# FSDP: all parameters gathered for generation
# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def generation_mode(model, dctx):
    """Run model.generate on the full parameters.

    Without FSDP: nothing to do. With FSDP2 every unit is unsharded once here (one collective each,
    in the same order on every process) and kept unsharded through all forwards (reshard after
    forward off), so the decode steps issue no collectives: processes may stop decoding at
    different steps. train_sft's vision-on-text-batches patch (a collective trick for training
    forwards) is lifted meanwhile, so decode steps do not run the vision tower.
    """
    if not dctx.fsdp:
        yield
        return
    from torch.distributed.fsdp import FSDPModule
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    # the setting to restore: the root keeps its parameters after forward (FSDP's own default for
    # the root), the other units follow what they were given (read from the unit's param group)
    before = []
    for m in units:
        groups = m._get_fsdp_state()._fsdp_param_groups
        before.append(False if m is model else any(g.post_forward_mesh_info is not None for g in groups))
    patched = model.__dict__.pop("embed", None)
    for m in units:
        m.set_reshard_after_forward(False, recurse=False)
    for m in units:
        m.unshard()
    try:
        yield
    finally:
        for m, r in zip(units, before):
            m.set_reshard_after_forward(r, recurse=False)
            m.reshard()
        if patched is not None:
            model.embed = patched


# ---------------------------------------------------------------------------------------------
# the update
# ---------------------------------------------------------------------------------------------

@dataclass
class LossConfig:
    temperature: float = 1.0
    clip_low: float = 0.2
    clip_high: float = 0.3
    dual_clip: float | None = 3.0
    kl_coef: float = 0.0
    loss_agg: str = "token_mean"
    max_new_tokens: int = 256
    vocab_size: int | None = None
    logp_chunk: int = 512


def _no_grad_logprobs(model, ro, chunks, pad_id, cfg, dctx, autocast):
    """Per chunk (B, Lc) log-probs under no grad: the old policy's or the reference's (a dummy
    chunk's too: its loss is multiplied by 0 but still computed)."""
    out = []
    with torch.no_grad():
        for chunk in chunks:
            b = pack_sequences(ro, chunk if chunk is not None else [0], pad_id, dctx.device)
            with autocast:
                lp = completion_logprobs(model, b, cfg.temperature, cfg.vocab_size, cfg.logp_chunk)
            out.append(lp)
    return out


def policy_update(model, optimizer, ro, adv, keep, cfg, dctx, *, micro_batch, ppo_epochs, pad_id,
                  grad_clip=1.0, ref_model=None, autocast=contextlib.nullcontext(), lr_for=None):
    """--ppo-epochs optimizer steps on one rollout batch. Returns a dict of step metrics.

    adv (N,) per-sequence advantages; keep (N,) bool, the rows that take part (all but the dropped
    zero-spread groups). The normalisers are the counts of the kept rows of ALL processes (one
    optimizer step covers them all): response tokens (token_mean), sequences (seq_mean, dr_grpo).
    old log-probs: with one update per rollout batch the policy that sampled is the policy being
    updated, so old = logp.detach() (ratio exactly 1, TRL's shortcut); with more, one no-grad pass
    before the first update. Reference log-probs (kl_coef > 0): one no-grad pass of the frozen copy.
    FSDP averages gradients over processes, so each loss is multiplied by the world size.
    """
    rows = [i for i in range(len(ro.prompts)) if keep[i]]
    n_tok, n_seq = dctx.sum([float(ro.lengths[rows].sum()) if rows else 0.0, float(len(rows))])
    metrics = {"n_trained_sequences": int(n_seq), "n_trained_tokens": int(n_tok)}
    if n_seq == 0:  # every group had zero spread and was dropped: nothing to learn from this batch
        metrics["skipped_update"] = True
        return metrics
    chunks = balanced_chunks(rows, micro_batch, dctx)
    old = _no_grad_logprobs(model, ro, chunks, pad_id, cfg, dctx, autocast) if ppo_epochs > 1 else None
    ref = _no_grad_logprobs(ref_model, ro, chunks, pad_id, cfg, dctx, autocast) if cfg.kl_coef > 0 else None
    scale = dctx.world if dctx.fsdp else 1
    dual = cfg.dual_clip if cfg.dual_clip else None
    keys = ("loss", "pg_loss", "kl", "entropy", "clip_frac", "clip_frac_high", "clip_frac_low", "dual_clip_frac",
            "approx_kl", "ratio_mean", "tokens")
    sums = dict.fromkeys(keys, 0.0)
    ratio_max, norms, train_tokens = 0.0, [], 0
    t0 = time.time()
    for epoch in range(ppo_epochs):
        if lr_for is not None:
            lr_for(epoch)
        for j, chunk in enumerate(chunks):
            if dctx.fsdp:  # reduce-scatter gradients only after the last micro-batch
                model.set_requires_gradient_sync(j == len(chunks) - 1)
            b = pack_sequences(ro, chunk if chunk is not None else [0], pad_id, dctx.device)
            with autocast:
                logp, ent = completion_logprobs(model, b, cfg.temperature, cfg.vocab_size, cfg.logp_chunk,
                                                with_entropy=True)
            mask = b["mask"]
            a = adv[chunk if chunk is not None else [0]].to(logp.device)
            old_lp = old[j] if old is not None else logp.detach()
            pg, pm = policy_loss(logp, old_lp, a, mask, cfg.clip_low, cfg.clip_high, dual)
            per_token = pg
            kl = None
            if ref is not None:
                kl = kl_k3(logp, ref[j])
                per_token = per_token + cfg.kl_coef * kl
            loss = aggregate(per_token, mask, cfg.loss_agg, total_tokens=n_tok, num_seqs=n_seq,
                             max_len=cfg.max_new_tokens)
            if chunk is None:
                loss = loss * 0.0  # a dummy micro-batch: same collectives, no contribution
            (loss * scale).backward()
            train_tokens += int(b["attention_mask"].sum())
            if chunk is None:
                continue
            with torch.no_grad():
                m = mask.float()
                nt = float(m.sum())
                sums["tokens"] += nt
                sums["loss"] += float(loss)
                sums["pg_loss"] += float(aggregate(pg, mask, cfg.loss_agg, total_tokens=n_tok, num_seqs=n_seq,
                                                   max_len=cfg.max_new_tokens))
                sums["entropy"] += float((ent * m).sum())
                if kl is not None:
                    sums["kl"] += float((kl * m).sum())
                for k in ("clip_frac", "clip_frac_high", "clip_frac_low", "dual_clip_frac", "approx_kl", "ratio_mean"):
                    sums[k] += float(pm[k]) * nt
                ratio_max = max(ratio_max, float(pm["ratio_max"]))
        params = [p for p in model.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
        if hasattr(norm, "full_tensor"):  # a DTensor under FSDP
            norm = norm.full_tensor()
        norms.append(float(norm))
        loss_now = dctx.sum([sums["loss"]])[0]
        if not (math.isfinite(norms[-1]) and math.isfinite(loss_now)):
            optimizer.zero_grad(set_to_none=True)
            metrics.update(nonfinite=True, grad_norm=norms[-1], loss=loss_now)
            return metrics
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    dt = time.time() - t0
    s = dict(zip(keys, dctx.sum([sums[k] for k in keys])))
    tok = max(s["tokens"], 1.0)
    metrics.update(
        loss=s["loss"] / ppo_epochs, pg_loss=s["pg_loss"] / ppo_epochs,
        kl=s["kl"] / tok if cfg.kl_coef > 0 else None, entropy=s["entropy"] / tok,
        clip_frac=s["clip_frac"] / tok, clip_frac_high=s["clip_frac_high"] / tok,
        clip_frac_low=s["clip_frac_low"] / tok, dual_clip_frac=s["dual_clip_frac"] / tok,
        approx_kl=s["approx_kl"] / tok, ratio_mean=s["ratio_mean"] / tok,
        ratio_max=dctx.max(ratio_max), grad_norm=norms[-1],
        train_tokens_per_s=dctx.sum([float(train_tokens)])[0] / max(dctx.max(dt), 1e-9))
    return metrics


def grpo_step(model, optimizer, tok, encs, group_ids, args, dctx, step, *, ref_model=None,
              reward_fn=None, autocast=contextlib.nullcontext(), lr_for=None):
    """One rollout batch and its update on this process's prompts `encs`. Returns (metrics, rollout).

    reward_fn(rollout) -> (acc, fmt, vis) may replace the AVAR reward (tests); by default
    r_acc / r_format from evaluate.py and r_visual from vas.py for the correct answers.
    """
    G = args.group_size
    cfg = LossConfig(temperature=args.temperature, clip_low=args.clip_low, clip_high=args.clip_high,
                     dual_clip=args.dual_clip, kl_coef=args.kl_coef, loss_agg=args.loss_agg,
                     max_new_tokens=args.max_new_tokens, vocab_size=tok.vocab_size, logp_chunk=args.logp_chunk)
    # 1. rollout
    t0 = time.time()
    with generation_mode(model, dctx), torch.no_grad():
        ro = generate_rollouts(model, tok, encs, group_ids, G, max_new_tokens=args.max_new_tokens,
                               temperature=args.temperature, top_p=args.top_p,
                               seed=rollout_seed(args.seed, step, dctx.rank), gen_batch=args.gen_batch)
    t_gen = time.time() - t0
    # 2. rewards
    t0 = time.time()
    if reward_fn is not None:
        acc, fmt, vis = reward_fn(ro)
        reward = total_reward(acc, vis, fmt, args.lambda_v, args.lambda_f)
    else:
        acc, fmt, vis, reward = compute_rewards(model, ro, args, dctx, tok.pad_id, autocast)
    t_reward = time.time() - t0
    # 3. advantages over the whole step's rewards
    all_r, all_g = dctx.gather(reward.float()), dctx.gather(ro.group_ids)
    adv_all, am = group_advantages(all_r, all_g, scale=args.adv_scale, eps=args.adv_eps)
    n = len(ro.prompts)
    sl = slice(dctx.rank * n, (dctx.rank + 1) * n) if dctx.fsdp else slice(0, n)
    adv, zero = adv_all[sl], am["zero_spread_mask"][sl]
    keep = ~zero if args.drop_zero_spread else torch.ones(n, dtype=torch.bool)
    # 4. update
    m = policy_update(model, optimizer, ro, adv, keep, cfg, dctx, micro_batch=args.micro_batch,
                      ppo_epochs=args.ppo_epochs, pad_id=tok.pad_id, grad_clip=args.grad_clip,
                      ref_model=ref_model, autocast=autocast, lr_for=lr_for)
    # step metrics, over all processes
    gated_vis = torch.where(acc > 0, vis, torch.zeros_like(vis))
    s = dctx.sum([float(n), float(reward.sum()), float(acc.sum()), float(fmt.sum()), float(gated_vis.sum()),
                  float(ro.lengths.sum()), float((~ro.stopped).sum())])
    N, gen_tokens = s[0], s[5]
    m.update(
        reward=s[1] / N, reward_acc=s[2] / N, reward_format=s[3] / N, reward_visual=s[4] / N,
        reward_visual_correct=s[4] / s[2] if s[2] else None, accuracy=s[2] / N,
        response_length=gen_tokens / N, response_length_max=int(dctx.max(float(ro.lengths.max()))),
        truncated_frac=s[6] / N, zero_spread_frac=am["zero_spread_frac"], reward_std=am["reward_std"],
        n_sequences=int(N), gen_tokens_per_s=gen_tokens / max(dctx.max(t_gen), 1e-9),
        time_rollout=t_gen, time_reward=t_reward)
    return m, ro


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------

def weights_checksum(model, use_fsdp):
    """sha256 of the full float32 weights as this process sees them (FSDP: gathered)."""
    if use_fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
    else:
        sd = model.state_dict()
    h = hashlib.sha256()
    for name in sorted(sd):
        h.update(name.encode())
        h.update(sd[name].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def main(argv=None, reward_fn=None):
    """Parse the arguments, set up the process group (train_sft.setup_distributed) and train.
    reward_fn(rollout) -> (acc, fmt, vis) replaces the AVAR reward (tests)."""
    global RANK
    import train_sft
    args = build_parser().parse_args(argv)
    rank, world, device, use_fsdp = train_sft.setup_distributed(args)
    RANK = train_sft.RANK = rank  # train_sft.save_checkpoint writes on its RANK 0 only
    try:
        return train(args, Dist(rank, world, device, use_fsdp), reward_fn)
    finally:
        if use_fsdp and dist.is_initialized():
            dist.destroy_process_group()


def train(args, dctx, reward_fn=None):
    import train_sft
    from tqdm import tqdm

    from model import from_pretrained

    rank, world, device = dctx.rank, dctx.world, dctx.device
    torch.manual_seed(args.seed + rank)
    if args.temperature <= 0:
        raise UserError("--temperature must be > 0 for GRPO rollouts (the log-probs divide by it)")
    if args.prompts_per_step % world:
        raise UserError(f"--prompts-per-step {args.prompts_per_step} must be a multiple of the {world} processes")
    compute_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32,
                     "auto": torch.bfloat16 if device.type == "cuda" else torch.float32}[args.dtype]

    ckpt = train_sft.resolve_resume(args.resume, args.out) if args.resume else None
    if args.resume and ckpt is None:
        print0(f"--resume: no checkpoint in {args.out}, starting from {args.model}")
    state = None
    if ckpt is not None:
        state = train_sft.read_train_state(ckpt)
    init_dir = state["init_model"] if state is not None else resolve_model_dir(args.model)
    model_dir = ckpt or init_dir

    tok = Tokenizer(model_dir)
    improc = ImageProcessor.from_pretrained(model_dir, min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    ds = PromptDataset(args.data, tok, improc, args.max_prompt_len, args.skip_bad)
    print0(ds.summary())
    P = args.prompts_per_step
    steps_per_epoch = len(ds) // P
    if steps_per_epoch == 0:
        raise UserError(f"{args.data}: {len(ds)} prompts, fewer than one batch of --prompts-per-step {P}")
    total_steps = args.max_steps if args.max_steps > 0 else max(1, int(args.epochs * steps_per_epoch))

    model = train_sft.load_for_training(model_dir, tok, device, args.grad_ckpt, args.freeze_vision)
    n_params = sum(p.numel() for p in model.parameters())
    ref_model = None
    if args.kl_coef > 0:  # the frozen initial policy (also after a resume)
        ref_model = from_pretrained(init_dir, dtype=torch.float32, device=device).eval()
        ref_model.requires_grad_(False)
    if dctx.fsdp:
        train_sft.shard_model(model, compute_dtype)
        train_sft.run_vision_on_text_batches(model)
        if ref_model is not None:
            train_sft.shard_model(ref_model, compute_dtype)
            train_sft.run_vision_on_text_batches(ref_model)
    model.train()
    # one process in bf16: autocast for the training forwards; generation runs on the float32
    # weights (its KV cache takes the weights' dtype). --fsdp gives bf16 generation.
    autocast = (torch.autocast(device.type, dtype=compute_dtype)
                if not dctx.fsdp and compute_dtype != torch.float32 else contextlib.nullcontext())

    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=tuple(args.betas),
                                  fused=device.type == "cuda")
    start = 0
    if state is not None:
        for key, now in (("prompts_per_step", P), ("seed", args.seed), ("num_records", len(ds)),
                         ("group_size", args.group_size)):
            if state[key] != now:
                raise UserError(f"cannot resume from {ckpt}: {key} was {state[key]}, now {now}")
        train_sft.restore_weights_and_optimizer(model, optimizer, state, dctx.fsdp)
        start = int(state["step"])
        print0(f"resumed from {ckpt} at step {start}")
    last_ckpt = ckpt

    config = dict(vars(args), init_model=init_dir, world_size=world, steps_per_epoch=steps_per_epoch,
                  total_steps=total_steps, fsdp=dctx.fsdp, compute_dtype=str(compute_dtype), device=str(device),
                  parameters=n_params, data_stats=ds.stats, torch=torch.__version__)
    print0("config: " + json.dumps(config, default=str))
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    if rank == 0:
        train_sft.start_run_files(args.out, config, start)

    def set_lr(update):
        lr = args.lr * (min(1.0, (update + 1) / args.warmup_steps) if args.warmup_steps > 0 else 1.0)
        for g in optimizer.param_groups:
            g["lr"] = lr
        return lr

    def train_state(done):
        return dict(step=done, epoch=done // steps_per_epoch, batch_in_epoch=done % steps_per_epoch,
                    steps_per_epoch=steps_per_epoch, prompts_per_step=P, group_size=args.group_size,
                    num_records=len(ds), seed=args.seed, total_steps=total_steps, world_size=world,
                    init_model=init_dir, args=vars(args))

    pbar = tqdm(total=total_steps, initial=start, disable=rank != 0, dynamic_ncols=True, desc="grpo")
    history, share, skipped = [], P // world, 0  # skipped: prompts that failed to load, this process's run
    for step in range(start, total_steps):
        t0 = time.time()
        epoch, k = divmod(step, steps_per_epoch)
        batch = epoch_batches(ds.lengths, P, args.seed, epoch, group_by_length=False)[k]
        mine = batch[rank * share:(rank + 1) * share]
        encs, group_ids, bad = [], [], []
        for j, i in enumerate(mine):
            try:
                encs.append(ds[i])
                group_ids.append(step * P + rank * share + j)  # exact, unique in the step
            except DataError as e:  # an image that does not decode: the same ones on every run
                bad.append(str(e))
        n_bad = int(dctx.sum([float(len(bad))])[0])
        # several processes exchange equal-length rollout tensors: there a lost prompt stops the run
        if n_bad and (not args.skip_bad or world > 1):
            if step > 0 and last_ckpt != os.path.join(args.out, f"step_{step}"):
                last_ckpt = train_sft.save_checkpoint(model, optimizer, step, args, train_state(step), model_dir,
                                                      dctx.fsdp, device, improc)
            kept = f"saved {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
            how = ("--skip-bad cannot skip a prompt with several processes; fix the file and --resume" if args.skip_bad
                   else "Fix the file and --resume, or --resume --skip-bad to skip such prompts")
            raise DataError(f"step {step + 1}: {bad[0] if bad else 'a prompt on another process failed to load'}; "
                            f"stopped before the rollout, {kept}. {how}")
        for err in bad:
            pbar.write(f"skipped (--skip-bad): {err}")
        skipped += n_bad
        if not encs:
            raise DataError(f"step {step + 1}: every prompt of this process failed to load ({bad[0]})")
        lrs = [set_lr(step * args.ppo_epochs)]
        m, _ = grpo_step(model, optimizer, tok, encs, group_ids, args, dctx, step, ref_model=ref_model,
                         reward_fn=reward_fn, autocast=autocast,
                         lr_for=lambda e: lrs.append(set_lr(step * args.ppo_epochs + e)))
        if m.get("nonfinite"):
            where = f"the last good checkpoint is {last_ckpt} (--resume)" if last_ckpt else "no checkpoint was written yet"
            raise train_sft.NonFiniteLoss(f"step {step + 1}: non-finite loss {m.get('loss')} or grad norm "
                                          f"{m.get('grad_norm')}; stopped before the update; {where}")
        row = dict(step=step + 1, epoch=round((step + 1) / steps_per_epoch, 4), lr=lrs[-1] if lrs else None, **m,
                   skipped=n_bad, step_time=time.time() - t0)
        if args.checksum:
            sums = [None] * world if dctx.fsdp else None
            mine_sum = weights_checksum(model, dctx.fsdp)
            if dctx.fsdp:
                dist.all_gather_object(sums, mine_sum)
            row["param_checksums"] = sums if dctx.fsdp else [mine_sum]
        history.append(row)
        if rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            pbar.set_postfix(reward=f"{row['reward']:.3f}", acc=f"{row['accuracy']:.3f}",
                             len=f"{row['response_length']:.0f}", **({"skipped": skipped} if skipped else {}))
            pbar.update(1)
        done = step + 1
        if done == total_steps or (args.save_every > 0 and done % args.save_every == 0):
            last_ckpt = train_sft.save_checkpoint(model, optimizer, done, args, train_state(done), model_dir,
                                                  dctx.fsdp, device, improc)
    pbar.close()
    return {"metrics": history, "checkpoint": last_ckpt, "config": config}


if __name__ == "__main__":
    run_cli(main)
