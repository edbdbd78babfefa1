"""The paper's pipeline on the toy world, arm by arm, over seeds, on a CPU.

    python experiments/toy_world.py [--toy toy --out runs/toy_world --seeds 0 1 2]

For every seed s, from the toy base model of that seed (`python experiments/toy.py --model-seed s`:
a random tiny Qwen2.5-VL pretrained on captions and direct answers of the same renderer, so it
reads images and has an attention sink on the system turn before any cold-start):

    base              the pretrained model, evaluated as it is
    sft_multimodal    cold-start SFT, LM loss, on toy/sft.jsonl (image + short reasoning)
    sft_text_only     the same chains without their images (toy/sft_text_only.jsonl)
    sft_avar          LM loss + alpha L_enhance + beta L_suppress (alpha = beta = 0.15, the paper's)
                      on the visual-anchored records of the synthesis path (toy/sft_anchored.jsonl:
                      synthesize.synthesize with toy.ToyTeacher), with the floor --agto-sys-floor
    grpo_plain        GRPO from sft_multimodal, r = r_acc + 0.1 r_format
    grpo_visual       GRPO from sft_avar, r = r_acc + 0.3 r_visual + 0.1 r_format, r_visual in its
                      bounded form (--visual-form share)
and three ablations that measure the other choices:
    sft_anchored      the anchored records with the LM loss only (the data synthesis alone)
    sft_avar_paper    sft_avar without the floor (the paper's formula)
    grpo_visual_ratio grpo_visual with the paper's unbounded r_visual (--visual-form ratio)

Each checkpoint is evaluated on the held-out problems (greedy; accuracy overall and per family,
VAS); the intervention (a_img, a_sys) is swept on every sft_multimodal checkpoint; a linear probe
asks whether the vision features carry shape, side and the taller bar; VAS is correlated with
accuracy over the checkpoints. Every training and evaluation is one of the project's commands,
printed before it runs. Outputs:
    experiments/results/toy_world.json     arms.<name>.runs[] and .summary (mean, 95% t-interval)
    experiments/results/vas_vs_accuracy.png, heatmap_base.png, heatmap_sft_avar.png
    README.md                              the toy-world section between its markers, from the JSON
The commands run with one thread each (OMP_NUM_THREADS=1, --num-workers 0): on a shared 2-core
machine that is faster than two threads fighting over the cores.
"""

import argparse
import json
import os
import random
import shlex
import shutil
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the project's modules, beside which the commands below run

import data  # noqa: E402
import toy  # noqa: E402
import vas  # noqa: E402
from data import build_prompt  # noqa: E402
from hub import resolve_checkpoint  # noqa: E402
from model import from_pretrained  # noqa: E402
from common import eval_state, fmt_ci, fmt_vas, mean_ci, run, scatter_png, update_readme  # noqa: E402
from vas import pearson  # noqa: E402

MAIN_ARMS = ["base", "sft_multimodal", "sft_text_only", "sft_avar", "grpo_plain", "grpo_visual"]
ABLATIONS = ["sft_anchored", "sft_avar_paper", "grpo_visual_ratio"]
RESULTS = os.path.join(ROOT, "experiments", "results")
README_BEGIN, README_END = "<!-- toy-world results: begin -->", "<!-- toy-world results: end -->"
DETAILS_BEGIN, DETAILS_END = "<!-- toy-world details: begin -->", "<!-- toy-world details: end -->"
DETAILS = os.path.join(ROOT, "experiments", "README.md")


# ---- evaluation results -------------------------------------------------------------------

def per_family(pred_path, families):
    """Accuracy (%) per family from a predictions file (write_toy_world assigns families round robin)."""
    right, total = [0] * len(families), [0] * len(families)
    with open(pred_path) as f:
        for line in f:
            p = json.loads(line)
            fam = int(p["id"].rsplit("-", 1)[1]) % len(families)
            right[fam] += bool(p["correct"])
            total[fam] += 1
    return {fam: 100.0 * r / max(n, 1) for fam, r, n in zip(families, right, total)}


