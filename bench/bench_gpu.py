"""Throughput of this Qwen2.5-VL on one GPU (random weights, no downloads), as one markdown table.

    python bench/bench_gpu.py [--shape 7b|3b] [--seq 4096] [--skip-hf] [--quick] [--out bench_gpu.md]
    python bench/bench_gpu.py --device cpu --shape tiny --quick --skip-hf      # smoke test on a CPU

Rows (each one runs on its own: an error such as OOM is printed in its row and the next row runs):
  1   SFT step, ours: full fine-tuning (vision tower included unless --freeze-vision), bf16 params,
      bf16 grads, torch.optim.AdamW(fused=True) with bf16 states, activation checkpointing, SDPA
      (is_causal: flash). One image (grid 1x96x96 patches -> 2304 tokens) per sequence plus text to
      --seq. 2 warm-up steps, 5 timed (CUDA events). tokens/s and MFU.
  2   decode at batch 1, ours: model.generate(compile=True), greedy, no stop ids, ~512-token prompt.
  3   decode at batch 64, ours: the same with prompts of mixed lengths (left-padded by generate).
      Decode tokens/s = B * (n - 1) / (t(n new tokens) - t(1 new token)): the prefill cancels.
      Compared with the memory-bandwidth bound (formula in the notes printed under the table).
  4a-c  rows 1-3 for transformers' Qwen2_5_VLForConditionalGeneration (sdpa) holding the same weights
      (our state dict loaded with load_state_dict); its generate runs eagerly (no compile).
  5a/b  vision tower forward for one 1344x1344 image (grid 1x96x96), bf16: batched windows (one
      padded SDPA call per block) vs the per-window loop.

FLOPs (counted as useful work, recompute of checkpointed layers NOT counted: standard MFU):
  N_lm   = matmul weights of the decoder layers + lm_head (the embedding table is a lookup)
  LM     = 6 * N_lm * B*T  +  6 * layers * (heads*head_dim) * T^2 * B          (causal attention:
           12 * layers * hidden * T^2 / 2 per sequence, fwd + bwd)
  vision = 3 * fwd (1 * fwd with --freeze-vision);  fwd = 2 * patches * (patch_embed + depth * block
           matmul weights) + 2 * (patches / 4) * merger weights + sum over blocks of 4 * d * sum L_s^2
           over its attention segments (windows or whole image, non-causal)
  MFU    = FLOPs per step / step time / peak (989e12 bf16 dense, H200 spec sheet)
Decode bound (tokens/s) = B * HBM / (W + B * ctx * kv),  HBM = 4.8e12 B/s, W = bytes of all LM weights
  except the embedding table (bf16), kv = 2 * layers * kv_heads * head_dim * 2 bytes per cached token,
  ctx = mean prompt length + new tokens / 2 (the average context read per step).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import Config, Qwen2_5_VL, VisionConfig, init_weights, vision_windows  # noqa: E402

PEAK_BF16 = 989e12  # H200 SXM bf16 dense, spec sheet
HBM_BW = 4.8e12  # H200 HBM3e, B/s

# --------------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------------


def shape_config(name: str) -> Config:
    if name == "7b":
        return Config()  # the defaults are Qwen2.5-VL-7B
    if name == "3b":
        return Config(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                      num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True,
                      vision=VisionConfig(out_hidden_size=2048))
    if name == "tiny":
        return Config(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, mrope_section=[8, 12, 12],
                      max_position_embeddings=4096, bos_token_id=256, eos_token_id=258, image_token_id=268,
                      video_token_id=269, vision_start_token_id=265, vision_end_token_id=266,
                      vision=VisionConfig(depth=2, hidden_size=64, num_heads=2, intermediate_size=128,
                                          fullatt_block_indexes=[1], out_hidden_size=128))
    raise ValueError(f"unknown shape {name!r}")


# --------------------------------------------------------------------------------------------
# FLOP and bandwidth formulas (unit-tested against hand-computed numbers)
# --------------------------------------------------------------------------------------------


def lm_matmul_params(cfg: Config) -> int:
    """Weights of the LM's matrix multiplies: q, k, v, o, gate, up, down per layer, and lm_head."""
    H, I, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    per_layer = H * nh * hd + 2 * H * nkv * hd + nh * hd * H + 3 * H * I
    return cfg.num_hidden_layers * per_layer + cfg.vocab_size * H


