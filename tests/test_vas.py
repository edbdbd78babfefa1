"""vas.py against full attention matrices of transformers' eager Qwen2.5-VL (the reference).

The references here are written out directly from the formulas of docs/avar_method.md on the
(B, H, T, T) attentions that transformers returns with output_attentions=True; roles come from
data.encode_chat with a byte tokenizer (the ids of conftest.TINY_IDS).
"""

import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import TINY_IDS
from data import IMAGE, PAD_ROLE, RESPONSE, SYSTEM, USER, Tokenizer, encode_chat
from hub import normalise_name
from model import KVCache, from_pretrained, save_pretrained
from toy import make_byte_tokenizer
from vas import (AttentionGuidedLoss, AttentionStats, Intervention, measure_vas, query_mask, vas,
                 visual_reward)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAD = TINY_IDS["bos_token_id"]
EPS = 1e-6

# ------------------------------------------------------------------------------------ inputs


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("bytetok")
    make_byte_tokenizer(str(d))
    return Tokenizer(str(d))


# one image; two images (multi-image row); no image (text only)
GRIDS = [[(1, 4, 6)], [(1, 4, 4), (1, 6, 4)], []]
USER_CONTENT = [
    [{"type": "image"}, {"type": "text", "text": "What colour?"}],
    [{"type": "text", "text": "Compare "}, {"type": "image"}, {"type": "text", "text": " with "}, {"type": "image"}],
    "Say hi.",
]
ANSWERS = ["Red.", "The left one is larger.", "Hi!"]


def encode_rows(tok, with_response=True):
    rows = []
    for content, grids, answer in zip(USER_CONTENT, GRIDS, ANSWERS):
        msgs = [{"role": "user", "content": content}]
        if with_response:
            msgs.append({"role": "assistant", "content": answer})
        rows.append(encode_chat(tok, msgs, image_tokens=[t * h * w // 4 for t, h, w in grids],
                                add_generation_prompt=not with_response))
    return rows


def pixels(seed=0):
    grids = torch.tensor([g for gs in GRIDS for g in gs])
    pv = torch.randn(int(grids.prod(-1).sum()), 1176, generator=torch.Generator().manual_seed(seed))
    return pv, grids


def make_batch(tok, padding="right", with_response=True):
    rows = encode_rows(tok, with_response)
    L = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), L), PAD)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    roles = torch.full((len(rows), L), PAD_ROLE)
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        sl = slice(0, n) if padding == "right" else slice(L - n, L)
        ids[b, sl], mask[b, sl], roles[b, sl] = r["input_ids"], 1, r["roles"]
    pv, grids = pixels()
    return dict(input_ids=ids, attention_mask=mask, roles=roles, pixel_values=pv, image_grid_thw=grids)


def hf_attentions(hf, batch, grad=False):
    ids = batch["input_ids"]
    with torch.set_grad_enabled(grad):
        out = hf(input_ids=ids, attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"],
                 image_grid_thw=batch["image_grid_thw"], mm_token_type_ids=(ids == TINY_IDS["image_token_id"]).int(),
                 output_attentions=True)
    return out.attentions, out.logits  # L x (B, H, T, T)


