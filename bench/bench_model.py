"""This model against transformers on the same random weights and inputs, on this machine.

    python bench/bench_model.py [--hidden 512 --layers 8 --reps 7]
    python bench/bench_model.py --matmul     # why decode-step products are computed as W @ x^T

Times (median of interleaved repetitions, so machine drift hits both sides alike):
  prefill   one forward over a batch of 4 prompts with images
  fwd+bwd   forward + backward of a summed log-softmax over the same batch
  generate  64 new tokens for the 4 prompts (greedy, KV cache), tokens/s
and prints each ratio. Targets: forward and fwd+bwd time ratio <= 1.0, generation >= 1.5x tokens/s.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import from_pretrained  # noqa: E402

IMG, VS, VE, PAD = 268, 265, 266, 256


def build(hidden, layers, vision_hidden, vision_depth, path):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    heads = hidden // 64
    text = dict(vocab_size=4096, hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=max(1, heads // 4), max_position_embeddings=8192,
                rope_parameters={"rope_type": "default", "mrope_section": [8, 12, 12], "rope_theta": 1e6},
                bos_token_id=256, eos_token_id=258)
    vision = dict(depth=vision_depth, hidden_size=vision_hidden, num_heads=vision_hidden // 64,
                  intermediate_size=vision_hidden * 3, fullatt_block_indexes=[vision_depth - 1],
                  out_hidden_size=hidden, window_size=112)
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=IMG, video_token_id=269,
                           vision_start_token_id=VS, vision_end_token_id=VE)
    torch.manual_seed(0)
    hf = Qwen2_5_VLForConditionalGeneration._from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
    hf.save_pretrained(path)
    return hf.eval()


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    grids = [(1, 16, 20), (1, 12, 12), (1, 20, 16), (1, 8, 28)]
    rows = []
    for i, (t, h, w) in enumerate(grids):
        text = torch.randint(300, 4000, (20 + 13 * i,), generator=g).tolist()
        rows.append(text[:10] + [VS] + [IMG] * (t * h * w // 4) + [VE] + text[10:])
    L = max(map(len, rows))
    ids = torch.full((4, L), PAD)
    mask = torch.zeros(4, L, dtype=torch.long)
    for b, r in enumerate(rows):  # left padding, as for generation
        ids[b, L - len(r):] = torch.tensor(r)
        mask[b, L - len(r):] = 1
    grid = torch.tensor(grids)
    pv = torch.randn(int(grid.prod(-1).sum()), 1176, generator=g)
    return ids, mask, pv, grid, [torch.tensor(r) for r in rows]


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_matmul(hidden, reps):
    """F.linear against the thin product W @ x^T (model.Linear) on a decode step's weights, at 1 to
    16 rows; each weight matrix is repeated to ~100 MB so that it streams from memory as in a model."""
    import torch.nn.functional as F
    heads = hidden // 64
    kv = max(1, heads // 4) * 64
    shapes = {"q/o_proj": (hidden, hidden), "k/v_proj": (kv, hidden), "gate/up_proj": (3 * hidden, hidden),
              "down_proj": (hidden, 3 * hidden), "lm_head": (4096, hidden)}
    print(f"{'weight (out x in)':26s} {'rows':>4s} {'F.linear ms':>12s} {'W @ x^T ms':>11s} {'speed-up':>9s}")
    for name, (n, k) in shapes.items():
        ws = [torch.randn(n, k) for _ in range(max(1, 25_000_000 // (n * k)))]
        for rows in (1, 2, 4, 8, 16):
            x = torch.randn(rows, k)
            a = lambda: [F.linear(x, w) for w in ws]  # noqa: E731
            b = lambda: [(w @ x.T).T.contiguous() for w in ws]  # noqa: E731
            a(); b()
            ta, tb = [], []
            for _ in range(reps):
                ta.append(timed(a)); tb.append(timed(b))
            ma, mb = statistics.median(ta), statistics.median(tb)
            print(f"{name + f' {n}x{k}':26s} {rows:4d} {1e3 * ma:12.2f} {1e3 * mb:11.2f} {ma / mb:8.2f}x")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vision-hidden", type=int, default=256)
    ap.add_argument("--vision-depth", type=int, default=4)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--matmul", action="store_true", help="time only F.linear vs W @ x^T on the decode shapes")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    if args.matmul:
        return bench_matmul(args.hidden, args.reps)
    with tempfile.TemporaryDirectory() as d:
        hf = build(args.hidden, args.layers, args.vision_hidden, args.vision_depth, d)
        ours = from_pretrained(d, dtype=torch.float32).eval()
    ids, mask, pv, grid, prompts = inputs()
    mm = (ids == IMG).int()
    n_new = args.new_tokens

    def fwd_ours():
        with torch.no_grad():
            ours(ids, mask, pv, grid)

    def fwd_hf():
        with torch.no_grad():
            hf(input_ids=ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grid, mm_token_type_ids=mm)

    def bwd_ours():
        ours.zero_grad(set_to_none=True)
        ours(ids, mask, pv, grid).log_softmax(-1).mean().backward()

    def bwd_hf():
        hf.zero_grad(set_to_none=True)
        hf(input_ids=ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grid,
           mm_token_type_ids=mm).logits.log_softmax(-1).mean().backward()

    def gen_ours():
        toks, lens = ours.generate(prompts, pv, grid, max_new_tokens=n_new, stop_ids=(), pad_id=PAD, banned_ids=())
        assert int(lens.min()) == n_new

    def gen_hf():
        with torch.no_grad():
            out = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grid,
                              mm_token_type_ids=mm, do_sample=False, repetition_penalty=1.0,
                              max_new_tokens=n_new, min_new_tokens=n_new, pad_token_id=PAD, eos_token_id=None)
        assert out.shape[1] == ids.shape[1] + n_new

    # greedy outputs agree before anything is timed
    toks, _ = ours.generate(prompts, pv, grid, max_new_tokens=8, stop_ids=(), pad_id=PAD, banned_ids=())
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grid,
                          mm_token_type_ids=mm, do_sample=False, repetition_penalty=1.0, max_new_tokens=8,
                          min_new_tokens=8, pad_token_id=PAD, eos_token_id=None)[:, ids.shape[1]:]
    print(f"greedy tokens equal to transformers: {torch.equal(toks, ref)}")

    print(f"batch 4, prompt length {ids.shape[1]} (with {int((ids == IMG).sum())} image tokens), "
          f"text hidden {args.hidden} x {args.layers} layers, vision {args.vision_hidden} x {args.vision_depth}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    rows = [("prefill forward (s)", fwd_ours, fwd_hf), ("forward+backward (s)", bwd_ours, bwd_hf),
            (f"generate {n_new} tokens x 4 (s)", gen_ours, gen_hf)]
    print(f"{'measure':34s} {'ours':>9s} {'transformers':>13s} {'ratio ours/hf':>14s}")
    for name, a, b in rows:
        a(); b()  # warm-up
        ta, tb, ratios = [], [], []
        for _ in range(args.reps):
            x, y = timed(a), timed(b)
            ta.append(x); tb.append(y); ratios.append(x / y)
        print(f"{name:34s} {statistics.median(ta):9.3f} {statistics.median(tb):13.3f} {statistics.median(ratios):14.3f}")
        if name.startswith("generate"):
            r = statistics.median(ratios)
            print(f"{'generation tokens/s speed-up':34s} {4 * n_new / statistics.median(ta):9.1f} "
                  f"{4 * n_new / statistics.median(tb):13.1f} {1 / r:13.2f}x")


if __name__ == "__main__":
    main()