def lm_decode_params(cfg: Config) -> int:
    """Every LM weight a decode step reads in full: the matmul weights, q/k/v biases, the norms.
    The embedding table is not counted (a step reads B of its rows), unless it is lm_head (tied)."""
    hd, nh, nkv, H = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size
    return lm_matmul_params(cfg) + cfg.num_hidden_layers * ((nh + 2 * nkv) * hd + 2 * H) + H


def lm_train_flops(cfg: Config, batch: int, seq: int) -> float:
    """Useful FLOPs of one LM training step (fwd + bwd) on `batch` sequences of `seq` tokens."""
    attn = 6 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq * seq * batch
    return 6 * lm_matmul_params(cfg) * batch * seq + attn


def vision_fwd_flops(vc: VisionConfig, grid_thw) -> float:
    """FLOPs of one vision-tower forward over the images of grid_thw (n, 3)."""
    grid_thw = torch.as_tensor(grid_thw).reshape(-1, 3)
    D, I = vc.hidden_size, vc.intermediate_size
    n = int(grid_thw.prod(-1).sum())
    patch_in = vc.in_chans * vc.temporal_patch_size * vc.patch_size ** 2
    block = 3 * D * D + D * D + 3 * D * I  # qkv, proj, gate/up/down
    unit = D * vc.spatial_merge_size ** 2
    merger = unit * unit + unit * vc.out_hidden_size
    mm = 2 * n * (patch_in * D + vc.depth * block) + 2 * (n // vc.spatial_merge_size ** 2) * merger
    _, cu_win = vision_windows(grid_thw, vc.spatial_merge_size, vc.window_size, vc.patch_size)
    win_sq = int(((cu_win[1:] - cu_win[:-1]) ** 2).sum())
    full_sq = sum(t * (h * w) ** 2 for t, h, w in grid_thw.tolist())
    n_full = sum(1 for i in range(vc.depth) if i in vc.fullatt_block_indexes)
    attn = 4 * D * (n_full * full_sq + (vc.depth - n_full) * win_sq)
    return float(mm + attn)


def kv_bytes_per_token(cfg: Config, bytes_per: int = 2) -> int:
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * bytes_per


def decode_bound_tok_s(cfg: Config, batch: int, ctx: float, bw: float = HBM_BW, bytes_per: int = 2) -> float:
    """Memory-bandwidth bound on decode tokens/s: each step reads all LM weights once and every
    row's KV cache (ctx tokens each) and yields `batch` tokens."""
    step_bytes = lm_decode_params(cfg) * bytes_per + batch * ctx * kv_bytes_per_token(cfg, bytes_per)
    return batch * bw / step_bytes


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


class Bench:
    def __init__(self, args):
        self.args = args
        self.t0 = time.time()
        self.dev = torch.device(args.device)
        self.cuda = self.dev.type == "cuda"
        self.dtype = torch.bfloat16
        self.cfg = shape_config(args.shape)
        self.rows = {}  # id -> (measurement, result, efficiency, details)
        self.notes = []
        self.model = None

    def log(self, msg):
        now = time.time()
        print(f"[{time.strftime('%H:%M:%S', time.localtime(now))} +{now - self.t0:6.1f}s] {msg}", flush=True)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.dev)

    def timed(self, fn):
        """(seconds, fn()) with CUDA events on a GPU (after a sync), perf_counter on a CPU."""
        self.sync()
        if self.cuda:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            out = fn()
            e.record()
            e.synchronize()
            return s.elapsed_time(e) / 1e3, out
        t = time.perf_counter()
        out = fn()
        return time.perf_counter() - t, out

    def free(self):
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def gib(self):
        return torch.cuda.max_memory_allocated(self.dev) / 2**30 if self.cuda else float("nan")

    def text_ids(self, n, g):
        hi = min(self.cfg.bos_token_id, self.cfg.image_token_id, self.cfg.vision_start_token_id)
        return torch.randint(0, hi, (n,), generator=g)

    def row(self, rid, measurement, result, efficiency="", details=""):
        self.rows[rid] = tuple(str(x).replace("|", "/").replace("\n", " ") for x in
                               (measurement, result, efficiency, details))
        self.log(f"row {rid}: {measurement}: {result}  {efficiency}  {details}")
        self.write()

    def table(self) -> str:
        lines = ["| # | measurement | result | efficiency | details |", "|---|---|---|---|---|"]
        for rid in sorted(self.rows):
            lines.append("| " + " | ".join((rid,) + self.rows[rid]) + " |")
        return "\n".join(lines + [""] + [f"- {n}" for n in self.notes]) + "\n"

    def write(self):
        if self.args.out:
            with open(self.args.out, "w") as f:
                f.write(self.table())

    def section(self, rids, names, fn):
        """Run one section; on failure (OOM, ...) print the error in its rows and carry on."""
        left = self.args.budget - (time.time() - self.t0)
        if left <= 0:
            for rid, name in zip(rids, names):
                self.row(rid, name, f"skipped: time budget of {self.args.budget:.0f} s spent")
            return
        self.log(f"start {', '.join(rids)}")
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - a benchmark row must not stop the others
            msg = f"ERROR {type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
            traceback.print_exc(limit=4)
            for rid, name in zip(rids, names):
                if rid not in self.rows:
                    self.row(rid, name, msg)
        finally:
            self.free()


