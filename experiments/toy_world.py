"""The paper's comparison on the toy world, end to end on a CPU.

    python experiments/toy_world.py [--toy toy --out runs/exp --epochs 8]

Trains four cold-start models from the same random initialisation (toy/model), with the README
main job's settings (lr 5e-4, 8 epochs, batch 16):
    plain SFT                   LM loss only
    AVAR objective              LM loss + alpha * L_enhance + beta * L_suppress, alpha = beta = 0.02
                                (the README main job: the toy's weights, see the README)
    AVAR objective, paper weights   the same with alpha = beta = 0.15 (train_sft.py's defaults)
    text-only SFT               LM loss on the same reasoning chains without images
evaluates each on the held-out toy problems (accuracy overall and per family, and VAS), sweeps the
training-free intervention (a_img, a_sys) on the plain SFT model, correlates VAS with accuracy
across all of these result files, and writes one markdown table to OUT/results.md. Every step is
one of the project's commands, printed before it runs, so each row can be reproduced by hand.
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
    subprocess.run(cmd, check=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--toy", default="toy", help="toy world folder (made with `python data.py toy` if missing)")
    ap.add_argument("--out", default="runs/exp")
    ap.add_argument("--epochs", type=float, default=8)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--agto", type=float, default=0.02, help="alpha = beta of the AVAR objective (the toy's weights)")
    ap.add_argument("--paper-agto", type=float, default=0.15, help="alpha = beta of the paper's weights")
    ap.add_argument("--a-img", type=float, nargs="+", default=[0.0, 0.15, 0.5])
    ap.add_argument("--a-sys", type=float, nargs="+", default=[0.0, 0.05, 0.4])
    ap.add_argument("--limit", type=int, default=None, help="evaluate on the first N held-out problems")
    args = ap.parse_args()
    os.chdir(ROOT)  # every path (and every command run) is relative to the repository root
    py = sys.executable
    toy, out = args.toy, args.out
    if not os.path.exists(os.path.join(toy, "eval.jsonl")):
        run([py, "data.py", "toy", "--out", toy])
    train = [py, "train_sft.py", "--model", os.path.join(toy, "model"), "--epochs", str(args.epochs),
             "--lr", str(args.lr), "--batch-size", str(args.batch_size), "--micro-batch", "8", "--save-every", "0"]
    runs = {
        "plain SFT": ["--data", f"{toy}/sft.jsonl", "--agto-alpha", "0", "--agto-beta", "0"],
        "AVAR objective": ["--data", f"{toy}/sft.jsonl", "--agto-alpha", str(args.agto), "--agto-beta", str(args.agto)],
        "AVAR objective, paper weights": ["--data", f"{toy}/sft.jsonl", "--agto-alpha", str(args.paper_agto),
                                          "--agto-beta", str(args.paper_agto)],
        "text-only SFT": ["--data", f"{toy}/sft_text_only.jsonl", "--agto-alpha", "0", "--agto-beta", "0"],
    }
    folders = {}
    for name, extra in runs.items():
        folder = os.path.join(out, name.replace(",", "").replace("-", "_").replace(" ", "_").lower())
        folders[name] = folder
        if not os.path.exists(os.path.join(folder, "latest")):
            run(train + extra + ["--out", folder])
    limit = ["--limit", str(args.limit)] if args.limit else []
    ev = [py, "evaluate.py", "--bench", f"{toy}/eval.jsonl", "--batch-size", "32", "--max-new-tokens", "100",
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
    world = json.load(open(os.path.join(toy, "toy_world.json")))
    families = world["families"]  # write_toy_world assigns them round robin: record i is families[i % n]
    lines = ["| model | setting | n | accuracy | " + " | ".join(families) + " | VAS |",
             "|---|---|---|---|" + "---|" * len(families) + "---|"]
    for name, r in rows:
        right, total = [0] * len(families), [0] * len(families)
        with open(r["predictions"]) as f:
            for line in f:
                p = json.loads(line)
                fam = int(p["id"].rsplit("-", 1)[1]) % len(families)
                right[fam] += bool(p["correct"])
                total[fam] += 1
        per_family = " | ".join(f"{100 * a / max(n, 1):.0f}%" for a, n in zip(right, total))
        vas = "-" if r.get("mean_vas") is None else f"{r['mean_vas']:.4g}"
        lines.append(f"| {name} | {r['setting']} | {r['n']} | {r['accuracy']:.1f}% | {per_family} | {vas} |")
    chance = world["chance"]
    lines.append("")
    lines.append(f"Chance accuracy on the held-out split: {100 * chance:.1f}% (per family: "
                 + ", ".join(f"{k} {100 * v:.0f}%" for k, v in world["chance_by_family"].items()) + "). Pearson r between VAS and accuracy "
                 f"over the {corr.get('n')} result files with a finite VAS: {corr.get('r')} (p = {corr.get('p')}).")
    table = "\n".join(lines)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
