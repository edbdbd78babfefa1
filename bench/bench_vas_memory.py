"""Peak host memory of measuring VAS on one long input: vas.py's chunked statistics against
transformers' eager forward with output_attentions=True, on the same random weights.

    python bench/bench_vas_memory.py [--tokens 4096 --hidden 256 --layers 4 --heads 8 --grid 36]

Each side runs in a fresh subprocess that loads the model and builds the input, takes
ru_maxrss as its baseline, measures VAS once, and reports (ru_maxrss - baseline): the memory the
measurement itself added at its peak. The transformers side keeps every layer's (B, H, T, T)
attention (output_attentions) and reduces it to role masses by a matmul; its logits are limited to
the last position (logits_to_keep=1) so that the vocabulary projection does not count. Both
sides print their VAS, which must agree.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
IMG, VS, VE, PAD, IM_START, IM_END = 268, 265, 266, 256, 257, 258


def build(args, path):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    hd = args.hidden // args.heads
    third = hd // 2 // 8  # mrope_section must sum to head_dim / 2: [1/4, 3/8, 3/8]
    section = [2 * third, 3 * third, 3 * third]
    text = dict(vocab_size=1024, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=max(1, args.heads // 4),
                max_position_embeddings=32768, rope_parameters={"rope_type": "default", "mrope_section": section,
                                                               "rope_theta": 1e6},
                bos_token_id=PAD, eos_token_id=IM_END)
    vision = dict(depth=2, hidden_size=128, num_heads=2, intermediate_size=256, fullatt_block_indexes=[1],
                  out_hidden_size=args.hidden, window_size=112)
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=IMG, video_token_id=269,
                           vision_start_token_id=VS, vision_end_token_id=VE)
    torch.manual_seed(0)
    hf = Qwen2_5_VLForConditionalGeneration._from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(path)


def make_input(tokens: int, grid: int, seed: int = 0):
    """One prompt in the Qwen layout, with roles known by construction:
    system turn (S) | <|im_start|>user\\n <|vision_start|> (U) | image (V) | <|vision_end|> text (U) |
    <|im_start|>assistant\\n (U)."""
    from data import IMAGE, SYSTEM, USER

    g = torch.Generator().manual_seed(seed)
    n_img = grid * grid // 4
    ids, roles = [], []

    def add(tok, role):
        ids.extend(tok)
        roles.extend([role] * len(tok))

    add([IM_START] + torch.randint(0, 256, (26,), generator=g).tolist() + [IM_END, 10], SYSTEM)
    add([IM_START] + torch.randint(0, 256, (5,), generator=g).tolist() + [VS], USER)
    add([IMG] * n_img, IMAGE)
    tail = [IM_START] + torch.randint(0, 256, (10,), generator=g).tolist()
    add([VE] + torch.randint(0, 256, (tokens - len(ids) - 1 - len(tail),), generator=g).tolist(), USER)
    add(tail, USER)
    assert len(ids) == tokens
    ids = torch.tensor([ids])
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), roles=torch.tensor([roles]),
                pixel_values=torch.randn(grid * grid, 1176, generator=g),
                image_grid_thw=torch.tensor([[1, grid, grid]]))


def maxrss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes


def worker(side, path, args):
    from data import IMAGE, SYSTEM
    from vas import measure_vas, query_mask

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    batch = make_input(args.tokens, args.grid)
    if side == "ours":
        from model import from_pretrained
        model = from_pretrained(path, dtype=torch.float32).eval()
    else:
        from transformers import Qwen2_5_VLForConditionalGeneration
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, attn_implementation="eager",
                                                                   dtype=torch.float32).eval()
    base = maxrss_bytes()
    t0 = time.perf_counter()
    if side == "ours":
        v = measure_vas(model, batch, chunk_size=args.chunk_size).vas
    else:
        ids, roles = batch["input_ids"], batch["roles"]
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"],
                        image_grid_thw=batch["image_grid_thw"], mm_token_type_ids=(ids == IMG).int(),
                        output_attentions=True, logits_to_keep=1)
            hot = torch.nn.functional.one_hot(roles.clamp(min=0), 4).float()  # (1, T, 4)
            q = query_mask(roles, "user")[0]
            ratios = []
            for a in out.attentions:  # (1, H, T, T) each, all alive at once
                m = torch.matmul(a, hot[:, None])[0][:, q]  # (H, |Q|, 4)
                ratios.append((m[..., IMAGE] / m[..., SYSTEM]).mean())
            v = float(torch.stack(ratios).mean())
    dt = time.perf_counter() - t0
    print(json.dumps({"side": side, "peak_bytes": maxrss_bytes() - base, "vas": v, "seconds": dt}))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--grid", type=int, default=36, help="image grid side in patches (grid^2/4 image tokens)")
    p.add_argument("--chunk-size", type=int, default=None, help="query rows per chunk (default: vas.py's)")
    p.add_argument("--worker", choices=["ours", "transformers"], help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.worker, args.path, args)
    print(f"config: {vars(args)}")
    with tempfile.TemporaryDirectory() as d:
        build(args, d)
        res = {}
        for side in ("ours", "transformers"):
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", side, "--path", d,
                   "--tokens", str(args.tokens), "--grid", str(args.grid)]
            if args.chunk_size:
                cmd += ["--chunk-size", str(args.chunk_size)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            res[side] = json.loads(out.strip().splitlines()[-1])
    mib = 2 ** 20
    print(f"input: {args.tokens} tokens, {args.grid ** 2 // 4} image tokens, {args.layers} layers x {args.heads} heads")
    for side in ("ours", "transformers"):
        r = res[side]
        print(f"{side:13s} peak over baseline {r['peak_bytes'] / mib:9.1f} MiB   {r['seconds']:6.2f} s   VAS {r['vas']:.6f}")
    print(f"ratio transformers / ours: {res['transformers']['peak_bytes'] / max(res['ours']['peak_bytes'], 1):.1f}x")
    assert abs(res["ours"]["vas"] - res["transformers"]["vas"]) < 1e-4 * max(1.0, abs(res["ours"]["vas"]))


if __name__ == "__main__":
    main()
