"""bench/bench_gpu.py: the tiny CPU path runs every row, and its FLOP / bandwidth formulas equal
hand-computed numbers."""

import os
import re
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import bench_gpu as bg  # noqa: E402

ROWS = {"1": "SFT step, ours", "2": "decode b=1, ours", "3": "decode b=64, ours",
        "4a": "SFT step, transformers", "4b": "decode b=1, transformers", "4c": "decode b=64, transformers",
        "5a": "batched windows", "5b": "per-window loop"}


def table_rows(text):
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 5 and cells[0] not in ("#", "---"):
            rows[cells[0]] = cells
    return rows


def test_smoke_tiny_cpu_every_row(tmp_path, capsys):
    out = tmp_path / "bench_gpu.md"
    text = bg.main(["--device", "cpu", "--shape", "tiny", "--quick", "--skip-hf", "--out", str(out)])
    printed = capsys.readouterr().out
    assert out.read_text() == text
    assert text.strip() in printed  # the table is printed, after timestamped progress lines
    assert re.search(r"^\[\d\d:\d\d:\d\d \+ *\d+\.\ds\] start 1$", printed, re.M)
    rows = table_rows(text)
    assert set(rows) == set(ROWS)
    for rid, name in ROWS.items():
        _, measurement, result, efficiency, _ = rows[rid]
        assert name in measurement
        assert "ERROR" not in result, rows[rid]
        if rid.startswith("4"):
            assert result == "skipped: --skip-hf"
        else:
            assert "n/a" in efficiency  # no MFU / bound on a CPU
    assert re.match(r"[\d,.]+ tok/s", rows["1"][2])
    assert re.match(r"[\d,.]+ tok/s", rows["2"][2])
    assert re.match(r"[\d,.]+ tok/s|n/a: t\(n\) <= t\(1\)", rows["3"][2])  # may be noise-bound on a busy CPU
    assert re.match(r"[\d.]+ ms", rows["5a"][2]) and re.match(r"[\d.]+ ms", rows["5b"][2])
    for formula in ("6*N_lm*B*T", "12*L*H*T^2/2", "B*4.8e+12 B/s / (W + B*ctx*kv)", "AdamW(fused=True)"):
        assert formula in text
    assert torch.get_default_dtype() == torch.float32  # the bf16 construction restored it


def test_transformers_twin_holds_our_weights():
    """Row 4's model: transformers built from our config, our state dict loaded, same logits."""
    pytest.importorskip("transformers")
    b = bg.Bench(bg.parse_args(["--device", "cpu", "--shape", "tiny", "--quick", "--out", ""]))
    bg.sec_build(b)
    bg.sec_hf_build(b)
    assert b.model is None and b.hf is not None
    note = [n for n in b.notes if n.startswith("transformers holds our weights")][0]
    assert "argmax agreement 100%" in note
    assert float(re.search(r"max \|logit difference\| ([\d.e+-]+)", note).group(1)) < 1e-2


# ---------------------------------------------------------------------------- formulas

TINY = bg.shape_config("tiny")  # hidden 128, 2 layers, 2 heads (head_dim 64), 1 KV head, mlp 256, vocab 512


def test_lm_param_counts_by_hand():
    # per layer: q 128*128 + k, v 2*128*64 + o 128*128 + mlp 3*128*256 = 147456; 2 layers; lm_head 512*128
    assert bg.lm_matmul_params(TINY) == 2 * 147456 + 65536 == 360448
    # + per layer q/k/v biases (2+1+1)*64 and two norms 2*128; + final norm 128
    assert bg.lm_decode_params(TINY) == 360448 + 2 * (256 + 256) + 128 == 361600
    # 7B: (2*3584^2 + 2*3584*512 + 3*3584*18944) * 28 + 152064*3584
    assert bg.lm_matmul_params(bg.shape_config("7b")) == 233046016 * 28 + 544997376 == 7070285824
    # the formulas count the modules the model really builds
    for name in ("tiny", "3b"):
        cfg = bg.shape_config(name)
        with torch.device("meta"):
            m = bg.Qwen2_5_VL(cfg)
        mm = sum(p.numel() for n, p in m.named_parameters() if n.startswith("model.layers") and p.ndim == 2)
        assert bg.lm_matmul_params(cfg) == mm + m.lm_head.weight.numel()
        lm = sum(p.numel() for n, p in m.named_parameters() if not n.startswith("visual."))  # tied: counted once
        assert bg.lm_decode_params(cfg) == lm - (0 if cfg.tie_word_embeddings else m.model.embed_tokens.weight.numel())


def test_train_flops_by_hand():
    # 6 * N_lm * T + 6 * layers * hidden * T^2 (causal: 12 L H T^2 / 2), B=1, T=256
    assert bg.lm_train_flops(TINY, 1, 256) == 6 * 360448 * 256 + 6 * 2 * 128 * 256 ** 2 == 654311424
    assert bg.lm_train_flops(TINY, 3, 256) == 3 * 654311424


def test_vision_flops_by_hand():
    # tiny tower: d 64, mlp 128, depth 2 (block 1 full attention), out 128; one 16x16-patch image
    # matmuls: 2 * 256 patches * (1176*64 patch embed + 2 blocks * (3*64*64 + 64*64 + 3*64*128))
    mm = 2 * 256 * (1176 * 64 + 2 * 40960)
    # merger on 64 merged tokens: 256*256 + 256*128
    merger = 2 * 64 * (256 * 256 + 256 * 128)
    # windows of 4x4 merged tokens = 64 patches: 4 windows in block 0; the whole 256 patches in block 1
    attn = 4 * 64 * (4 * 64 ** 2 + 256 ** 2)
    assert bg.vision_fwd_flops(TINY.vision, [[1, 16, 16]]) == mm + merger + attn == 114032640
    assert bg.vision_fwd_flops(TINY.vision, [[1, 16, 16], [1, 16, 16]]) == 2 * 114032640


def test_decode_bound_by_hand():
    assert bg.kv_bytes_per_token(TINY) == 2 * 2 * 1 * 64 * 2 == 512
    # B=4, 100 cached tokens per row, 1e12 B/s: 4 tokens per (361600*2 + 4*100*512) bytes
    assert bg.decode_bound_tok_s(TINY, 4, 100, bw=1e12) == pytest.approx(4e12 / 928000)
    # 7B at batch 1, 640 tokens of context, 4.8 TB/s: 7070619136*2 weight bytes + 640*57344 KV bytes
    b7 = bg.shape_config("7b")
    assert bg.kv_bytes_per_token(b7) == 57344
    assert bg.decode_bound_tok_s(b7, 1, 640) == pytest.approx(4.8e12 / (7070619136 * 2 + 640 * 57344))
    assert 338 < bg.decode_bound_tok_s(b7, 1, 640) < 339
