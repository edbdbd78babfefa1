"""Tests of the GRPO core functions at the top of train_grpo.py, against hand-computed numbers.

Expected values are written out (derivation in the comments) or come from an independent direct
formula, never from calling the function under test a second time.
"""
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from grpo import (aggregate, group_advantages, kl_k3, policy_loss, response_mask,  # noqa: E402
                  token_logprobs, total_reward)


def close(a, b, tol=1e-5):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32),
                          torch.as_tensor(b, dtype=torch.float32), atol=tol, rtol=0)


# --------------------------------------------------------------------------- advantages

def test_group_advantages_bessel_noncontiguous_size1_zero_spread():
    # id 7: rewards [1, 0, 1, 0]  mean 0.5, Bessel var = 4 * 0.25 / 3 = 1/3, std = 0.5773503
    #        -> A = +-0.5 / 0.5773503 = +-0.8660254 (population std 0.5 would give +-1)
    # id 3: rewards [2, 0, 1]     mean 1, Bessel var = (1 + 1 + 0) / 2 = 1 -> A = [1, -1, 0]
    # id 42: one sample -> std 0 (not NaN), A = 0;  id 5: [1, 1, 1] -> zero spread, A = 0
    ids = torch.tensor([7, 3, 7, 3, 42, 7, 5, 3, 7, 5, 5])
    r = torch.tensor([1., 2., 0., 0., .7, 1., 1., 1., 0., 1., 1.])
    adv, m = group_advantages(r, ids, scale="group")
    a = 0.8660254
    expected = torch.tensor([a, 1., -a, -1., 0., a, 0., 0., -a, 0., 0.])
    assert not torch.isnan(adv).any()
    assert close(adv, expected)
    assert m["num_groups"] == 4
    assert abs(m["zero_spread_frac"] - 0.5) < 1e-9  # ids 42 and 5 out of 4 groups
    assert m["zero_spread_mask"].tolist() == [False, False, False, False, True, False, True,
                                              False, False, True, True]


def test_group_advantages_eps():
    # id 0: [3, 1] mean 2, Bessel std = sqrt((1 + 1) / 1) = 1.4142136; with eps = 0.1:
    # A = +-1 / 1.5142136 = +-0.6604106
    adv, _ = group_advantages(torch.tensor([3., 1.]), torch.tensor([0, 0]), eps=0.1)
    assert close(adv, [0.6604106, -0.6604106])


def test_group_advantages_batch_and_none():
    # groups: id 0 [1, 0] (mean 0.5), id 1 [3, 1] (mean 2): centred [0.5, -0.5, 1, -1]
    # batch std (Bessel) of [1, 0, 3, 1]: mean 1.25, squares 0.0625 + 1.5625 + 3.0625 + 0.0625
    # = 4.75, / 3 = 1.5833333, sqrt = 1.2583057
    ids = torch.tensor([0, 0, 1, 1])
    r = torch.tensor([1., 0., 3., 1.])
    adv_b, _ = group_advantages(r, ids, scale="batch")
    s = 1.2583057
    assert close(adv_b, [0.5 / s, -0.5 / s, 1 / s, -1 / s])
    adv_n, m = group_advantages(r, ids, scale="none")
    assert close(adv_n, [0.5, -0.5, 1., -1.])
    assert m["zero_spread_frac"] == 0.0 and not m["zero_spread_mask"].any()


# --------------------------------------------------------------------------- policy loss

def test_first_update_ratio_one_and_loss_minus_A():
    torch.manual_seed(0)
    logp = torch.randn(2, 4) - 3.0
    A = torch.tensor([0.5, -1.2])
    mask = response_mask(torch.tensor([4, 2]), 4)
    loss, m = policy_loss(logp, logp.clone(), A, mask)
    assert torch.equal(loss, torch.tensor([[-0.5] * 4, [1.2] * 4]))
    assert m["ratio_mean"].item() == 1.0
    assert m["clip_frac"].item() == 0.0


def test_clip_gradients():
    # old_logp = 0 so ratio = exp(logp); eps_low = eps_high = 0.2
    # row 0, A = +2, ratios [1.5 (clipped), 1.1 (inside), 0.5 (below, unclipped for A > 0)]
    #   loss = -min(rA, clip(r)A) = [-2.4, -2.2, -1.0];  dloss/dlogp = -A r = [0, -2.2, -1.0]
    # row 1, A = -2, ratios [0.5 (clipped), 0.9 (inside), 1.5 (above, unclipped for A < 0)]
    #   loss = [1.6, 1.8, 3.0];  dloss/dlogp = [0, 1.8, 3.0]
    ratios = torch.tensor([[1.5, 1.1, 0.5], [0.5, 0.9, 1.5]])
    logp = ratios.log().requires_grad_(True)
    A = torch.tensor([[2.] * 3, [-2.] * 3])
    mask = torch.ones(2, 3, dtype=torch.bool)
    loss, m = policy_loss(logp, torch.zeros(2, 3), A, mask, clip_low=0.2, clip_high=0.2)
    assert close(loss, [[-2.4, -2.2, -1.0], [1.6, 1.8, 3.0]])
    loss.sum().backward()
    assert close(logp.grad, [[0., -2.2, -1.0], [0., 1.8, 3.0]])
    assert logp.grad[0, 0].item() == 0.0 and logp.grad[1, 0].item() == 0.0
    assert close(m["clip_frac"], 2 / 6) and close(m["clip_frac_high"], 1 / 6)
    assert close(m["clip_frac_low"], 1 / 6)