def build_ours(cfg: Config, dev, dtype, seed: int) -> Qwen2_5_VL:
    """Construction straight on the device in `dtype`, then random init there (no CPU init of 7B
    weights): normal(0, 0.02) matrices and embeddings, zero biases, unit norms (as init_weights)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(dev):
            m = Qwen2_5_VL(cfg)
    finally:
        torch.set_default_dtype(old)
    init_weights(m, seed=seed)  # on the device, where the weights are
    return m


def sft_inputs(b: Bench, batch: int, seq: int, grid_side: int, seed: int):
    """`batch` sequences of `seq` tokens: text, <vision_start>, one image's pads, <vision_end>, text.
    Labels: next tokens, image pads ignored."""
    cfg = b.cfg
    merge = cfg.vision.spatial_merge_size
    n_img = (grid_side // merge) ** 2
    n_text = seq - n_img - 2
    if n_text < 2:
        raise ValueError(f"--seq {seq} too short for a {grid_side}x{grid_side}-patch image ({n_img} tokens)")
    g = torch.Generator().manual_seed(seed)
    pre = min(32, n_text // 2)
    rows = []
    for _ in range(batch):
        t = b.text_ids(n_text, g)
        rows.append(torch.cat([t[:pre], torch.tensor([cfg.vision_start_token_id]),
                               torch.full((n_img,), cfg.image_token_id), torch.tensor([cfg.vision_end_token_id]),
                               t[pre:]]))
    ids = torch.stack(rows)
    labels = ids.masked_fill(ids == cfg.image_token_id, -100)
    grid = torch.tensor([[1, grid_side, grid_side]] * batch)
    pv = torch.randn(batch * grid_side * grid_side, 1176, generator=g).to(b.dtype)
    return ids.to(b.dev), labels.to(b.dev), pv.to(b.dev), grid


def loss_fn(logits, labels):
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


def sft_flops(b: Bench, batch, seq, grid_side):
    cfg = b.cfg
    grid = torch.tensor([[1, grid_side, grid_side]] * batch)
    vis_factor = 1 if b.args.freeze_vision else 3
    return lm_train_flops(cfg, batch, seq) + vis_factor * vision_fwd_flops(cfg.vision, grid)


def run_sft(b: Bench, rid: str, name: str, model, step_fn, params):
    """Warm-up then timed optimizer steps; the row gets tokens/s and MFU."""
    a = b.args
    opt = torch.optim.AdamW(params, lr=1e-6, weight_decay=0.0, fused=True)
    ids, labels, pv, grid = sft_inputs(b, a.batch, a.seq, a.grid, a.seed)
    losses = []

    def step():
        loss = step_fn(ids, labels, pv, grid)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    try:
        if b.cuda:
            torch.cuda.reset_peak_memory_stats(b.dev)
        for i in range(a.warmup):
            dt, _ = b.timed(step)
            b.log(f"  {name}: warm-up step {i + 1}/{a.warmup} {dt:.3f} s")

        def steps():
            for _ in range(a.steps):
                step()

        dt, _ = b.timed(steps)
        per = dt / a.steps
        tokens = a.batch * a.seq
        flops = sft_flops(b, a.batch, a.seq, a.grid)
        mfu = f"MFU {100 * flops / per / a.peak_flops:.1f}% ({flops / per / 1e12:.0f} TFLOP/s)" if b.cuda else "MFU n/a (CPU)"
        loss_last = float(losses[-1])
        mem = f"peak mem {b.gib():.1f} GiB; " if b.cuda else ""
        b.row(rid, name, f"{tokens / per:,.0f} tok/s ({per:.3f} s/step)", mfu,
              f"{a.batch}x{a.seq} tokens/step ({(a.grid // 2) ** 2} image tokens/seq), {a.steps} timed steps "
              f"after {a.warmup} warm-up; {mem}loss {loss_last:.3f}")
    finally:
        opt.zero_grad(set_to_none=True)
        for p in params:
            p.grad = None
        del opt


def decode_prompts(b: Bench, batch: int, seed: int):
    a = b.args
    g = torch.Generator().manual_seed(seed)
    if batch == 1:
        lens = [a.prompt]
    else:  # mixed lengths around the same mean
        lens = torch.randint(a.prompt * 3 // 4, a.prompt * 5 // 4 + 1, (batch,), generator=g).tolist()
    return [b.text_ids(n, g) for n in lens], lens


def run_decode(b: Bench, rid: str, name: str, batch: int, gen_fn, warm_new: int, note):
    """gen_fn(prompts, n) -> lengths; decode tokens/s from t(n) - t(1) (the prefill cancels)."""
    a = b.args
    n = a.new_tokens
    prompts, lens = decode_prompts(b, batch, a.seed + batch)

    def run(k):
        dt, got = b.timed(lambda: gen_fn(prompts, k))
        if int(got.min()) != k:
            raise RuntimeError(f"generate stopped early: {int(got.min())} of {k} tokens")
        return dt

    b.log(f"  {name}: warm-up generate ({warm_new} new tokens; a compiled step compiles here)")
    dt = run(warm_new)
    b.log(f"  {name}: warm-up done in {dt:.2f} s")
    t_n = min(run(n) for _ in range(a.reps))
    t_1 = min(run(1) for _ in range(a.reps))
    if t_n <= t_1:  # only with very few tokens on a noisy machine
        b.row(rid, name, "n/a: t(n) <= t(1), timing noise", "",
              f"t({n} new) {t_n:.3f} s, t(1 new) {t_1:.3f} s; rerun with more --new-tokens")
        return
    per_step = (t_n - t_1) / (n - 1)
    tok_s = batch / per_step
    ctx = sum(lens) / len(lens) + n / 2
    if b.cuda:
        bound = decode_bound_tok_s(b.cfg, batch, ctx, a.hbm_bw)
        eff = f"{100 * tok_s / bound:.1f}% of {bound:,.0f} tok/s bound"
    else:
        eff = "bound n/a (CPU)"
    b.row(rid, name, f"{tok_s:,.1f} tok/s ({1e3 * per_step:.2f} ms/step)", eff,
          f"{note() if callable(note) else note}; prompts {min(lens)}-{max(lens)} tokens, {n} new tokens, end-to-end incl. prefill "
          f"{batch * n / t_n:,.1f} tok/s, prefill+1 token {t_1:.3f} s")


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


def sec_build(b: Bench):
    dt, m = b.timed(lambda: build_ours(b.cfg, b.dev, b.dtype, b.args.seed))
    b.model = m
    n_all = sum(p.numel() for p in m.parameters())
    n_vis = sum(p.numel() for p in m.visual.parameters())
    b.log(f"built ours ({b.args.shape}) in {dt:.1f} s: {n_all / 1e9:.3f} B params "
          f"({n_vis / 1e9:.3f} B vision), N_lm (matmul) {lm_matmul_params(b.cfg) / 1e9:.3f} B")
    b.notes.append(f"shape {b.args.shape}: {n_all / 1e9:.3f} B params ({n_vis / 1e9:.3f} B vision tower); "
                   f"N_lm = {lm_matmul_params(b.cfg) / 1e9:.4f} B matmul weights (layers + lm_head); "
                   f"random weights, bf16, built and initialised on {b.dev.type}")


def sec_sft_ours(b: Bench):
    m = b.model
    m.train()
    m.attn_impl = "sdpa"
    m.set_gradient_checkpointing(True)
    if b.args.freeze_vision:
        m.visual.requires_grad_(False)
    params = [p for p in m.parameters() if p.requires_grad]

    def step_fn(ids, labels, pv, grid):
        return loss_fn(m(ids, None, pv, grid), labels)

    try:
        run_sft(b, "1", "SFT step, ours", m, step_fn, params)
    finally:
        m.set_gradient_checkpointing(False)
        m.visual.requires_grad_(True)
        m.eval()


def sec_decode_ours(b: Bench, rid: str, batch: int):
    m = b.model.eval()
    pad = b.cfg.bos_token_id
    state = {"compile": b.compile, "note": ""}

    def gen(prompts, k):
        _, lens = m.generate(prompts, max_new_tokens=k, stop_ids=(), pad_id=pad, compile=state["compile"])
        return lens

    def gen_safe(prompts, k):
        try:
            return gen(prompts, k)
        except Exception as e:  # noqa: BLE001 - a compile failure falls back to eager, noted in the row
            if not state["compile"]:
                raise
            b.log(f"  compiled decode failed ({type(e).__name__}: {str(e)[:200]}); eager instead")
            state["compile"], state["note"] = False, f"compile FAILED ({type(e).__name__}), eager"
            m._decode_compiled = None
            b.compile = False  # later rows do not try again
            return gen(prompts, k)

    def note():
        return state["note"] or f"model.generate(compile={state['compile']})"

    # the warm-up uses the timed length: the compiled step is specialised to the cache length
    run_decode(b, rid, f"decode b={batch}, ours", batch, gen_safe, b.args.new_tokens, note)


def sec_vision(b: Bench):
    m = b.model.eval()
    vis = m.visual
    side = b.args.grid
    grid = torch.tensor([[1, side, side]])
    g = torch.Generator().manual_seed(b.args.seed)
    pv = torch.randn(side * side, 1176, generator=g).to(b.dtype).to(b.dev)
    flops = vision_fwd_flops(b.cfg.vision, grid)
    times = {}
    try:
        with torch.no_grad():
            for batched in (True, False):
                vis.batched_attention = batched
                for _ in range(b.args.warmup):
                    vis(pv, grid)
                dt, _ = b.timed(lambda: [vis(pv, grid) for _ in range(b.args.steps)])
                times[batched] = dt / b.args.steps
    finally:
        vis.batched_attention = None
    px = side * b.cfg.vision.patch_size
    _, cu = vision_windows(grid, b.cfg.vision.spatial_merge_size, b.cfg.vision.window_size, b.cfg.vision.patch_size)
    for rid, batched in (("5a", True), ("5b", False)):
        t = times[batched]
        eff = f"MFU {100 * flops / t / b.args.peak_flops:.1f}%" if b.cuda else "MFU n/a (CPU)"
        other = times[not batched]
        b.row(rid, f"vision fwd {px}x{px} image, {'batched windows' if batched else 'per-window loop'}",
              f"{1e3 * t:.2f} ms", eff,
              f"grid 1x{side}x{side} = {side * side} patches, {len(cu) - 1} windows; "
              f"{'speed-up over loop' if batched else 'batched is'} {other / t if batched else t / other:.2f}x; "
              f"fwd {flops / 1e12:.3f} TFLOP")


def hf_config(cfg: Config):
    from transformers import Qwen2_5_VLConfig

    vc = cfg.vision
    text = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                num_key_value_heads=cfg.num_key_value_heads, rms_norm_eps=cfg.rms_norm_eps,
                max_position_embeddings=cfg.max_position_embeddings,
                rope_parameters={"rope_type": "default", "mrope_section": list(cfg.mrope_section),
                                 "rope_theta": cfg.rope_theta},
                tie_word_embeddings=cfg.tie_word_embeddings, bos_token_id=cfg.bos_token_id,
                eos_token_id=cfg.eos_token_id)
    vision = dict(depth=vc.depth, hidden_size=vc.hidden_size, num_heads=vc.num_heads,
                  intermediate_size=vc.intermediate_size, patch_size=vc.patch_size,
                  temporal_patch_size=vc.temporal_patch_size, spatial_merge_size=vc.spatial_merge_size,
                  window_size=vc.window_size, fullatt_block_indexes=list(vc.fullatt_block_indexes),
                  in_channels=vc.in_chans, out_hidden_size=vc.out_hidden_size)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=cfg.tie_word_embeddings,
                            image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
                            vision_start_token_id=cfg.vision_start_token_id,
                            vision_end_token_id=cfg.vision_end_token_id)


def hf_name(name: str) -> str:
    if name.startswith("visual."):
        return "model." + name
    if name.startswith("model."):
        return "model.language_model." + name[len("model."):]
    return name


def sec_hf_build(b: Bench):
    from transformers import Qwen2_5_VLForConditionalGeneration

    hcfg = hf_config(b.cfg)

    def build():
        with torch.device(b.dev):
            return Qwen2_5_VLForConditionalGeneration._from_config(hcfg, attn_implementation="sdpa", dtype=b.dtype)

    dt, hf = b.timed(build)
    sd = {hf_name(k): v for k, v in b.model.state_dict().items()}
    res = hf.load_state_dict(sd, strict=False)
    missing = [k for k in res.missing_keys if not (b.cfg.tie_word_embeddings and k == "lm_head.weight")]
    if missing or res.unexpected_keys:
        raise RuntimeError(f"state dict mismatch: missing {missing[:4]}, unexpected {res.unexpected_keys[:4]}")
    del sd
    # same weights, same numbers: logits of both on a short prompt with a small image
    g = torch.Generator().manual_seed(b.args.seed + 7)
    cfg = b.cfg
    text = b.text_ids(48, g)
    ids = torch.cat([text[:8], torch.tensor([cfg.vision_start_token_id]), torch.full((16,), cfg.image_token_id),
                     torch.tensor([cfg.vision_end_token_id]), text[8:]])[None].to(b.dev)
    grid = torch.tensor([[1, 8, 8]])
    pv = torch.randn(64, 1176, generator=g).to(b.dtype).to(b.dev)
    with torch.no_grad():
        a = b.model(ids, None, pv, grid).float()
        h = hf(input_ids=ids, pixel_values=pv, image_grid_thw=grid.to(b.dev),
               mm_token_type_ids=(ids == cfg.image_token_id).int()).logits.float()
    diff = float((a - h).abs().max())
    same = float((a.argmax(-1) == h.argmax(-1)).float().mean())
    b.notes.append(f"transformers holds our weights: on a {ids.shape[1]}-token prompt with an 8x8-patch image, "
                   f"max |logit difference| {diff:.3g} (logits up to {float(a.abs().max()):.3g}, "
                   f"{b.dtype}), argmax agreement {100 * same:.0f}%")
    b.log(f"  logits ours vs transformers: max |diff| {diff:.3g}, argmax agreement {100 * same:.0f}%")
    del a, h
    b.model = None  # ours is no longer needed: free its memory for the transformers rows
    b.hf = hf.eval()
    b.free()
    b.log(f"built transformers model in {dt:.1f} s, loaded our weights (load_state_dict)")


def sec_sft_hf(b: Bench):
    hf = b.hf
    hf.train()
    if hasattr(hf, "activation_checkpointing_enable"):  # the 5.x name (gradient_... is deprecated)
        hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    n_ckpt = sum(1 for mod in hf.modules() if getattr(mod, "gradient_checkpointing", False))
    b.log(f"  transformers: activation checkpointing on ({n_ckpt} modules flagged)")
    if b.args.freeze_vision:
        hf.model.visual.requires_grad_(False)
    params = [p for p in hf.parameters() if p.requires_grad]
    img = b.cfg.image_token_id

    def step_fn(ids, labels, pv, grid):
        out = hf(input_ids=ids, pixel_values=pv, image_grid_thw=grid.to(ids.device), mm_token_type_ids=(ids == img).int(),
                 use_cache=False)
        return loss_fn(out.logits, labels)

    try:
        run_sft(b, "4a", "SFT step, transformers", hf, step_fn, params)
    finally:
        (getattr(hf, "activation_checkpointing_disable", None) or hf.gradient_checkpointing_disable)()
        hf.requires_grad_(True)
        hf.eval()


def sec_decode_hf(b: Bench, rid: str, batch: int):
    hf = b.hf.eval()
    pad = b.cfg.bos_token_id

    def gen(prompts, k):
        L = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), L), pad, dtype=torch.long)
        mask = torch.zeros(len(prompts), L, dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding
            ids[i, L - len(p):] = p
            mask[i, L - len(p):] = 1
        ids, mask = ids.to(b.dev), mask.to(b.dev)
        with torch.no_grad():
            out = hf.generate(input_ids=ids, attention_mask=mask, mm_token_type_ids=torch.zeros_like(mask, dtype=torch.int),
                              do_sample=False, repetition_penalty=1.0, max_new_tokens=k, min_new_tokens=k,
                              pad_token_id=pad, eos_token_id=None)
        return torch.tensor([out.shape[1] - L] * len(prompts))

    run_decode(b, rid, f"decode b={batch}, transformers", batch, gen, min(16, b.args.new_tokens),
               "hf.generate (eager, DynamicCache, sdpa)")


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=["7b", "3b", "tiny"], default=None, help="default 7b on cuda, tiny on cpu")
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--seq", type=int, default=None, help="SFT tokens per sequence (default 4096; tiny 256)")
    ap.add_argument("--batch", type=int, default=1, help="SFT sequences per step")
    ap.add_argument("--grid", type=int, default=None, help="image side in patches (default 96 = 1344 px; tiny 16)")
    ap.add_argument("--freeze-vision", action="store_true", help="SFT trains the LM only")
    ap.add_argument("--skip-hf", action="store_true", help="skip the transformers rows")
    ap.add_argument("--quick", action="store_true", help="fewer steps and tokens (smoke test)")
    ap.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                    help="compile the decode step (auto: on for cuda, off for cpu)")
    ap.add_argument("--new-tokens", type=int, default=None, help="decode tokens (default 256; quick 16)")
    ap.add_argument("--prompt", type=int, default=None, help="decode prompt length (default 512; quick 64)")
    ap.add_argument("--batch-decode", type=int, default=64, help="batch of row 3")
    ap.add_argument("--peak-flops", type=float, default=PEAK_BF16)
    ap.add_argument("--hbm-bw", type=float, default=HBM_BW)
    ap.add_argument("--budget", type=float, default=450.0, help="seconds; later sections are skipped past it")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench_gpu.md")
    a = ap.parse_args(argv)
    if a.device is None:
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.shape is None:
        a.shape = "tiny" if a.device == "cpu" else "7b"
    tiny = a.shape == "tiny"
    a.seq = a.seq or (256 if tiny else 4096)
    a.grid = a.grid or (16 if tiny else 96)
    a.new_tokens = a.new_tokens or (16 if a.quick else 256)
    a.prompt = a.prompt or (64 if a.quick else 512)
    a.warmup, a.steps = (1, 2) if a.quick else (2, 5)
    a.reps = 1 if a.quick else 2
    return a


def main(argv=None) -> str:
    a = parse_args(argv)
    b = Bench(a)
    if b.cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU visible (use --device cpu --shape tiny --quick)")
    b.compile = a.compile == "on" or (a.compile == "auto" and b.cuda)
    dev_name = torch.cuda.get_device_name(b.dev) if b.cuda else "CPU"
    b.log(f"{dev_name}, torch {torch.__version__}, shape {a.shape}, seq {a.seq}, quick {a.quick}")

    cfg = b.cfg
    vis = "vision tower frozen (LM trained)" if a.freeze_vision else "full fine-tuning incl. vision tower"
    b.notes += [  # first, so that a partial table (timeout) has them
        f"SFT: {vis}; bf16 params and grads, torch.optim.AdamW(fused=True) with bf16 exp_avg/exp_avg_sq "
        f"(no fp32 master weights); activation checkpointing on every decoder layer and vision block; "
        f"SDPA attention (is_causal, unpadded); loss = cross-entropy on text tokens (fp32 logits)",
        f"MFU = FLOPs/step / step time / {a.peak_flops:.3g}; FLOPs/step = 6*N_lm*B*T + 6*layers*(heads*head_dim)*T^2*B "
        f"(= 12*L*H*T^2/2 causal) + {'1' if a.freeze_vision else '3'}*vision_fwd; vision_fwd = 2*patches*(patch_embed + "
        f"depth*block matmul weights) + 2*(patches/4)*merger weights + sum_blocks 4*d*sum_segments L^2; "
        f"checkpoint recompute not counted. Here: {sft_flops(b, a.batch, a.seq, a.grid) / 1e12:.4g} TFLOP/step",
        f"decode bound = B*{a.hbm_bw:.3g} B/s / (W + B*ctx*kv): W = {lm_decode_params(cfg) * 2 / 1e9:.3f} GB "
        f"(bf16 LM weights read in full each step: the embedding table only when tied as lm_head), kv = 2*layers*kv_heads*head_dim*2 B = "
        f"{kv_bytes_per_token(cfg)} B/token, ctx = mean prompt + new/2. Our KVCache reads its whole "
        f"static buffer (padding and unwritten slots too), so the bound is not fully reachable",
        f"decode tokens/s = B*(n-1)/(t(n new) - t(1 new)), greedy, no stop ids, text-only prompts; "
        f"timings: CUDA events after a synchronize (perf_counter on CPU), best of {a.reps}",
    ]

    b.section(["0"], ["build"], lambda: sec_build(b))
    if b.model is None:
        print(b.table(), flush=True)
        return b.table()
    b.section(["1"], ["SFT step, ours"], lambda: sec_sft_ours(b))
    b.section(["2"], ["decode b=1, ours"], lambda: sec_decode_ours(b, "2", 1))
    b.section(["3"], [f"decode b={a.batch_decode}, ours"], lambda: sec_decode_ours(b, "3", a.batch_decode))
    b.section(["5a", "5b"], ["vision fwd, batched windows", "vision fwd, per-window loop"], lambda: sec_vision(b))
    hf_rows = (["4a", "4b", "4c"], ["SFT step, transformers", "decode b=1, transformers",
                                    f"decode b={a.batch_decode}, transformers"])
    try:
        import transformers  # noqa: F401
        hf_ok = True
    except Exception as e:  # noqa: BLE001
        hf_ok = f"transformers not importable ({type(e).__name__})"
    if a.skip_hf or hf_ok is not True:
        for rid, name in zip(*hf_rows):
            b.row(rid, name, "skipped: " + ("--skip-hf" if a.skip_hf else hf_ok))
    else:
        b.hf = None
        b.section(hf_rows[0], hf_rows[1], lambda: sec_hf_build(b))
        if b.hf is not None:
            b.section(["4a"], [hf_rows[1][0]], lambda: sec_sft_hf(b))
            b.section(["4b"], [hf_rows[1][1]], lambda: sec_decode_hf(b, "4b", 1))
            b.section(["4c"], [hf_rows[1][2]], lambda: sec_decode_hf(b, "4c", a.batch_decode))
            b.hf = None
            b.free()

    b.notes.append(f"{dev_name}, torch {torch.__version__}; total {time.time() - b.t0:.0f} s")
    text = b.table()
    b.write()
    print("\n" + text, flush=True)
    return text


if __name__ == "__main__":
    main()