def load_hf(path, impl="eager"):
    from transformers import Qwen2_5_VLForConditionalGeneration
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(path, attn_implementation=impl,
                                                              dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_eager(hf_untied):
    return load_hf(hf_untied[1])


# ------------------------------------------------------------------- references, written out


def ref_query(roles_row, query):
    """Query positions of one row, from the role list itself (an independent reading of the doc)."""
    r = roles_row.tolist()
    first = r.index(RESPONSE) if RESPONSE in r else len(r)
    if query == "response":
        return [i for i, x in enumerate(r) if x == RESPONSE]
    keep = (USER, IMAGE) if query == "user" else (USER,)
    return [i for i in range(first) if r[i] in keep]


def ref_vas(attns, roles, query="user", layers=None):
    """(VAS, per-layer (L,), per-head (L, H), per-sample dict) straight from full attention matrices."""
    layers = list(range(len(attns))) if layers is None else layers
    per_sample, per_lh = {}, {}
    for b in range(roles.shape[0]):
        V = (roles[b] == IMAGE).nonzero().flatten()
        S = (roles[b] == SYSTEM).nonzero().flatten()
        Q = torch.tensor(ref_query(roles[b], query))
        if len(V) == 0 or len(S) == 0 or len(Q) == 0:
            continue
        lh = []
        for l in layers:
            A = attns[l][b].double()[:, Q]  # (H, |Q|, T)
            lh.append((A[:, :, V].sum(-1) / A[:, :, S].sum(-1)).mean(-1))  # VAS_i(l,h) mean over i: (H,)
        per_lh[b] = torch.stack(lh)  # (L, H)
        per_sample[b] = per_lh[b].mean()
    per_head = torch.stack(list(per_lh.values())).mean(0)
    return torch.stack(list(per_sample.values())).mean(), per_head.mean(1), per_head, per_sample


def ref_visual_reward(attns, roles, layers, eps=EPS):
    out = []
    for b in range(roles.shape[0]):
        V = (roles[b] == IMAGE).nonzero().flatten()
        S = (roles[b] == SYSTEM).nonzero().flatten()
        R = (roles[b] == RESPONSE).nonzero().flatten()
        if len(V) == 0 or len(R) == 0:
            out.append(torch.tensor(0.0, dtype=torch.float64))
            continue
        per_token = 0
        for l in layers:
            A = attns[l][b].double().mean(0)  # head mean (T, T)
            per_token = per_token + A[R][:, V].sum(-1) / (A[R][:, S].sum(-1) + eps)
        out.append((per_token / len(layers)).mean())
    return torch.stack(out)


def ref_guided(attns, roles, layers=None, eps=EPS):
    """(enhance sum, suppress sum, n image samples) of (4b) over the image samples, with grad."""
    layers = list(range(len(attns))) if layers is None else layers
    enh, sup, n = 0, 0, 0
    for b in range(roles.shape[0]):
        V = (roles[b] == IMAGE).nonzero().flatten()
        S = (roles[b] == SYSTEM).nonzero().flatten()
        Q = torch.tensor(ref_query(roles[b], "user"))
        if len(V) == 0:
            continue
        n += 1
        e = s = 0
        for l in layers:
            A = attns[l][b][:, Q]  # (H, |Q|, T)
            e = e - torch.log(A[:, :, V].sum((1, 2)) / (len(Q) * len(V))).mean()
            s = s + torch.log(A[:, :, S].sum((1, 2)) / (len(Q) * len(S)) + eps).mean()
        enh, sup = enh + e / len(layers), sup + s / len(layers)
    return enh, sup, n


# ----------------------------------------------------------------------------------- VAS


@pytest.mark.parametrize("padding", ["right", "left"])
def test_vas_and_breakdown_match_full_attention(hf_untied, hf_eager, tok, padding):
    _, path = hf_untied
    hf, m = hf_eager, from_pretrained(path, dtype=torch.float32).eval()
    batch = make_batch(tok, padding)
    attns, _ = hf_attentions(hf, batch)
    for query in ("user", "user_text", "response"):
        ref, ref_layer, ref_head, ref_sample = ref_vas(attns, batch["roles"], query)
        res = measure_vas(m, batch, query=query, chunk_size=7)  # chunks smaller than the query set
        assert abs(res.vas - ref.item()) < 1e-5, (query, res.vas, ref.item())
        assert torch.allclose(res.per_layer.double(), ref_layer, atol=1e-5)
        assert torch.allclose(res.per_head.double(), ref_head, atol=1e-5)
        assert res.counted.tolist() == [True, True, False]  # the text-only row does not count
        for b, v in ref_sample.items():
            assert abs(res.per_sample[b].item() - v.item()) < 1e-5
    # a layer subset, default chunking, and re-selecting a query set from recorded rows
    ref, ref_layer, _, _ = ref_vas(attns, batch["roles"], "user", layers=[0, 2])
    res = measure_vas(m, batch, layers=[0, 2])
    assert res.layers == [0, 2] and abs(res.vas - ref.item()) < 1e-5
    stats = AttentionStats(batch["roles"], query_mask(batch["roles"], "user"))
    m(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["image_grid_thw"], attn_ctl=stats)
    ref_text = ref_vas(attns, batch["roles"], "user_text")[0]
    assert abs(vas(stats, query="user_text").vas - ref_text.item()) < 1e-5
    with pytest.raises(ValueError):
        vas(stats, query="response")  # response rows were not recorded


def test_visual_reward_matches_full_attention(hf_untied, hf_eager, tok):
    _, path = hf_untied
    hf, m = hf_eager, from_pretrained(path, dtype=torch.float32).eval()
    batch = make_batch(tok, "left")
    attns, _ = hf_attentions(hf, batch)
    args = (batch["input_ids"], batch["attention_mask"], batch["roles"], batch["pixel_values"], batch["image_grid_thw"])
    r = visual_reward(m, *args)  # default layers 0-7, clipped to the model's 3
    ref = ref_visual_reward(attns, batch["roles"], [0, 1, 2])
    assert r.shape == (3,) and r.dtype == torch.float32
    assert torch.allclose(r.double(), ref, atol=1e-5, rtol=1e-5), (r, ref)
    assert r[2] == 0 and r[0] > 0  # no image -> 0
    r01 = visual_reward(m, *args, layers=[0, 1], chunk_size=2)
    assert torch.allclose(r01.double(), ref_visual_reward(attns, batch["roles"], [0, 1]), atol=1e-5, rtol=1e-5)
    no_resp = make_batch(tok, "left", with_response=False)  # prompts only: no response rows -> 0
    r0 = visual_reward(m, no_resp["input_ids"], no_resp["attention_mask"], no_resp["roles"],
                       no_resp["pixel_values"], no_resp["image_grid_thw"])
    assert torch.equal(r0, torch.zeros(3))


# ------------------------------------------------------------------ attention-guided loss


def guided_total(enh_sum, sup_sum, n, logits, keep):
    """Both attention terms, plus a small term on the logits so that every parameter gets a gradient."""
    return 0.7 * enh_sum / n + 1.3 * sup_sum / n + 0.01 * logits[keep].logsumexp(-1).mean()


_GUIDED_REF = {}


def guided_reference(hf, batch, layers):
    """Loss terms, VAS and gradients (by our parameter names) of the full-matrix reference, cached."""
    key = tuple(layers or ())
    if key not in _GUIDED_REF:
        attns, logits = hf_attentions(hf, batch, grad=True)
        enh, sup, n = ref_guided(attns, batch["roles"], layers)
        names, params = zip(*hf.named_parameters())
        grads = torch.autograd.grad(guided_total(enh, sup, n, logits, batch["attention_mask"].bool()), params)
        v = ref_vas([a.detach() for a in attns], batch["roles"], "user", layers)[0]
        _GUIDED_REF[key] = (enh.item(), sup.item(), n, v.item(),
                            {normalise_name(k): g for k, g in zip(names, grads)})
    return _GUIDED_REF[key]


@pytest.mark.parametrize("ckpt,chunk,layers", [(False, None, None), (False, 5, [0, 2]), (True, 5, None)])
def test_guided_loss_and_gradients_match_full_attention(hf_untied, hf_eager, tok, ckpt, chunk, layers):
    _, path = hf_untied
    m = from_pretrained(path, dtype=torch.float32)
    m.set_gradient_checkpointing(ckpt)
    batch = make_batch(tok, "right")
    enh, sup, n, ref_v, ref_grads = guided_reference(hf_eager, batch, layers)

    ctl = AttentionGuidedLoss(batch["roles"], layers=layers, chunk_size=chunk)
    out = m(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["image_grid_thw"], attn_ctl=ctl)
    t = ctl.terms()
    assert t.n_image == n == 2
    assert abs(t.enhance_sum.item() - enh) < 1e-5 and abs(t.suppress_sum.item() - sup) < 1e-5
    assert t.vas_n == 2 and abs(t.vas_sum / t.vas_n - ref_v) < 1e-5  # logged VAS, from the same masses
    names, params = zip(*m.named_parameters())
    grads = torch.autograd.grad(guided_total(t.enhance_sum, t.suppress_sum, t.n_image, out,
                                             batch["attention_mask"].bool()), params)
    assert set(names) == set(ref_grads)
    for name, g in zip(names, grads):
        g_ref = ref_grads[name]
        tol = 1e-5 + 1e-4 * g_ref.abs().max().item()
        assert (g - g_ref).abs().max().item() < tol, (name, (g - g_ref).abs().max().item())


def test_guided_loss_without_images_is_zero_and_connected(hf_untied, tok):
    _, path = hf_untied
    m = from_pretrained(path, dtype=torch.float32)
    batch = make_batch(tok, "right")
    sl = slice(2, 3)  # the text-only row alone
    ctl = AttentionGuidedLoss(batch["roles"][sl])
    m(batch["input_ids"][sl], batch["attention_mask"][sl], attn_ctl=ctl)
    t = ctl.terms()
    assert t.n_image == 0 and t.vas_n == 0 and t.enhance_sum.item() == 0 and t.suppress_sum.item() == 0
    (t.enhance + t.suppress).backward()  # no NaN from log(0) of a sample without image tokens
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


# --------------------------------------------------------------------------- intervention

REF = {"scale": None, "layers": None}


def ref_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kw):
    """transformers' eager attention with the paper's logit rescaling written in (text layers only)."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (Qwen2_5_VLAttention, eager_attention_forward,
                                                                    repeat_kv)
    if not isinstance(module, Qwen2_5_VLAttention) or REF["scale"] is None or module.layer_idx not in REF["layers"]:
        return eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout, **kw)
    k = repeat_kv(key, module.num_key_value_groups)
    v = repeat_kv(value, module.num_key_value_groups)
    z = torch.matmul(query, k.transpose(2, 3)) * scaling  # (B, H, Tq, Tk)
    z = z * REF["scale"][:, None, None, : z.shape[-1]]  # Z' = Z (1 + a_img M_img - a_sys M_sys)
    z = z.masked_fill(~attention_mask, float("-inf")) if attention_mask.dtype == torch.bool else z + attention_mask
    p = torch.softmax(z, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(p, v).transpose(1, 2).contiguous(), p


@pytest.fixture(scope="module")
def hf_ref(hf_untied):
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import eager_mask
    AttentionInterface.register("avar_ref", ref_attention)
    AttentionMaskInterface.register("avar_ref", eager_mask)
    return load_hf(hf_untied[1], "avar_ref")


def test_intervention_matches_reference_logits_and_vas(hf_untied, hf_ref, tok):
    _, path = hf_untied
    m = from_pretrained(path, dtype=torch.float32).eval()
    batch = make_batch(tok, "left")
    roles, keep = batch["roles"], batch["attention_mask"].bool()
    a_img, a_sys, layers = 0.15, 0.4, [0, 2]
    scale = torch.ones(roles.shape)
    scale[roles == IMAGE], scale[roles == SYSTEM] = 1 + a_img, 1 - a_sys
    REF.update(scale=scale, layers=layers)
    try:
        attns, ref_logits = hf_attentions(hf_ref, batch)
    finally:
        REF.update(scale=None, layers=None)
    plain = hf_attentions(hf_ref, batch)[1]
    assert (ref_logits[keep] - plain[keep]).abs().max() > 1e-3  # the intervention does something
    args = (batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["image_grid_thw"])
    for impl in ("eager", "sdpa"):
        m.attn_impl = impl
        with torch.no_grad():
            out = m(*args, attn_ctl=Intervention(roles, a_img, a_sys, layers))
        assert (out[keep] - ref_logits[keep]).abs().max().item() < 1e-4, impl
        # VAS measured under the intervention (AttentionStats delegates key_scale to it)
        res = measure_vas(m, batch, intervention=Intervention(roles, a_img, a_sys, layers), chunk_size=6)
        assert abs(res.vas - ref_vas(attns, roles)[0].item()) < 1e-5, impl


def test_zero_intervention_and_observing_are_bitwise_identity(hf_untied, tok):
    _, path = hf_untied
    m = from_pretrained(path, dtype=torch.float32).eval()
    for padding in ("left", "right"):
        batch = make_batch(tok, padding)
        roles = batch["roles"]
        args = (batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["image_grid_thw"])
        zero = Intervention(roles, 0.0, 0.0)
        assert zero.key_scale(0) is None
        assert Intervention(roles, 0.15, 0.0, layers=[1]).key_scale(0) is None
        for impl in ("eager", "sdpa"):
            m.attn_impl = impl
            with torch.no_grad():
                base = m(*args)
                assert torch.equal(base, m(*args, attn_ctl=zero))
                stats = AttentionStats(roles, query_mask(roles), intervention=zero)
                assert torch.equal(base, m(*args, attn_ctl=stats))  # measuring changes nothing


def test_generation_with_intervention_equals_full_forward(hf_untied, tok):
    _, path = hf_untied
    m = from_pretrained(path, dtype=torch.float32).eval()
    rows = encode_rows(tok, with_response=False)
    prompts, roles_list = [r["input_ids"] for r in rows], [r["roles"] for r in rows]
    pv, grids = pixels()
    a_img, a_sys, N = 0.15, 0.4, 6
    B, L = len(prompts), max(map(len, prompts))
    ids = torch.full((B, L), PAD)
    mask = torch.zeros(B, L, dtype=torch.bool)
    roles = torch.full((B, L), PAD_ROLE)
    for b, (p, r) in enumerate(zip(prompts, roles_list)):  # left padding, as generate does
        ids[b, L - len(p):], mask[b, L - len(p):], roles[b, L - len(p):] = p, True, r
    for impl in ("eager", "sdpa"):
        m.attn_impl = impl
        factory = Intervention.for_generation(roles_list, a_img, a_sys)
        tokens, lengths = m.generate(prompts, pv, grids, max_new_tokens=N, stop_ids=(), pad_id=PAD,
                                     attn_ctl_factory=factory)
        assert (lengths == N).all()
        tokens2, _ = m.generate(prompts, pv, grids, max_new_tokens=N, stop_ids=(), pad_id=PAD,
                                attn_ctl_factory=Intervention.for_generation(roles, a_img, a_sys))
        assert torch.equal(tokens, tokens2)  # left-padded roles tensor: same controller
        full_ids = torch.cat([ids, tokens], 1)
        full_mask = torch.cat([mask, torch.ones(B, N, dtype=torch.bool)], 1)
        full_roles = torch.cat([roles, torch.full((B, N), RESPONSE)], 1)
        with torch.no_grad():
            full = m(full_ids, full_mask, pv, grids, attn_ctl=Intervention(full_roles, a_img, a_sys))
            assert torch.equal(full[:, L - 1:L - 1 + N].argmax(-1), tokens)  # greedy, step by step
            # the same through the KV cache, token by token: logits equal the full forward's
            cache = KVCache(m.cfg, B, L + N, torch.float32, "cpu")
            ctl = factory(cache.max_len, ids, mask)
            steps = [m(ids, mask, pv, grids, cache=cache, attn_ctl=ctl)]
            for j in range(N):
                steps.append(m(tokens[:, j:j + 1], cache=cache, attn_ctl=ctl))
        inc = torch.cat(steps, 1)
        assert (inc[full_mask] - full[full_mask]).abs().max().item() < 1e-5, impl
        with torch.no_grad():
            plain = m(full_ids, full_mask, pv, grids)
        assert (plain[full_mask] - full[full_mask]).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------- CLI


def test_cli_writes_readable_heatmap_figure(hf_untied, tmp_path):
    from PIL import Image
    from data import ImageProcessor

    _, path = hf_untied
    d = tmp_path / "tiny"
    save_pretrained(from_pretrained(path, dtype=torch.float32), str(d))
    make_byte_tokenizer(str(d))
    ImageProcessor(min_pixels=3136, max_pixels=28 * 28 * 12).save(str(d))
    img = tmp_path / "img.png"
    g = torch.Generator().manual_seed(0)
    Image.fromarray(torch.randint(0, 256, (70, 100, 3), generator=g, dtype=torch.uint8).numpy()).save(img)
    out = tmp_path / "heat.png"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "vas.py"), "--model", str(d), "--image", str(img),
                        "--question", "What is this?", "--layers", "0-1", "--a-img", "0.15", "--a-sys", "0.05",
                        "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "VAS" in r.stdout and "narrow" in r.stdout  # a random tiny model looks narrowly
    assert sum(line.split()[0] in ("0", "1") for line in r.stdout.splitlines() if line.strip()) == 2
    with Image.open(out) as im:  # image | map | overlay, 336 px each, and the colour scale
        assert im.size == (3 * 336 + 4 * 12 + 24 + 90, 336 + 28 + 30) and im.format == "PNG"
        # the first panel is the image itself, upsampled without interpolation
        panel = im.convert("RGB").crop((12, 28, 12 + 336, 28 + 336))
        with Image.open(img) as src:
            assert panel.tobytes() == src.convert("RGB").resize((336, 336), Image.NEAREST).tobytes()


# ------------------------------------------------------------------ bounded attention ratios


def ref_query_shares(attns, roles, layers):
    """s_q^{l,h} = sum_{k in S} A_qk for each user-turn query of each image sample: {b: (L, H, |Q|)}."""
    out = {}
    for b in range(roles.shape[0]):
        V, S = (roles[b] == IMAGE).nonzero().flatten(), (roles[b] == SYSTEM).nonzero().flatten()
        if len(V) == 0:
            continue
        Q = torch.tensor(ref_query(roles[b], "user"))
        out[b] = torch.stack([attns[l][b].double()[:, Q][:, :, S].sum(-1) for l in layers])
    return out


def test_suppress_floor_matches_hand_computed_terms(hf_untied, hf_eager, tok):
    """log(max(s, f)/|S| + eps) + mean_q relu(log(f + eps) - log(s_q + eps)) per layer and head,
    from full attention matrices: the paper's term while every query keeps s_q >= f; floor 0 is the paper's."""
    _, path = hf_untied
    m = from_pretrained(path, dtype=torch.float32)
    batch = make_batch(tok, "right")
    attns, _ = hf_attentions(hf_eager, batch, grad=True)
    layers = [0, 1, 2]
    sq = ref_query_shares(attns, batch["roles"], layers)
    n_sys = {b: int((batch["roles"][b] == SYSTEM).sum()) for b in sq}
    values = torch.cat([s.detach().flatten() for s in sq.values()]).sort().values
    k = len(values) // 2
    floor = float(values[k - 1] + values[k]) / 2  # half the rows below, none at the kink of the relu

    def terms(sys_floor):
        ctl = AttentionGuidedLoss(batch["roles"], sys_floor=sys_floor)
        m(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["image_grid_thw"], attn_ctl=ctl)
        return ctl.terms()

    def ref(sys_floor):
        total = 0
        for b, s in sq.items():
            paper = torch.log(torch.clamp(s.mean(-1), min=sys_floor) / n_sys[b] + EPS).mean()
            pull = torch.relu(math.log(sys_floor + EPS) - torch.log(s + EPS)).mean(-1).mean() if sys_floor else 0
            total = total + paper + pull
        return total

    paper, floored = terms(0.0), terms(floor)
    assert abs(paper.suppress_sum.item() - ref(0.0).item()) < 1e-5
    assert abs(floored.suppress_sum.item() - ref(floor).item()) < 1e-5
    assert floored.suppress_sum.item() > paper.suppress_sum.item()
    assert torch.equal(floored.enhance_sum, paper.enhance_sum)  # the floor touches the suppress term only
    low = terms(1e-9)  # a floor under every query: exactly the paper's term
    assert torch.equal(low.suppress_sum, paper.suppress_sum) and low.floor_n == 0
    # what the trainer logs: the mean share, and the query rows at or below the floor (1% margin)
    ref_share = sum(s.detach().mean(-1).mean().item() for s in sq.values())
    assert abs(floored.sys_share_sum - ref_share) < 1e-5
    ref_floor = sum((s.detach() <= 1.01 * floor).double().mean().item() for s in sq.values())
    assert abs(floored.floor_n - ref_floor) < 1e-6
    assert 0 < floored.floor_n < floored.n_image and paper.floor_n == 0  # the random model is far above eps
    # the gradients of the floored term, against autograd through the full matrices
    params = [p for p in m.parameters() if p.requires_grad]
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    g = dict(zip(names, torch.autograd.grad(floored.suppress_sum, params, allow_unused=True)))
    hf_names, hf_params = zip(*hf_eager.named_parameters())
    g_ref = dict(zip(hf_names, torch.autograd.grad(ref(floor), hf_params, allow_unused=True)))
    g_ref = {normalise_name(k): v for k, v in g_ref.items()}
    for name, v in g.items():
        r = g_ref[name]
        if v is None or r is None:
            assert (v is None or v.abs().max() == 0) and (r is None or r.abs().max() == 0), name
            continue
        assert (v - r).abs().max().item() < 1e-5 + 1e-4 * r.abs().max().item(), name
    with pytest.raises(ValueError, match="sys_floor"):
        AttentionGuidedLoss(batch["roles"], sys_floor=1.0)


def test_visual_reward_share_form_is_bounded_and_hand_computed(hf_untied, hf_eager, tok):
    _, path = hf_untied
    m = from_pretrained(path, dtype=torch.float32).eval()
    batch = make_batch(tok, "left")
    attns, _ = hf_attentions(hf_eager, batch)
    args = (batch["input_ids"], batch["attention_mask"], batch["roles"], batch["pixel_values"], batch["image_grid_thw"])
    share = visual_reward(m, *args, form="share")
    for b in range(2):  # the image rows; the text-only row stays 0
        roles = batch["roles"][b]
        V, S, R = [(roles == r).nonzero().flatten() for r in (IMAGE, SYSTEM, RESPONSE)]
        per_token = 0
        for l in range(3):
            A = attns[l][b].double().mean(0)
            v, s = A[R][:, V].sum(-1), A[R][:, S].sum(-1)
            per_token = per_token + v / (v + s + EPS)
        assert abs(share[b].item() - (per_token / 3).mean().item()) < 1e-5
    assert share[2] == 0 and bool(((share >= 0) & (share < 1)).all())
    ratio = visual_reward(m, *args, form="ratio")
    assert torch.equal(ratio, visual_reward(m, *args))  # the paper's ratio stays the default
    assert bool((share[:2] < ratio[:2]).all())  # share = ratio / (1 + ratio) token by token: smaller
    with pytest.raises(ValueError, match="form"):
        visual_reward(m, *args, form="log")