def read_eval(folder, families):
    """The rows of evaluate.py's summary.json: {setting: {accuracy, vas, per_family, predictions}}."""
    with open(os.path.join(folder, "summary.json")) as f:
        rows = json.load(f)["rows"]
    return {r["setting"]: {"accuracy": r["accuracy"], "vas": r.get("mean_vas"),
                           "per_family": per_family(r["predictions"], families), "predictions": r["predictions"]}
            for r in rows}


# ---- the linear probe (issue: are shape, side and the taller bar in the vision features?) ---------

def probe(model_dirs, n_train=600, n_test=300, seed=0, steps=300):
    """Logistic regression on the vision features (the merged tokens the LM receives) of fresh toy
    problems: for each property, test accuracy with the tokens concatenated (token i = image cell
    i: a place is known by which token carries the shape) and mean-pooled (the place must be in the
    features themselves; the LM sees the tokens through attention, which is a weighted mean, with
    their M-RoPE positions). Chance: shape 1/3, side 1/2, taller 1/2, colour 1/5, count 1/4."""
    props = {"color": ("color", lambda f: list(toy.TOY_COLORS).index(f["shapes"][0]["color"])),
             "shape": ("shape", lambda f: toy.TOY_SHAPES.index(f["shapes"][0]["kind"])),
             "count": ("count", lambda f: f["count"] - 1),
             "side": ("side", lambda f: int(f["side"] == "right")),
             "bars": ("bars", lambda f: int(f["taller"] == "right"))}
    out = {}
    for name, path in model_dirs.items():
        model = from_pretrained(path, dtype=torch.float32, device="cpu").eval()
        proc = data.ImageProcessor.from_pretrained(resolve_checkpoint(path))
        out[name] = {}
        for prop, (family, label) in props.items():
            images, ys = [], []
            for i in range(n_train + n_test):
                img, *_, facts = toy.make_toy_problem(random.Random(f"probe/{seed}/{family}/{i}"), family)
                images.append(img)
                ys.append(label(facts))
            pv, grid = proc(images)
            with torch.no_grad():
                feats = model.visual(pv, grid)  # (n_images * tokens, D), image by image
            feats = feats.view(len(images), -1, feats.shape[-1])
            y = torch.tensor(ys)
            res = {}
            for kind, x in (("concat", feats.flatten(1)), ("mean", feats.mean(1))):
                x = (x - x[:n_train].mean(0)) / x[:n_train].std(0).clamp(min=1e-6)
                torch.manual_seed(seed)
                lin = torch.nn.Linear(x.shape[1], int(y.max()) + 1)
                opt = torch.optim.Adam(lin.parameters(), lr=0.05, weight_decay=1e-3)
                for _ in range(steps):
                    opt.zero_grad()
                    torch.nn.functional.cross_entropy(lin(x[:n_train]), y[:n_train]).backward()
                    opt.step()
                with torch.no_grad():
                    res[kind] = 100.0 * float((lin(x[n_train:]).argmax(1) == y[n_train:]).float().mean())
            out[name][prop] = res
    return out


