"""The fast paths equal their readable references (CPU): batched vision windows vs the per-window
loop, the compiled / cached decode step vs the eager full forward."""

import torch

from conftest import TINY_IDS
from model import KVCache, from_pretrained, segment_attention, vision_windows
from test_model import make_batch


def test_batched_segments_equal_loop():
    torch.manual_seed(0)
    grid = torch.tensor([[1, 10, 18], [1, 6, 4], [1, 30, 2]])  # edge windows of every size
    _, cu = vision_windows(grid, 2, 112, 14)
    n, h, d = int(cu[-1]), 3, 16
    q, k, v = (torch.randn(n, h, d) for _ in range(3))
    loop = segment_attention(q, k, v, cu, d ** -0.5, batched=False)
    batched = segment_attention(q, k, v, cu, d ** -0.5, batched=True)
    assert len(cu) == 12  # 6 + 1 + 4 windows, edge windows of sizes 16, 8, 4, 12
    assert (loop - batched).abs().max() < 1e-6


def test_batched_vision_tower_equals_loop(hf_untied):
    _, path = hf_untied
    m = from_pretrained(path, dtype=torch.float32).eval()
    _, _, pv, grids = make_batch()
    with torch.no_grad():
        a = m.visual(pv, grids)
        m.visual.batched_attention = True
        b = m.visual(pv, grids)
    assert (a - b).abs().max() < 1e-5


def test_compiled_decode_step_is_one_graph_and_equals_eager(hf_untied):
    """The decode step traced as a single graph (fullgraph=True fails on any graph break or host
    sync) gives the eager step's logits; greedy generation through it gives the same tokens."""
    _, path = hf_untied
    m = from_pretrained(path, dtype=torch.float32).eval()
    ids, mask, pv, grids = make_batch("left")
    compiled = torch.compile(m.decode_step, fullgraph=True, dynamic=False, backend="aot_eager")
    caches = [KVCache(m.cfg, 3, ids.shape[1] + 6, torch.float32, "cpu") for _ in range(2)]
    with torch.no_grad():
        for c in caches:
            m(ids, mask, pv, grids, cache=c)
        tok = torch.tensor([[30], [31], [32]])
        for _ in range(5):
            a = m.decode_step(tok, caches[0])
            b = compiled(tok, caches[1])
            assert torch.equal(a, b)
            tok = a.argmax(-1, keepdim=True)
    prompts = [ids[b][mask[b].bool()] for b in range(3)]
    m._decode_compiled = compiled
    stop = (TINY_IDS["eos_token_id"],)
    t1, l1 = m.generate(prompts, pv, grids, max_new_tokens=8, stop_ids=stop, pad_id=256)
    t2, l2 = m.generate(prompts, pv, grids, max_new_tokens=8, stop_ids=stop, pad_id=256, compile=True)
    assert torch.equal(t1, t2) and torch.equal(l1, l2)


def test_thin_product_linear_equals_f_linear():
    """Few-row products (decode steps) go through W @ x^T: equal to F.linear up to summation order,
    contiguous, and taken only for 2..thin_rows rows."""
    import torch.nn.functional as F
    from model import Linear
    torch.manual_seed(0)
    for bias in (True, False):
        lin = Linear(96, 160, bias=bias)
        for shape in [(1, 1, 96), (4, 1, 96), (2, 3, 96), (8, 96), (9, 96), (3, 40, 96)]:
            x = torch.randn(shape)
            y, ref = lin(x), F.linear(x, lin.weight, lin.bias)
            assert y.shape == ref.shape and y.is_contiguous()
            assert (y - ref).abs().max() <= 1e-5 * ref.abs().max()
            rows = x.numel() // 96
            if 1 < rows <= Linear.thin_rows:  # the thin product, exactly
                thin = (lin.weight @ x.reshape(rows, 96).T).T.reshape(ref.shape)
                assert torch.equal(y, thin if lin.bias is None else thin + lin.bias)
            else:
                assert torch.equal(y, ref)


def test_sdpa_reads_grouped_kv_heads_like_expanded_ones():
    """The SDPA path gives K/V heads shared by query groups (enable_gqa) without expanding them:
    bitwise the same as expanding each KV head to its group, and equal to the explicit maths."""
    from model import attend
    torch.manual_seed(0)
    B, H, KV, T, d = 2, 6, 2, 9, 8
    q, k, v = torch.randn(B, H, T, d), torch.randn(B, KV, T, d), torch.randn(B, KV, T, d)
    allowed = (torch.arange(T)[None, :] <= torch.arange(T)[:, None])[None, None].repeat(B, 1, 1, 1)
    allowed[0, :, :, :2] = False  # left padding in row 0 (the diagonal stays allowed)
    allowed[0, :, torch.arange(T), torch.arange(T)] = True
    ke, ve = k.repeat_interleave(H // KV, 1), v.repeat_interleave(H // KV, 1)
    for is_causal, mask in ((False, allowed), (True, None)):  # (CPU: SDPA reads grouped heads either way)
        grouped = attend(q, k, v, mask, d ** -0.5, "sdpa", is_causal=is_causal)
        expanded = attend(q, ke, ve, mask, d ** -0.5, "sdpa", is_causal=is_causal)
        assert torch.equal(grouped, expanded)
    eager = attend(q, ke, ve, allowed, d ** -0.5, "eager")
    assert torch.equal(attend(q, k, v, allowed, d ** -0.5, "eager"), eager)  # expands grouped heads itself
    assert (attend(q, k, v, allowed, d ** -0.5, "sdpa") - eager).abs().max() < 1e-5