def test_asymmetric_clip():
    # clip_high 0.28: ratio 1.25 with A = +1 is inside -> loss -1.25, gradient -1.25
    logp = torch.tensor([[math.log(1.25)]], requires_grad=True)
    loss, _ = policy_loss(logp, torch.zeros(1, 1), torch.tensor([1.]), torch.ones(1, 1),
                          clip_low=0.2, clip_high=0.28)
    loss.sum().backward()
    assert close(loss, [[-1.25]]) and close(logp.grad, [[-1.25]])


def test_dual_clip():
    # A = -2: ratio 5 -> plain loss -min(-10, -2.4) = 10, capped at -c A = 6, gradient 0
    #         ratio 2 -> plain loss 4 < 6, kept, gradient -A r = 4
    # A = +2: ratio 5 -> -min(10, 2.4) = -2.4 (dual clip never applies to A > 0)
    logp = torch.tensor([[5., 2.], [5., 1.]]).log().requires_grad_(True)
    A = torch.tensor([[-2., -2.], [2., 2.]])
    plain, _ = policy_loss(logp, torch.zeros(2, 2), A, torch.ones(2, 2))
    assert close(plain, [[10., 4.], [-2.4, -2.]])
    loss, m = policy_loss(logp, torch.zeros(2, 2), A, torch.ones(2, 2), dual_clip=3.0)
    assert close(loss, [[6., 4.], [-2.4, -2.]])
    loss.sum().backward()
    assert close(logp.grad, [[0., 4.], [0., -2.]])
    assert close(m["dual_clip_frac"], 0.25)


def test_policy_metrics_respect_mask():
    # only the first token of each row is a response token; the clipped token is masked out
    logp = torch.tensor([[0., math.log(2.)], [0., 0.]])
    mask = response_mask(torch.tensor([1, 1]), 2)
    _, m = policy_loss(logp, torch.zeros(2, 2), torch.tensor([1., 1.]), mask)
    assert m["clip_frac"].item() == 0.0 and close(m["ratio_mean"], 1.0)


# --------------------------------------------------------------------------- aggregation

def test_aggregate_hand_numbers():
    # l = [[1, 2, 3], [4, 5, 6]], lengths [2, 3]: masked sum 1+2+4+5+6 = 18, 5 tokens
    l = torch.tensor([[1., 2., 3.], [4., 5., 6.]])
    m = response_mask(torch.tensor([2, 3]), 3)
    assert close(aggregate(l, m, "token_mean"), 18 / 5)
    assert close(aggregate(l, m, "seq_mean"), (1.5 + 5.0) / 2)
    assert close(aggregate(l, m, "dr_grpo", num_seqs=2, max_len=4), 18 / 8)
    assert close(aggregate(l, m, "dr_grpo"), 18 / 6)  # defaults B = 2, T = 3


def test_aggregate_micro_batches_equal_one_batch():
    torch.manual_seed(1)
    shapes = [(2, 5), (1, 3), (3, 7)]
    lens = [torch.tensor([5, 2]), torch.tensor([3]), torch.tensor([1, 7, 4])]
    losses = [torch.randn(*s) for s in shapes]
    masks = [response_mask(n, s[1]) for n, s in zip(lens, shapes)]
    # one big batch: right-pad each micro-batch to T = 7
    big_l = torch.cat([torch.nn.functional.pad(x, (0, 7 - x.shape[1]), value=99.) for x in losses])
    big_m = torch.cat([torch.nn.functional.pad(x, (0, 7 - x.shape[1])) for x in masks])
    n_tok = int(sum(m.sum() for m in masks))  # 7 + 3 + 12 = 22
    assert n_tok == 22
    n_seq = 6

    # independent formulas on the big batch
    tok_ref = sum((x * m).sum() for x, m in zip(losses, masks)) / 22
    seq_ref = sum(((x * m).sum(-1) / m.sum(-1)).sum() for x, m in zip(losses, masks)) / 6
    dr_ref = sum((x * m).sum() for x, m in zip(losses, masks)) / (6 * 8)

    tok = sum(aggregate(x, m, "token_mean", total_tokens=n_tok) for x, m in zip(losses, masks))
    seq = sum(aggregate(x, m, "seq_mean", num_seqs=n_seq) for x, m in zip(losses, masks))
    dr = sum(aggregate(x, m, "dr_grpo", num_seqs=n_seq, max_len=8) for x, m in zip(losses, masks))
    assert close(tok, tok_ref) and close(tok, aggregate(big_l, big_m, "token_mean"))
    assert close(seq, seq_ref) and close(seq, aggregate(big_l, big_m, "seq_mean"))
    assert close(dr, dr_ref) and close(dr, aggregate(big_l, big_m, "dr_grpo", max_len=8))
    # the naive per-micro-batch token mean does not match (why total_tokens is needed)
    naive = sum(aggregate(x, m, "token_mean") for x, m in zip(losses, masks)) / 3
    assert not close(naive, tok_ref)


