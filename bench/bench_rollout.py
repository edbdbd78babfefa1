"""GRPO rollout speed: this project's model.generate against transformers' generate.

    python bench/bench_rollout.py [--prompts 8 --group-size 4 --new-tokens 32 --reps 3]

The same random weights (a small Qwen2.5-VL written by transformers, loaded by model.from_pretrained)
and the same rollout as train_grpo.py samples it: `--prompts` prompts with one image each (four
image sizes), `--group-size` samples each; ours prefills each prompt once and copies its KV cache
(generate's num_samples), transformers gets each prompt repeated G times (what
num_return_sequences does too), left-padded. Sampling at temperature 1,
top-p 1 (transformers: top_k 0, so both draw from the full distribution), exactly `--new-tokens`
new tokens per row (no stop token: ours with stop_ids=(), transformers with eos_token_id=None and
min_new_tokens), KV cache on both sides. Prints the median over interleaved repetitions of each
side's rollout tokens/s and their ratio.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_model import IMG, PAD, VE, VS, build  # noqa: E402

from model import from_pretrained  # noqa: E402


def rollout_batch(n_prompts, G, seed=0):
    """n_prompts prompts with one image each, every prompt repeated G times (a GRPO rollout batch)."""
    g = torch.Generator().manual_seed(seed)
    sizes = [(1, 16, 20), (1, 12, 12), (1, 20, 16), (1, 8, 28)]
    rows, grids = [], []
    for i in range(n_prompts):
        t, h, w = sizes[i % len(sizes)]
        text = torch.randint(300, 4000, (20 + 7 * i,), generator=g).tolist()
        row = text[:10] + [VS] + [IMG] * (t * h * w // 4) + [VE] + text[10:]
        rows += [row] * G
        grids += [(t, h, w)] * G
    grid = torch.tensor(grids)
    pv_one = [torch.randn(int(torch.tensor(s).prod()), 1176, generator=g) for s in sizes]
    pv = torch.cat([pv_one[(i // G) % len(sizes)] for i in range(len(rows))])
    L = max(map(len, rows))
    ids = torch.full((len(rows), L), PAD)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for b, r in enumerate(rows):  # left padding
        ids[b, L - len(r):] = torch.tensor(r)
        mask[b, L - len(r):] = 1
    return ids, mask, pv, grid, [torch.tensor(r) for r in rows]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vision-hidden", type=int, default=256)
    ap.add_argument("--vision-depth", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as d:
        hf = build(args.hidden, args.layers, args.vision_hidden, args.vision_depth, d)
        ours = from_pretrained(d, dtype=torch.float32).eval()
    ids, mask, pv, grid, prompts = rollout_batch(args.prompts, args.group_size)
    mm = (ids == IMG).int()
    n_new, B = args.new_tokens, ids.shape[0]

    G = args.group_size
    unique = prompts[::G]  # as train_grpo.py samples: each prompt prefilled once, its cache copied G times
    per_row = grid.prod(-1).tolist()
    starts = [sum(per_row[:i]) for i in range(len(per_row))]
    pv_unique = torch.cat([pv[starts[i]:starts[i] + per_row[i]] for i in range(0, B, G)])

    def gen_ours(seed):
        toks, lens = ours.generate(unique, pv_unique, grid[::G], max_new_tokens=n_new, temperature=1.0, top_p=1.0,
                                   seed=seed, stop_ids=(), pad_id=PAD, num_samples=G)
        assert int(lens.min()) == n_new and toks.shape[0] == B

    def gen_hf(seed):
        torch.manual_seed(seed)
        with torch.no_grad():
            out = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grid,
                              mm_token_type_ids=mm, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                              repetition_penalty=1.0, max_new_tokens=n_new, min_new_tokens=n_new,
                              pad_token_id=PAD, eos_token_id=None)
        assert out.shape == (B, ids.shape[1] + n_new)

    print(f"rollout batch {args.prompts} prompts x G={args.group_size} = {B} sequences, prompt length {ids.shape[1]} "
          f"(left-padded, {int(mm.sum(1).min())}-{int(mm.sum(1).max())} image tokens each), {n_new} new tokens, "
          f"temperature 1; text {args.hidden} x {args.layers} layers, vision {args.vision_hidden} x "
          f"{args.vision_depth}; {torch.get_num_threads()} threads, torch {torch.__version__}")
    gen_ours(0), gen_hf(0)  # warm-up
    ta, tb = [], []
    for r in range(args.reps):
        for fn, acc in ((gen_ours, ta), (gen_hf, tb)):
            t = time.perf_counter()
            fn(r + 1)
            acc.append(time.perf_counter() - t)
    a, b = statistics.median(ta), statistics.median(tb)
    print(f"{'':14s} {'seconds':>9s} {'tokens/s':>10s}")
    print(f"{'ours':14s} {a:9.3f} {B * n_new / a:10.1f}")
    print(f"{'transformers':14s} {b:9.3f} {B * n_new / b:10.1f}")
    print(f"rollout tokens/s ratio ours / transformers: {b / a:.2f}x")


if __name__ == "__main__":
    main()
