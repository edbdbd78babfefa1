"""The paper's comparison on the toy world, end to end on a CPU.

    python experiments/toy_world.py [--toy toy --out runs/exp --epochs 2]

Trains three cold-start models from the same random initialisation (toy/model):
    plain SFT           LM loss only
    AVAR objective      LM loss + alpha * L_enhance + beta * L_suppress (train_sft.py defaults)
    text-only SFT       LM loss on the same reasoning chains without images
evaluates each on the held-out toy problems (accuracy and VAS), sweeps the training-free
intervention (a_img, a_sys) on the plain SFT model, correlates VAS with accuracy across all of
these result files, and writes one markdown table to OUT/results.md. Every step is one of the
project's commands, printed before it runs, so each row can be reproduced by hand.
"""

import argparse
import glob
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd):
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--toy", default="toy", help="toy world folder (made with `python data.py toy` if missing)")
    ap.add_argument("--out", default="runs/exp")
    ap.add_argument("--epochs", type=float, default=3)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--agto", type=float, default=0.15, help="alpha = beta of the AVAR objective")
    ap.add_argument("--a-img", type=float, nargs="+", default=[0.0, 0.15, 0.5])
    ap.add_argument("--a-sys", type=float, nargs="+", default=[0.0, 0.05, 0.4])
    ap.add_argument("--limit", type=int, default=None, help="evaluate on the first N held-out problems")
    args = ap.parse_args()
    py = sys.executable
    toy, out = args.toy, args.out
    if not os.path.exists(os.path.join(toy, "eval.jsonl")):
        run([py, "data.py", "toy", "--out", toy])
    train = [py, "train_sft.py", "--model", os.path.join(toy, "model"), "--epochs", str(args.epochs),
             "--lr", str(args.lr), "--batch-size", str(args.batch_size), "--micro-batch", "8", "--save-every", "0"]
    runs = {
        "plain SFT": ["--data", f"{toy}/sft.jsonl", "--agto-alpha", "0", "--agto-beta", "0"],
        "AVAR objective": ["--data", f"{toy}/sft.jsonl", "--agto-alpha", str(args.agto), "--agto-beta", str(args.agto)],
        "text-only SFT": ["--data", f"{toy}/sft_text_only.jsonl", "--agto-alpha", "0", "--agto-beta", "0"],
    }
    folders = {}
    for name, extra in runs.items():
        folder = os.path.join(out, name.split()[0].replace("-", "_").lower())
        folders[name] = folder
        if not os.path.exists(os.path.join(folder, "latest")):
            run(train + extra + ["--out", folder])
    limit = ["--limit", str(args.limit)] if args.limit else []
    ev = [py, "evaluate.py", "--bench", f"{toy}/eval.jsonl", "--batch-size", "32", "--max-new-tokens", "200",
          "--no-progress", *limit]
    for name, folder in folders.items():
        sweep = ["--a-img", *map(str, args.a_img), "--a-sys", *map(str, args.a_sys)] if name == "plain SFT" else []
        run(ev + ["--model", folder, "--out", os.path.join(folder, "eval"), *sweep])

    rows = []
    for name, folder in folders.items():
        for r in json.load(open(os.path.join(folder, "eval", "summary.json")))["rows"]:
            rows.append((name, r))
    preds = sorted(glob.glob(os.path.join(out, "*", "eval", "predictions", "*.jsonl")))
    run([py, "evaluate.py", "--correlate", *preds, "--out", out])
    corr = json.load(open(os.path.join(out, "correlation.json")))
    chance = json.load(open(os.path.join(toy, "toy_world.json")))["chance"]
    lines = ["| model | setting | n | accuracy | VAS |", "|---|---|---|---|---|"]
    for name, r in rows:
        vas = "-" if r.get("mean_vas") is None else f"{r['mean_vas']:.4g}"
        lines.append(f"| {name} | {r['setting']} | {r['n']} | {r['accuracy']:.1f}% | {vas} |")
    lines.append("")
    lines.append(f"Chance accuracy on the held-out split: {100 * chance:.1f}%. Pearson r between VAS and accuracy "
                 f"over the {corr.get('n')} result files with a finite VAS: {corr.get('r')} (p = {corr.get('p')}).")
    table = "\n".join(lines)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