def caption_check(model_dir, toy):
    """What the model says when asked to describe a held-out image (toy.CAPTION_QUESTION, greedy):
    the % of captions that state the fact each family asks for (its colour, its shape, how many,
    which side, which bar is taller). Separates seeing from answering: a fact the model names in
    its caption but misses in the question is lost in the answer, not in perception."""
    model = from_pretrained(model_dir, dtype=torch.float32, device="cpu").eval()
    tok, proc = data.Tokenizer(model_dir), data.ImageProcessor.from_pretrained(model_dir)
    world = json.load(open(os.path.join(toy, "toy_world.json")))
    families = world["families"]
    right, total = {f: 0 for f in families}, {f: 0 for f in families}
    for i, r in enumerate(json.loads(l) for l in open(os.path.join(toy, "eval.jsonl"))):
        fam = families[i % len(families)]
        pv, grid = proc([data.load_image(os.path.join(toy, r["images"][0]))])
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": toy.CAPTION_QUESTION}]}]
        ids = data.encode_chat(tok, msgs, image_tokens=[int(grid[0].prod()) // 4], add_generation_prompt=True)["input_ids"]
        out, n = model.generate([ids], pv, grid, max_new_tokens=48, stop_ids=tok.stop_ids, pad_id=tok.pad_id,
                                vocab_limit=tok.vocab_size)
        cap = tok.decode(out[0, :int(n[0])]).lower()
        gold = r["options"][ord(r["answer"]) - 65] if r["options"] else r["answer"]
        ok = {"color": f"{gold} " in cap, "shape": f" {gold}" in cap,
              "count": cap.startswith(f"{gold} shapes") if gold != "1" else cap.startswith("a "),
              "side": f"on the {gold}" in cap, "bars": f"the {gold} bar is taller" in cap}[fam]
        right[fam] += ok
        total[fam] += 1
    return {f: 100.0 * right[f] / max(total[f], 1) for f in families}


def system_share(model_dir, toy, n=64):
    """Mean share of the user turn's attention that goes to the system turn (over layers, heads,
    query tokens and n held-out prompts): the quantity --agto-sys-floor bounds."""
    model = from_pretrained(model_dir, dtype=torch.float32, device="cpu").eval()
    model_dir = resolve_checkpoint(model_dir)  # a run folder: its latest checkpoint
    tok, proc = data.Tokenizer(model_dir), data.ImageProcessor.from_pretrained(model_dir)
    recs = [json.loads(l) for l in open(os.path.join(toy, "eval.jsonl"))][:n]
    shares = []
    for r in recs:
        image = data.load_image(os.path.join(toy, r["images"][0]))
        pv, grid = proc([image])
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": data.build_prompt(r)}]}]
        enc = data.encode_chat(tok, msgs, image_tokens=[int(grid[0].prod()) // 4], add_generation_prompt=True)
        ids, roles = enc["input_ids"][None], enc["roles"][None]
        res = vas.measure_vas(model, dict(input_ids=ids, attention_mask=torch.ones_like(ids), roles=roles,
                                          pixel_values=pv, image_grid_thw=grid))
        m, _ = res.stats.stacked()  # (1, L, H, N, 4)
        valid = res.stats.valid[0]
        shares.append(float(m[0, :, :, valid, data.SYSTEM].mean()))
    return sum(shares) / len(shares)


# ---- pictures (pillow only) -----------------------------------------------------------------

ARM_COLOURS = {"base": (40, 40, 40), "sft_multimodal": (31, 119, 180), "sft_text_only": (255, 127, 14),
               "sft_avar": (44, 160, 44), "grpo_plain": (148, 103, 189), "grpo_visual": (214, 39, 40),
               "sft_anchored": (140, 86, 75), "sft_avar_paper": (227, 119, 194), "grpo_visual_ratio": (127, 127, 127)}


# ---- the README section ---------------------------------------------------------------------

def readme_summary(res):
    """The README's toy-world table (the arms over seeds, the correlation) and a pointer to the rest."""
    lines = readme_section(res).split("\n")
    table = lines[2:lines.index("Training-free intervention on the sft_multimodal checkpoints (accuracy change in points "
                                "against a_img = a_sys = 0, mean over seeds [95% interval]):")]
    return "\n".join([README_BEGIN, "", *table, "The intervention sweep, the linear probe, the captions, the bounded "
                      "ratios and the figures: `experiments/README.md`.", "", README_END])


def readme_section(res):
    """The toy-world tables of experiments/README.md, from toy_world.json alone."""
    fams = res["families"]
    lines = [DETAILS_BEGIN, "",
             f"Measured by `python experiments/toy_world.py` (seeds {', '.join(map(str, res['seeds']))}; "
             f"{res['n_eval']} held-out problems; "
             "mean over seeds with its 95% t-interval in brackets; accuracy in %; chance "
             f"{res['chance']:.1f}%: " + ", ".join(f"{k} {v:.0f}%" for k, v in res["chance_by_family"].items())
             + "). Written from `experiments/results/toy_world.json`.", "",
             "| arm | accuracy | " + " | ".join(fams) + " | VAS |",
             "|---|---|" + "---|" * len(fams) + "---|"]
    for name in MAIN_ARMS + ABLATIONS:
        if name not in res["arms"]:
            continue
        a = res["arms"][name]
        s = a["summary"]
        fam = " | ".join(f"{s['per_family'][f]['mean']:.0f}" for f in fams)
        label = name if name in MAIN_ARMS else f"*{name}* (ablation)"
        lines.append(f"| {label} | {fmt_ci(s['accuracy'])} | {fam} | {fmt_vas(s['vas'])} |")
    c = res["correlation"]
    lines += ["", f"VAS against accuracy over the {c['n']} checkpoints of the six arms: Pearson r = "
              f"{c['r']:.3f} (p = {c['p']:.2g}); with the ablations ({res['correlation_all']['n']} checkpoints): "
              f"r = {res['correlation_all']['r']:.3f} (p = {res['correlation_all']['p']:.2g})."
              if c["r"] is not None else "", ""]
    sw = res["intervention"]
    lines += ["Training-free intervention on the sft_multimodal checkpoints (accuracy change in points against "
              "a_img = a_sys = 0, mean over seeds [95% interval]):", "",
              "| a_img | a_sys | accuracy | change | VAS |", "|---|---|---|---|---|"]
    for row in sw:
        lines.append(f"| {row['a_img']} | {row['a_sys']} | {fmt_ci(row['accuracy'])} | {fmt_ci(row['delta'])} | "
                     f"{fmt_vas(row['vas'])} |")
    lines += ["", "Linear probe on the vision features (test accuracy %, "
              f"{res['probe']['n_train']} training and {res['probe']['n_test']} test images per property; "
              "concat: the merged tokens side by side, mean: averaged over tokens):", "",
              "| model | " + " | ".join(f"{p} concat | {p} mean" for p in res["probe"]["models"][next(iter(res["probe"]["models"]))]) + " |",
              "|---|" + "---|---|" * len(res["probe"]["models"][next(iter(res["probe"]["models"]))])]
    for model, props in res["probe"]["models"].items():
        lines.append(f"| {model} | " + " | ".join(f"{v['concat']:.0f} | {v['mean']:.0f}" for v in props.values()) + " |")
    cs = res["captions"]["summary"]
    lines += ["", "What the base models say when asked to describe a held-out image (`Describe the image.`, "
              "greedy): % of captions that state the fact the family's question asks for: "
              + ", ".join(f"{f} {fmt_ci(cs[f], 0)}" for f in fams) + "."]
    b = res["bounded"]
    lines += ["", f"System share of the user turn's attention (base models, mean over seeds): "
              f"{b['base_sys_share']['mean']:.3f}; sft_avar floors it at {b['sys_floor']} (--agto-sys-floor). "
              f"Fraction of the query rows (over layers and heads) at or below the floor over the last 20 training steps: sft_avar "
              f"{b['at_floor']['sft_avar']['mean']:.2f}, sft_avar_paper {b['at_floor']['sft_avar_paper']['mean']:.2f}; "
              f"system share there: sft_avar {b['final_sys_share']['sft_avar']['mean']:.2e}, sft_avar_paper "
              f"{b['final_sys_share']['sft_avar_paper']['mean']:.2e}. Largest lambda_v * r_visual in GRPO: "
              f"grpo_visual (share) {b['max_weighted_visual']['grpo_visual']['mean']:.3g}, grpo_visual_ratio "
              f"(the paper's ratio) {b['max_weighted_visual']['grpo_visual_ratio']['mean']:.3g}.", "",
              "![VAS against accuracy](results/vas_vs_accuracy.png)", "",
              "![attention on the image, base model](results/heatmap_base.png)", "",
              "![attention on the image, sft_avar](results/heatmap_sft_avar.png)", "", DETAILS_END]
    return "\n".join(lines)


# ---- the experiment -------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--toy", default="toy", help="toy world folder (written with `python experiments/toy.py` if missing)")
    ap.add_argument("--out", default="runs/toy_world", help="checkpoints and evaluations")
    ap.add_argument("--results", default=RESULTS, help="toy_world.json and the PNG figures")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--sft-epochs", type=float, default=3)
    ap.add_argument("--sft-lr", type=float, default=5e-4)
    ap.add_argument("--agto", type=float, default=0.15, help="alpha = beta of the objective (the paper's 0.15)")
    ap.add_argument("--sys-floor", type=float, default=0.25, help="the floor of sft_avar (--agto-sys-floor)")
    ap.add_argument("--grpo-steps", type=int, default=40)
    ap.add_argument("--grpo-lr", type=float, default=1e-4)
    ap.add_argument("--a-img", type=float, nargs="+", default=[0.0, 0.15])
    ap.add_argument("--a-sys", type=float, nargs="+", default=[0.0, 0.05, 0.4])
    ap.add_argument("--limit", type=int, default=None, help="evaluate on the first N held-out problems")
    ap.add_argument("--world-args", default="", help='extra arguments of `experiments/toy.py`, e.g. "--n-train 64" (tiny runs)')
    ap.add_argument("--no-readme", action="store_true", help="do not rewrite the README section")
    args = ap.parse_args()
    os.chdir(ROOT)  # every path (and every command run) is relative to the repository root
    t_start = time.time()
    py, toy, out = sys.executable, args.toy, args.out
    os.makedirs(os.path.join(out, "eval"), exist_ok=True)
    os.makedirs(args.results, exist_ok=True)

    # 1. the base model of every seed (cached: experiments/toy.py skips a base pretrained with the same settings)
    bases = {}
    for s in args.seeds:
        bases[s] = os.path.join(toy, "model") if s == args.seeds[0] else os.path.join(out, f"base_{s}")
        run([py, "experiments/toy.py", "--out", toy, "--model-seed", str(s), "--model-out", bases[s], *shlex.split(args.world_args)],
            log=os.path.join(out, f"base_{s}.log"))
    world = json.load(open(os.path.join(toy, "toy_world.json")))
    families = world["families"]

    sft = [py, "train_sft.py", "--epochs", str(args.sft_epochs), "--lr", str(args.sft_lr), "--batch-size", "16",
           "--micro-batch", "8", "--save-every", "0", "--num-workers", "0"]
    plain = ["--agto-alpha", "0", "--agto-beta", "0"]
    guided = ["--agto-alpha", str(args.agto), "--agto-beta", str(args.agto)]
    grpo = [py, "train_grpo.py", "--data", f"{toy}/rl.jsonl", "--lr", str(args.grpo_lr), "--max-steps",
            str(args.grpo_steps), "--group-size", "4", "--prompts-per-step", "8", "--max-new-tokens", "64",
            "--save-every", "0"]
    limit = ["--limit", str(args.limit)] if args.limit else []
    ev = [py, "evaluate.py", "--bench", f"{toy}/eval.jsonl", "--batch-size", "32", "--max-new-tokens", "100",
          "--no-progress", *limit]

    runs = {name: [] for name in MAIN_ARMS + ABLATIONS}
    sweeps, train_logs = [], {name: [] for name in MAIN_ARMS + ABLATIONS}
    for s in args.seeds:
        d = lambda arm: os.path.join(out, f"{arm}_s{s}")  # noqa: E731
        plan = {  # arm -> (command, the checkpoint it starts from)
            "sft_multimodal": sft + plain + ["--data", f"{toy}/sft.jsonl", "--model", bases[s]],
            "sft_text_only": sft + plain + ["--data", f"{toy}/sft_text_only.jsonl", "--model", bases[s]],
            "sft_anchored": sft + plain + ["--data", f"{toy}/sft_anchored.jsonl", "--model", bases[s]],
            "sft_avar": sft + guided + ["--agto-sys-floor", str(args.sys_floor), "--data", f"{toy}/sft_anchored.jsonl",
                                        "--model", bases[s]],
            "sft_avar_paper": sft + guided + ["--data", f"{toy}/sft_anchored.jsonl", "--model", bases[s]],
            "grpo_plain": grpo + ["--model", d("sft_multimodal"), "--lambda-v", "0"],
            "grpo_visual": grpo + ["--model", d("sft_avar"), "--lambda-v", "0.3", "--visual-form", "share"],
            "grpo_visual_ratio": grpo + ["--model", d("sft_avar"), "--lambda-v", "0.3", "--visual-form", "ratio"],
        }
        for arm, cmd in plan.items():
            if not os.path.exists(os.path.join(d(arm), "latest")):
                if os.path.exists(d(arm)):
                    shutil.rmtree(d(arm))  # an unfinished run: start it again
                run(cmd + ["--out", d(arm), "--seed", str(s)], log=d(arm) + ".log")
        for arm in MAIN_ARMS + ABLATIONS:
            model = bases[s] if arm == "base" else d(arm)
            sweep = (["--a-img", *map(str, args.a_img), "--a-sys", *map(str, args.a_sys)]
                     if arm == "sft_multimodal" else [])
            folder = os.path.join(out, "eval", f"{arm}_s{s}")
            state = eval_state(folder, model, len({(a, b) for a in args.a_img for b in args.a_sys}) if sweep else 1)
            if state == "other":
                shutil.rmtree(folder)
            if state != "done":  # an unfinished evaluation of these weights continues
                run(ev + ["--model", model, "--out", folder, *sweep], log=folder + ".log")
            rows = read_eval(folder, families)
            r = rows["base"]
            runs[arm].append({"seed": s, "accuracy": r["accuracy"], "per_family": r["per_family"], "vas": r["vas"],
                              "checkpoint": model})
            if arm == "sft_multimodal":
                sweeps.append(rows)
            metrics = os.path.join(d(arm), "metrics.jsonl")
            if arm != "base" and os.path.exists(metrics):
                train_logs[arm].append([json.loads(l) for l in open(metrics)])
        print(f"seed {s} done after {(time.time() - t_start) / 60:.1f} min", flush=True)

    # 2. summaries over seeds
    arms = {}
    for name, rs in runs.items():
        arms[name] = {"runs": rs, "summary": {
            "accuracy": mean_ci([r["accuracy"] for r in rs]), "vas": mean_ci([r["vas"] for r in rs]),
            "per_family": {f: mean_ci([r["per_family"][f] for r in rs]) for f in families}}}
    main_pts = [(n, r["vas"], r["accuracy"]) for n in MAIN_ARMS for r in runs[n] if r["vas"] is not None]
    all_pts = [(n, r["vas"], r["accuracy"]) for n in MAIN_ARMS + ABLATIONS for r in runs[n] if r["vas"] is not None]
    correlation = pearson([p[1] for p in main_pts], [p[2] for p in main_pts])
    correlation_all = pearson([p[1] for p in all_pts], [p[2] for p in all_pts])

    settings = [k for k in sweeps[0]]
    intervention = []
    for k in settings:
        a_img, a_sys = (0.0, 0.0) if k == "base" else [float(x) for x in k.replace("aimg", "").split("_asys")]
        intervention.append({"setting": k, "a_img": a_img, "a_sys": a_sys,
                             "accuracy": mean_ci([sw[k]["accuracy"] for sw in sweeps]),
                             "delta": mean_ci([sw[k]["accuracy"] - sw["base"]["accuracy"] for sw in sweeps]),
                             "vas": mean_ci([sw[k]["vas"] for sw in sweeps]),
                             "runs": [{"accuracy": sw[k]["accuracy"], "vas": sw[k]["vas"]} for sw in sweeps]})

    # 3. the bounded ratios, as measured
    def last(arm, key, n=20):
        return [sum(row[key] for row in log[-n:]) / len(log[-n:]) for log in train_logs[arm] if log and log[-1].get(key) is not None]

    def max_visual(arm):
        # the largest step mean of lambda_v * r_visual over the correct answers (the gated term)
        return [max(0.3 * (row.get("reward_visual_correct") or 0.0) for row in log) for log in train_logs[arm]]

    base_share = [system_share(bases[s], toy) for s in args.seeds]
    bounded = {"sys_floor": args.sys_floor, "agto": args.agto,
               "base_sys_share": mean_ci(base_share), "base_sys_share_runs": base_share,
               "at_floor": {a: mean_ci(last(a, "at_floor")) for a in ("sft_avar", "sft_avar_paper")},
               "final_sys_share": {a: mean_ci(last(a, "sys_share")) for a in ("sft_avar", "sft_avar_paper")},
               "max_weighted_visual": {a: mean_ci(max_visual(a)) for a in ("grpo_visual", "grpo_visual_ratio")},
               "grpo_reward_last": {a: mean_ci(last(a, "reward")) for a in ("grpo_plain", "grpo_visual", "grpo_visual_ratio")}}

    # 4. the probe, on the first seed's base and its random initialisation
    p = probe({"random init": bases[args.seeds[0]] + ".init", "base (pretrained)": bases[args.seeds[0]],
               "sft_multimodal": os.path.join(out, f"sft_multimodal_s{args.seeds[0]}")})

    captions = [caption_check(bases[s], toy) for s in args.seeds]

    res = {"seeds": args.seeds, "n_eval": world["eval"] if not args.limit else args.limit, "families": families,
           "accuracy_unit": "percent", "chance": 100 * world["chance"],
           "chance_by_family": {k: 100 * v for k, v in world["chance_by_family"].items()},
           "settings": {k: v for k, v in vars(args).items() if k not in ("no_readme",)},
           "arms": arms, "correlation": correlation, "correlation_all": correlation_all,
           "intervention": intervention, "bounded": bounded,
           "probe": {"n_train": 600, "n_test": 300, "models": p},
           "captions": {"runs": captions, "summary": {f: mean_ci([c[f] for c in captions]) for f in families}}}

    res["minutes"] = (time.time() - t_start) / 60  # the training and evaluation (the figures follow)
    with open(os.path.join(args.results, "toy_world.json"), "w") as f:
        json.dump(res, f, indent=1)

    # 5. pictures
    if correlation["r"] is not None:
        scatter_png(main_pts + [pt for pt in all_pts if pt[0] in ABLATIONS and abs(pt[1]) < 1e3],  # not VAS ~1e13
                    os.path.join(args.results, "vas_vs_accuracy.png"),
                    "VAS vs accuracy, one dot per checkpoint (toy world)", correlation, ARM_COLOURS)
    rec = [json.loads(l) for l in open(os.path.join(toy, "eval.jsonl"))][2]  # a count problem (round robin)
    for arm, model in (("base", bases[args.seeds[0]]), ("sft_avar", os.path.join(out, f"sft_avar_s{args.seeds[0]}"))):
        run([py, "vas.py", "--model", model, "--image", os.path.join(toy, rec["images"][0]), "--question",
             build_prompt(rec), "--out", os.path.join(args.results, f"heatmap_{arm}.png")],
            log=os.path.join(out, f"heatmap_{arm}.log"))
    section = readme_section(res)
    if not args.no_readme:
        update_readme(section, DETAILS_BEGIN, DETAILS_END, DETAILS)
        update_readme(readme_summary(res), README_BEGIN, README_END)
    print(section)


if __name__ == "__main__":
    main()