def test_aggregate_empty_sequence_is_zero_not_nan():
    l = torch.ones(2, 3)
    m = response_mask(torch.tensor([0, 3]), 3)
    assert close(aggregate(l, m, "seq_mean"), 0.5)


# --------------------------------------------------------------------------- KL

def test_kl_k3():
    logp = torch.tensor([[-1.3, -0.2, -5.0]])
    assert torch.equal(kl_k3(logp, logp.clone()), torch.zeros(1, 3))
    # ref - logp = log 0.5: 0.5 + 0.6931472 - 1 = 0.1931472
    # ref - logp = 1:       e - 1 - 1 = 0.7182818
    # ref - logp = -2:      e^-2 + 2 - 1 = 1.1353353
    # ref - logp = 30:      clamped to 20, exp(20) - 21 > 10, clamped to 10
    lp = torch.tensor([[math.log(0.5), 0., 0., 0.]])
    ref = torch.tensor([[math.log(0.25), 1., -2., 30.]])
    kl = kl_k3(lp, ref)
    assert kl.dtype == torch.float32
    assert close(kl, [[0.1931472, 0.7182818, 1.1353353, 10.0]])
    assert (kl > 0).all()


# --------------------------------------------------------------------------- log-probs

def _direct(logits, targets, temperature):
    lsm = torch.log_softmax(logits.float() / temperature, dim=-1)
    logp = lsm.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    ent = -(lsm.exp() * lsm).sum(-1)
    return logp, ent


def test_token_logprobs_chunked_matches_direct():
    torch.manual_seed(2)
    logits32 = torch.randn(2, 37, 50) * 3
    targets = torch.randint(0, 50, (2, 37))
    for logits in (logits32, logits32.bfloat16()):
        for temperature in (1.0, 0.7):
            ref_lp, ref_ent = _direct(logits, targets, temperature)
            lp, ent = token_logprobs(logits, targets, temperature=temperature, chunk_size=8,
                                     return_entropy=True)
            assert lp.dtype == torch.float32 and lp.shape == (2, 37)
            assert close(lp, ref_lp, 1e-5) and close(ent, ref_ent, 1e-5)
            lp_only = token_logprobs(logits, targets, temperature=temperature, chunk_size=5)
            assert close(lp_only, ref_lp, 1e-5)


def test_token_logprobs_gradient_through_chunks():
    torch.manual_seed(3)
    base = torch.randn(2, 11, 20)
    targets = torch.randint(0, 20, (2, 11))
    w = torch.randn(2, 11)
    x1 = base.clone().requires_grad_(True)
    (token_logprobs(x1, targets, temperature=0.8, chunk_size=4) * w).sum().backward()
    x2 = base.clone().requires_grad_(True)
    (_direct(x2, targets, 0.8)[0] * w).sum().backward()
    assert close(x1.grad, x2.grad, 1e-6)


def test_token_logprobs_vocab_size():
    torch.manual_seed(4)
    logits = torch.randn(1, 6, 24)
    targets = torch.randint(0, 20, (1, 6))
    ref_lp, _ = _direct(logits[..., :20], targets, 1.0)
    assert close(token_logprobs(logits, targets, vocab_size=20, chunk_size=4), ref_lp)


# --------------------------------------------------------------------------- masks and reward

def test_response_mask():
    m = response_mask(torch.tensor([0, 2, 4]), 4)
    assert m.dtype == torch.bool
    assert m.tolist() == [[False] * 4, [True, True, False, False], [True] * 4]


def test_total_reward():
    acc = torch.tensor([1., 0., 0., 1., 0.])
    visual = torch.tensor([2.0, 5.0, float("nan"), 0.5, 0.0])
    fmt = torch.tensor([1., 1., 1., 0., 0.])
    r = total_reward(acc, visual, fmt)
    # 1 + 0.3*2 + 0.1 = 1.7 | wrong: no visual, 0.1 | wrong, NaN visual: 0.1 | 1 + 0.15 | 0
    assert close(r, [1.7, 0.1, 0.1, 1.15, 0.0])
    assert close(total_reward(torch.tensor([0.]), torch.tensor([9.]), torch.tensor([1.]),
                              lambda_v=0.3, lambda_f=0.25), [0.25])
