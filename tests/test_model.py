"""model.py against transformers' Qwen2.5-VL on tiny random checkpoints (the reference)."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import TINY_IDS, make_hf_model
from model import Config, KVCache, Qwen2_5_VL, from_pretrained, save_pretrained

IMG, VS, VE = TINY_IDS["image_token_id"], TINY_IDS["vision_start_token_id"], TINY_IDS["vision_end_token_id"]
PAD = 256


def image_run(grid):
    t, h, w = grid
    return [VS] + [IMG] * (t * h * w // 4) + [VE]


def make_batch(padding="left", seed=0):
    """Three rows: two images of different sizes (one grid not divisible by the window), no image,
    one image; padded on the left or right to a common length."""
    g = torch.Generator().manual_seed(seed)
    grids = [(1, 10, 18), (1, 6, 4), (1, 4, 8)]
    rows = [
        [1, 2, 3] + image_run(grids[0]) + [5, 6] + image_run(grids[1]) + [7, 8, 9],
        [11, 12, 13, 14, 15, 16, 17],
        [21] + image_run(grids[2]) + [22, 23, 24, 25],
    ]
    L = max(map(len, rows))
    ids = torch.full((3, L), PAD)
    mask = torch.zeros(3, L, dtype=torch.long)
    for b, r in enumerate(rows):
        sl = slice(L - len(r), L) if padding == "left" else slice(0, len(r))
        ids[b, sl] = torch.tensor(r)
        mask[b, sl] = 1
    grid_t = torch.tensor([grids[0], grids[1], grids[2]])
    pv = torch.randn(int(grid_t.prod(-1).sum()), 1176, generator=g)
    return ids, mask, pv, grid_t


def hf_logits(hf, ids, mask, pv, grids):
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grids,
                  mm_token_type_ids=(ids == IMG).int()).logits


@pytest.mark.parametrize("which", ["hf_untied", "hf_tied"])
@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("impl,batched", [("sdpa", False), ("eager", False), ("sdpa", True)])
def test_logits_match_transformers(request, which, padding, impl, batched):
    hf, path = request.getfixturevalue(which)
    m = from_pretrained(path, dtype=torch.float32).eval()
    m.attn_impl, m.visual.batched_attention = impl, batched
    ids, mask, pv, grids = make_batch(padding)
    ref = hf_logits(hf, ids, mask, pv, grids)
    with torch.no_grad():
        out = m(ids, mask, pv, grids)
    keep = mask.bool()
    err = (ref[keep] - out[keep]).abs().max().item()
    assert err < 1e-4, err
    if impl == "sdpa" and not batched and padding == "right":
        # same kernels in the same order as the reference: bitwise equal
        assert torch.equal(ref[keep], out[keep])


def test_bfloat16_close(hf_untied, tmp_path):
    hf, path = hf_untied
    from transformers import Qwen2_5_VLForConditionalGeneration
    hf16 = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    m = from_pretrained(path, dtype=torch.bfloat16).eval()
    assert m.lm_head.weight.dtype == torch.bfloat16
    ids, mask, pv, grids = make_batch("right")
    ref = hf_logits(hf16, ids, mask, pv, grids).float()
    with torch.no_grad():
        out = m(ids, mask, pv, grids).float()
    keep = mask.bool()
    # bf16 has 8 mantissa bits; logits here are O(1): 2e-2 is a few bf16 ulps
    assert (ref[keep] - out[keep]).abs().max().item() < 2e-2


def test_name_layouts_and_shards(hf_untied, tmp_path):
    hf, path = hf_untied
    sd = load_file(os.path.join(path, "model.safetensors"))
    ren = {}
    for k, v in sd.items():  # the newer layout: model.visual.*, model.language_model.*
        if k.startswith("visual."):
            k = "model." + k
        elif k.startswith("model."):
            k = "model.language_model." + k[len("model."):]
        ren[k] = v
    new = tmp_path / "new_layout"
    new.mkdir()
    save_file(ren, new / "model.safetensors", metadata={"format": "pt"})
    (new / "config.json").write_text(open(os.path.join(path, "config.json")).read())
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="50KB")
    assert os.path.exists(sharded / "model.safetensors.index.json")
    assert len({v for v in json.load(open(sharded / "model.safetensors.index.json"))["weight_map"].values()}) > 2
    ids, mask, pv, grids = make_batch("left")
    ref = hf_logits(hf, ids, mask, pv, grids)
    for p in (new, sharded):
        m = from_pretrained(str(p), dtype=torch.float32).eval()
        with torch.no_grad():
            out = m(ids, mask, pv, grids)
        assert (ref[mask.bool()] - out[mask.bool()]).abs().max() < 1e-4


def test_bad_checkpoint_names_every_problem(hf_untied, tmp_path):
    _, path = hf_untied
    sd = load_file(os.path.join(path, "model.safetensors"))
    sd.pop("model.layers.0.mlp.up_proj.weight")
    sd["model.layers.0.extra.weight"] = torch.zeros(2)
    sd["model.norm.weight"] = torch.zeros(3)
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(sd, bad / "model.safetensors")
    (bad / "config.json").write_text(open(os.path.join(path, "config.json")).read())
    with pytest.raises(ValueError) as e:
        from_pretrained(str(bad))
    msg = str(e.value)
    assert "model.layers.0.mlp.up_proj.weight" in msg and "model.layers.0.extra.weight" in msg
    assert "model.norm.weight" in msg


@pytest.mark.parametrize("tie", [False, True])
def test_save_pretrained_loads_in_transformers(tie, tmp_path):
    hf = make_hf_model(tie=tie, seed=3)
    hf.save_pretrained(tmp_path / "ref")
    m = from_pretrained(str(tmp_path / "ref"), dtype=torch.float32)
    save_pretrained(m, str(tmp_path / "ours"), max_shard_bytes=40_000)  # forces several shards
    assert os.path.exists(tmp_path / "ours" / "model.safetensors.index.json")
    from transformers import Qwen2_5_VLForConditionalGeneration
    back = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "ours", dtype=torch.float32,
                                                              attn_implementation="sdpa").eval()
    assert back.config.tie_word_embeddings == tie
    ids, mask, pv, grids = make_batch("left")
    a, b = hf_logits(hf, ids, mask, pv, grids), hf_logits(back, ids, mask, pv, grids)
    assert torch.equal(a[mask.bool()], b[mask.bool()])
    again = from_pretrained(str(tmp_path / "ours"), dtype=torch.float32)  # and back here
    assert all(torch.equal(x, y) for x, y in zip(m.state_dict().values(), again.state_dict().values()))


def test_real_shapes_load_from_flat_and_nested_configs():
    """The 3B (tied), 7B and 72B configs build (on the meta device) with the published sizes."""
    shapes = {"3B": (2048, 36, 16, 2, 11008, 151936, True, 3.75e9),
              "7B": (3584, 28, 28, 4, 18944, 152064, False, 8.29e9),
              "72B": (8192, 80, 64, 8, 29568, 152064, False, 73.4e9)}
    for name, (D, L, H, KV, I, V, tie, params) in shapes.items():
        flat = {"hidden_size": D, "num_hidden_layers": L, "num_attention_heads": H, "num_key_value_heads": KV,
                "intermediate_size": I, "vocab_size": V, "tie_word_embeddings": tie, "rope_theta": 1e6,
                "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
                "vision_config": {"depth": 32, "hidden_size": 1280, "num_heads": 16, "intermediate_size": 3420,
                                  "out_hidden_size": D, "in_chans": 3, "fullatt_block_indexes": [7, 15, 23, 31],
                                  "window_size": 112, "spatial_merge_size": 2, "patch_size": 14,
                                  "temporal_patch_size": 2}}
        nested = {"text_config": {k: v for k, v in flat.items() if k != "vision_config"},
                  "vision_config": flat["vision_config"], "tie_word_embeddings": tie}
        for d in (flat, nested):
            cfg = Config.from_dict(d)
            assert (cfg.head_dim, cfg.tie_word_embeddings) == (128, tie)
            with torch.device("meta"):
                m = Qwen2_5_VL(cfg)
            n = sum(p.numel() for p in m.parameters())  # shared tied weights count once
            assert abs(n - params) / params < 0.01, (name, n)


def test_prefill_plus_cached_decode_equals_full_forward(hf_untied):
    _, path = hf_untied
    m = from_pretrained(path, dtype=torch.float32).eval()
    ids, mask, pv, grids = make_batch("left")
    extra = torch.tensor([[30, 31, 32, 33], [40, 41, 42, 43], [50, 51, 52, 53]])
    full_ids = torch.cat([ids, extra], 1)
    full_mask = torch.cat([mask, torch.ones_like(extra)], 1)
    for impl in ("sdpa", "eager"):
        m.attn_impl = impl
        with torch.no_grad():
            full = m(full_ids, full_mask, pv, grids)
            cache = KVCache(m.cfg, 3, full_ids.shape[1] + 2, torch.float32, "cpu")
            steps = [m(ids, mask, pv, grids, cache=cache)]
            for j in range(extra.shape[1]):
                steps.append(m(extra[:, j:j + 1], cache=cache))
        inc = torch.cat(steps, 1)
        keep = full_mask.bool()
        assert (full[keep] - inc[keep]).abs().max() < 1e-5


def test_greedy_generation_equals_transformers(hf_untied):
    hf, path = hf_untied
    m = from_pretrained(path, dtype=torch.float32).eval()
    ids, mask, pv, grids = make_batch("left")
    prompts = [ids[b][mask[b].bool()] for b in range(3)]
    stop = (TINY_IDS["eos_token_id"], PAD)
    for impl in ("sdpa", "eager"):
        m.attn_impl = impl
        tokens, lengths = m.generate(prompts, pv, grids, max_new_tokens=12, stop_ids=stop, pad_id=PAD, banned_ids=())
        with torch.no_grad():
            ref = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grids,
                              mm_token_type_ids=(ids == IMG).int(), do_sample=False, repetition_penalty=1.0,
                              max_new_tokens=12, eos_token_id=list(stop), pad_token_id=PAD)
        ref = ref[:, ids.shape[1]:]
        for b in range(3):
            n = int(lengths[b])
            assert tokens[b, :n].tolist() == ref[b, :n].tolist()
            assert (ref[b, n:] == PAD).all()


def test_sampling_is_seeded_and_respects_vocab_limit(hf_untied):
    _, path = hf_untied
    m = from_pretrained(path, dtype=torch.float32).eval()
    ids, mask, pv, grids = make_batch("left")
    prompts = [ids[b][mask[b].bool()] for b in range(3)]
    kw = dict(max_new_tokens=20, temperature=1.5, top_p=0.95, stop_ids=(), vocab_limit=200)
    a, la = m.generate(prompts, pv, grids, seed=7, **kw)
    b, lb = m.generate(prompts, pv, grids, seed=7, **kw)
    c, _ = m.generate(prompts, pv, grids, seed=8, **kw)
    assert torch.equal(a, b) and torch.equal(la, lb) and not torch.equal(a, c)
    assert (a < 200).all() and (la == 20).all()


def test_banned_ids_and_samples_from_one_prefill(hf_untied):
    """Vision placeholders are never drawn (even when they are the argmax); num_samples copies the
    cache after one prefill and equals generating from repeated prompts."""
    _, path = hf_untied
    m = from_pretrained(path, dtype=torch.float32).eval()
    ids, mask, pv, grids = make_batch("left")
    prompts = [ids[b][mask[b].bool()] for b in range(3)]
    with torch.no_grad():
        m.lm_head.weight[IMG] = m.lm_head.weight[IMG] * 0 + 5.0  # make <|image_pad|> the favourite
    raw, _ = m.generate(prompts, pv, grids, max_new_tokens=6, stop_ids=(), banned_ids=())
    assert (raw == IMG).any()
    toks, _ = m.generate(prompts, pv, grids, max_new_tokens=6, stop_ids=(), temperature=1.0, seed=0)
    assert not torch.isin(toks, torch.tensor([IMG, VS, VE, TINY_IDS["video_token_id"]])).any()
    calls = []
    m.visual.register_forward_hook(lambda *a: calls.append(1))
    g, gl = m.generate(prompts, pv, grids, max_new_tokens=6, stop_ids=(TINY_IDS["eos_token_id"],), num_samples=3)
    assert len(calls) == 1 and g.shape == (9, 6)
    # greedy: every sample of a prompt equals the prompt's own greedy continuation
    single, sl = m.generate(prompts, pv, grids, max_new_tokens=6, stop_ids=(TINY_IDS["eos_token_id"],))
    assert torch.equal(g, single.repeat_interleave(3, 0)) and torch.equal(gl, sl.repeat_interleave(3))
    s1, _ = m.generate(prompts, pv, grids, max_new_tokens=6, temperature=1.0, seed=3, num_samples=4, stop_ids=())
    assert not all(torch.equal(s1[0], s1[i]) for i in range(1, 4))  # samples of one prompt differ


def test_vision_tower_runs_once_per_generate(hf_untied):
    _, path = hf_untied
    m = from_pretrained(path, dtype=torch.float32).eval()
    calls = []
    m.visual.register_forward_hook(lambda *a: calls.append(1))
    ids, mask, pv, grids = make_batch("left")
    m.generate([ids[b][mask[b].bool()] for b in range(3)], pv, grids, max_new_tokens=5, stop_ids=())
    assert len(calls) == 1


def test_gradient_checkpointing_same_gradients(hf_untied):
    _, path = hf_untied
    ids, mask, pv, grids = make_batch("right")
    grads = []
    for ckpt in (False, True):
        m = from_pretrained(path, dtype=torch.float32)
        m.set_gradient_checkpointing(ckpt)
        m(ids, mask, pv, grids)[mask.bool()].logsumexp(-1).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
