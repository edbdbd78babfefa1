"""The cost of a checkpoint's fingerprint (hub.model_identity: sha256 of config.json and every
weight file), against loading the same checkpoint with this project's `from_pretrained`.

    python bench/bench_fingerprint.py [--hidden 2048 --layers 16 --shard-mb 256]

Writes a random bf16 checkpoint (Qwen2.5-VL architecture, ~1 GB with the defaults, in shards as
the trainers write them above --shard-mb), then, alternately and three times each, times
`model_identity` (the files hashed in parallel threads), the same sha256 one file after another
(one core), and `from_pretrained` in bf16 on the CPU. The files are in the page cache after the
first round, so both read from memory: what is measured is the hashing against the load, not the
disk. Prints the best time of each, in MB/s and as a ratio to the load.
"""

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--shard-mb", type=int, default=256)
    args = ap.parse_args()
    sys.path.insert(0, ROOT)
    import torch
    from hub import checkpoint_files, file_sha256, fingerprint_files, model_identity
    from model import Config, Qwen2_5_VL, VisionConfig, from_pretrained, init_weights, save_pretrained

    cfg = Config(vocab_size=32000, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                 num_hidden_layers=args.layers, num_attention_heads=args.hidden // 128, num_key_value_heads=2,
                 vision=VisionConfig(depth=4, hidden_size=512, num_heads=8, intermediate_size=1024,
                                     fullatt_block_indexes=[3], out_hidden_size=args.hidden))
    with tempfile.TemporaryDirectory() as d:
        save_pretrained(init_weights(Qwen2_5_VL(cfg)).to(torch.bfloat16), d, max_shard_bytes=args.shard_mb << 20)
        size = sum(os.path.getsize(f) for f in checkpoint_files(d))
        runs = {"model_identity (threads)": lambda: model_identity(d),
                "sha256, one core": lambda: [file_sha256(os.path.join(d, n)) for n in fingerprint_files(d)],
                "from_pretrained bf16": lambda: from_pretrained(d, dtype=torch.bfloat16)}
        best = {k: float("inf") for k in runs}
        for _ in range(3):
            for name, fn in runs.items():
                t = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - t)
        print(f"checkpoint: {size / 2**20:.0f} MiB in {len(checkpoint_files(d))} files; {os.cpu_count()} cores; "
              f"torch threads {torch.get_num_threads()}")
        load = best["from_pretrained bf16"]
        for name, t in best.items():
            print(f"{name:28s} {t:7.2f} s  {size / 2**20 / t:7.0f} MiB/s  {t / load:5.2f}x the load")


if __name__ == "__main__":
    main()
