"""Peak host memory of loading a bf16 checkpoint, as a multiple of the checkpoint's size.

    python bench/bench_load_memory.py [--hidden 1536 --layers 12]

Writes a random bf16 checkpoint of a few hundred MB (Qwen2.5-VL architecture), then loads it in a
fresh process with this project's `from_pretrained` and with transformers' `from_pretrained`
(dtype bfloat16), each measuring its peak resident memory (Linux VmHWM, reset after imports)
above the process's size after imports. Every weight is read once after loading, so memory-mapped pages a lazy loader defers are counted. A loader that passes through float32 or holds two copies shows 2-3x.
"""

import argparse
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import sys, torch
sys.path.insert(0, {root!r})
import model
if {which!r} == "transformers":
    from transformers import Qwen2_5_VLForConditionalGeneration

def rss(field):  # kB -> bytes, from the kernel's own accounting
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current size
base = rss("VmRSS:")
if {which!r} == "ours":
    m = model.from_pretrained({path!r}, dtype=torch.bfloat16)
else:
    m = Qwen2_5_VLForConditionalGeneration.from_pretrained({path!r}, dtype=torch.bfloat16)
assert next(m.parameters()).dtype == torch.bfloat16
for p in m.parameters():  # read every weight once: a lazily memory-mapped loader pays here
    p.sum()
print(rss("VmHWM:") - base)
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--skip-hf", action="store_true")
    args = ap.parse_args()
    sys.path.insert(0, ROOT)
    import torch
    from model import Config, Qwen2_5_VL, VisionConfig, init_weights, save_pretrained

    cfg = Config(vocab_size=32000, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                 num_hidden_layers=args.layers, num_attention_heads=args.hidden // 128, num_key_value_heads=2,
                 vision=VisionConfig(depth=4, hidden_size=512, num_heads=8, intermediate_size=1024,
                                     fullatt_block_indexes=[3], out_hidden_size=args.hidden))
    with tempfile.TemporaryDirectory() as d:
        m = init_weights(Qwen2_5_VL(cfg)).to(torch.bfloat16)
        save_pretrained(m, d)
        del m
        size = os.path.getsize(os.path.join(d, "model.safetensors"))
        print(f"checkpoint: {size / 2**20:.0f} MiB bf16 ({args.layers} layers x {args.hidden})")
        for which in ["ours"] + ([] if args.skip_hf else ["transformers"]):
            out = subprocess.run([sys.executable, "-c", CHILD.format(root=ROOT, which=which, path=d)],
                                 capture_output=True, text=True, check=True)
            peak = int(out.stdout.strip().splitlines()[-1])
            print(f"{which:13s} peak memory above baseline: {peak / 2**20:7.0f} MiB = {peak / size:.2f}x the checkpoint")


if __name__ == "__main__":
    main()
