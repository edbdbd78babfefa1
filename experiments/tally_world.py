"""The paper's claims on the tally world (experiments/tally.py), as pre-registered in
experiments/README.md, over seeds, on a CPU.

    python experiments/tally_world.py [--world tally --out runs/tally_world --seeds 0 1 2 3 4]

For every seed s, from the tally base model of that seed (a random tiny Qwen2.5-VL pretrained on
captions and hinted questions answered at once):

    base            the pretrained model, as it is
    sft_multimodal  cold-start SFT, LM loss, on sft.jsonl (image + chain)
    sft_text_only   the same chains without their images
    sft_anchored    the visual-anchored records of the paper's synthesis (TallyTeacher), LM loss
    sft_avar        sft_anchored + 0.15 L_enhance + 0.15 L_suppress (the paper's weights), floor 0.25
    grpo_plain      GRPO from sft_avar, r = r_acc + 0.1 r_format
    grpo_visual     GRPO from sft_avar, r = r_acc + 0.3 r_visual + 0.1 r_format (bounded share form)

Every checkpoint is evaluated greedily on both test splits (eval_id: the hint is right 80% of the
time as in training; eval_shift: the hint is always wrong), with VAS; sft_multimodal also under
the intervention (a_img 0.15, a_sys 0.05). The base models' perception is checked before any arm
is judged: a linear probe on the vision features and the base's own captions, per family.
Everything is resumable (a finished run or evaluation is kept); each command is printed before it
runs. Outputs: experiments/results/tally_world_v<N>.json, tally_vas_vs_accuracy_v<N>.png, the README's
tally section between its markers, all written from the JSON.
"""

import argparse
import json
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the project's modules, beside which the commands below run

import data  # noqa: E402
import tally  # noqa: E402
from common import eval_state, fisher_ci, fmt_ci, fmt_vas, mean_ci, run, scatter_png, update_readme, verdict  # noqa: E402
from hub import resolve_checkpoint  # noqa: E402
from model import from_pretrained  # noqa: E402
from vas import pearson  # noqa: E402

ARMS = ["base", "sft_multimodal", "sft_text_only", "sft_anchored", "sft_avar", "grpo_plain", "grpo_visual"]
SPLITS = ["eval_id", "eval_shift"]
INTERVENTION = (0.15, 0.05)  # (a_img, a_sys): the paper's a_img, the smallest a_sys of its sweep
EQUIVALENCE = 0.25  # "keeps VAS": the paired relative change lies within +-25%
RESULTS = os.path.join(ROOT, "experiments", "results")
README_BEGIN, README_END = "<!-- tally-world results: begin -->", "<!-- tally-world results: end -->"
COLOURS = {"base": (40, 40, 40), "sft_multimodal": (31, 119, 180), "sft_text_only": (255, 127, 14),
           "sft_anchored": (140, 86, 75), "sft_avar": (44, 160, 44), "grpo_plain": (148, 103, 189),
           "grpo_visual": (214, 39, 40)}


# ---- perception of the base model --------------------------------------------------------------

def probe(model_dir, n_train=600, n_test=300, seed=0, steps=300):
    """Logistic regression from the vision features (the 9 merged tokens the LM receives) of fresh
    problems to each colour's count (0-4): test accuracy with the tokens concatenated and
    mean-pooled. Every question of the world is a function of these three counts."""
    model = from_pretrained(model_dir, dtype=torch.float32, device="cpu").eval()
    proc = data.ImageProcessor.from_pretrained(resolve_checkpoint(model_dir))
    rng = random.Random(f"tally-probe/{seed}")
    images, counts = [], []
    for _ in range(n_train + n_test):
        c = tally.draw_counts(rng)
        images.append(tally.render(rng, c)[0])
        counts.append(c)
    pv, grid = proc(images)
    with torch.no_grad():
        feats = model.visual(pv, grid).view(len(images), -1, model.cfg.hidden_size)  # (N, 9, D)
    out = {}
    for colour in tally.COLORS:
        y = torch.tensor([c[colour] for c in counts])
        res = {}
        for kind, x in (("concat", feats.flatten(1)), ("mean", feats.mean(1))):
            x = (x - x[:n_train].mean(0)) / x[:n_train].std(0).clamp(min=1e-6)
            torch.manual_seed(seed)
            lin = torch.nn.Linear(x.shape[1], tally.MAX_PER_COLOR + 1)
            opt = torch.optim.Adam(lin.parameters(), lr=0.05, weight_decay=1e-3)
            for _ in range(steps):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(lin(x[:n_train]), y[:n_train]).backward()
                opt.step()
            with torch.no_grad():
                res[kind] = 100.0 * float((lin(x[n_train:]).argmax(1) == y[n_train:]).float().mean())
        out[colour] = res
    return out


def parse_caption(text):
    """{colour: count} from a caption "2 red, 0 green, 3 blue." (colours it does not state are absent)."""
    return {c: int(n) for n, c in re.findall(r"(\d+) (" + "|".join(tally.COLORS) + r")\b", text)}


def caption_check(model_dir, world, split="eval_id", batch=64):
    """The base model's own captions (tally.CAPTION_QUESTION, greedy) of the split's images: per
    family, the % of problems whose caption states the right count of every colour the question
    asks about (the facts the answer is computed from)."""
    model = from_pretrained(model_dir, dtype=torch.float32, device="cpu").eval()
    tok, proc = data.Tokenizer(model_dir), data.ImageProcessor.from_pretrained(model_dir)
    recs = read_split(world, split)
    right, total = {f: 0 for f in tally.FAMILIES}, {f: 0 for f in tally.FAMILIES}
    for start in range(0, len(recs), batch):
        chunk = recs[start:start + batch]
        pv, grid = proc([data.load_image(os.path.join(world, r["images"][0])) for r in chunk])
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": tally.CAPTION_QUESTION}]}]
        ids = [data.encode_chat(tok, msgs, image_tokens=[int(g.prod()) // 4], add_generation_prompt=True)["input_ids"]
               for g in grid]
        out, n = model.generate(ids, pv, grid, max_new_tokens=24, stop_ids=tok.stop_ids, pad_id=tok.pad_id,
                                vocab_limit=tok.vocab_size)
        for i, r in enumerate(chunk):
            said = parse_caption(tok.decode(out[i, :int(n[i])]))
            right[r["family"]] += all(said.get(c) == r["counts"][c] for c in r["colors"])
            total[r["family"]] += 1
    return {f: 100.0 * right[f] / max(total[f], 1) for f in tally.FAMILIES}


def read_split(world, split):
    with open(os.path.join(world, f"{split}.jsonl")) as f:
        return [json.loads(line) for line in f]


def gate(perception, sft_loss_gate=None, bar=90.0):
    """The pre-registered gates of one seed: its base's mean-pooled probe of every colour and its
    captions of every family at or above the bar; from version 2, every SFT arm's final LM loss
    (mean of the last 20 steps) at or below sft_loss_gate."""
    ok = (all(v["mean"] >= bar for v in perception["probe"].values())
          and all(v >= bar for v in perception["captions"].values()))
    if sft_loss_gate is not None:
        ok = ok and all(v <= sft_loss_gate for v in perception["sft_loss"].values())
    return ok


# ---- evaluation results ----------------------------------------------------------------------

def read_eval(folder, world):
    """{(split, setting): {accuracy, vas, per_family, hint_follow, n}} from evaluate.py's outputs.
    hint_follow: the % of answers equal to the question's hint (reading the text over the pixels)."""
    with open(os.path.join(folder, "summary.json")) as f:
        rows = json.load(f)["rows"]
    recs = {s: {r["id"]: r for r in read_split(world, s)} for s in SPLITS}
    out = {}
    for row in rows:
        split = row["benchmark"]
        fam_right, fam_total, follow, n = {}, {}, 0, 0
        with open(row["predictions"]) as f:
            for line in f:
                p = json.loads(line)
                rec = recs[split][p["id"]]
                fam = rec["family"]
                fam_right[fam] = fam_right.get(fam, 0) + bool(p["correct"])
                fam_total[fam] = fam_total.get(fam, 0) + 1
                follow += (p["extracted"] or "").strip().lower() == rec["hint"].lower()
                n += 1
        out[(split, row["setting"])] = {
            "accuracy": row["accuracy"], "vas": row.get("mean_vas"), "n": n, "hint_follow": 100.0 * follow / max(n, 1),
            "per_family": {f: 100.0 * fam_right[f] / fam_total[f] for f in fam_total}}
    return out


# ---- the pre-registered statistics -------------------------------------------------------------

def paired(runs, a, b, split, key="accuracy"):
    """Mean over seeds of (arm a - arm b) on the same seed, with its 95% t-interval, and the verdict."""
    by_seed = {r["seed"]: r for r in runs[b]}
    diffs = [r[split][key] - by_seed[r["seed"]][split][key] for r in runs[a] if r["seed"] in by_seed]
    s = mean_ci(diffs)
    return {**s, "diffs": diffs, "verdict": verdict(s["ci_low"], s["ci_high"])}


def relative_change(runs, a, b, split):
    """Paired relative change of VAS, (VAS_a - VAS_b) / VAS_b, with its interval and the
    equivalence verdict: holds if the interval lies within +-EQUIVALENCE, does not hold if it lies
    wholly outside, inconclusive otherwise."""
    by_seed = {r["seed"]: r for r in runs[b]}
    rel = [(r[split]["vas"] - by_seed[r["seed"]][split]["vas"]) / by_seed[r["seed"]][split]["vas"]
           for r in runs[a] if r["seed"] in by_seed]
    s = mean_ci(rel)
    if s["ci_low"] is None:
        v = "inconclusive"
    elif -EQUIVALENCE <= s["ci_low"] and s["ci_high"] <= EQUIVALENCE:
        v = "holds"
    elif s["ci_low"] > EQUIVALENCE or s["ci_high"] < -EQUIVALENCE:
        v = "does not hold"
    else:
        v = "inconclusive"
    return {**s, "values": rel, "verdict": v}


def correlation(points):
    """Pearson r of (VAS, accuracy) points, its p value, Fisher-z 95% interval and the verdict."""
    c = pearson([p[0] for p in points], [p[1] for p in points])
    lo, hi = fisher_ci(c["r"], c["n"])
    return {**c, "ci_low": lo, "ci_high": hi, "verdict": verdict(lo, hi)}


def claims(runs, interv):
    """The verdict table of the pre-registration (experiments/README.md), from the runs alone."""
    pts = [(r[s]["vas"], r[s]["accuracy"]) for a in ARMS for r in runs[a] for s in ["eval_shift"]]
    within = {a: correlation([(r["eval_shift"]["vas"], r["eval_shift"]["accuracy"]) for r in runs[a]]) for a in ARMS}
    return {
        "C1 VAS tracks accuracy (shifted split, all checkpoints)": correlation(pts),
        "C1 within each arm": within,
        "C2 the intervention helps (sft_multimodal, shifted)": paired({"i": interv, "b": runs["sft_multimodal"]},
                                                                       "i", "b", "eval_shift"),
        "C2 in distribution": paired({"i": interv, "b": runs["sft_multimodal"]}, "i", "b", "eval_id"),
        "C3a multimodal cold-start keeps VAS": relative_change(runs, "sft_multimodal", "base", "eval_shift"),
        "C3b text-only cold-start raises VAS": paired(runs, "sft_text_only", "sft_multimodal", "eval_shift", "vas"),
        "C4a anchored data adds (shifted)": paired(runs, "sft_anchored", "sft_multimodal", "eval_shift"),
        "C4b the objective adds (shifted)": paired(runs, "sft_avar", "sft_anchored", "eval_shift"),
        "C4c the visual reward adds (shifted)": paired(runs, "grpo_visual", "grpo_plain", "eval_shift"),
        "C4a in distribution": paired(runs, "sft_anchored", "sft_multimodal", "eval_id"),
        "C4b in distribution": paired(runs, "sft_avar", "sft_anchored", "eval_id"),
        "C4c in distribution": paired(runs, "grpo_visual", "grpo_plain", "eval_id"),
    }


# ---- the README section ------------------------------------------------------------------------

def readme_section(res):
    """The README's tally-world tables, from tally_world.json alone."""
    fams = res["families"]
    lines = [README_BEGIN, "",
             f"Measured by `python experiments/tally_world.py` (world version {res['version']}, pre-registered at "
             f"commit {res['preregistration']}; seeds {', '.join(map(str, res['seeds']))}; {res['n_eval']} problems "
             "per test split; mean over seeds with its 95% t-interval; accuracy in %; chance "
             f"{res['chance']:.1f}%). Written from `experiments/results/tally_world_v{res['version']}.json`.", "",
             "Perception of the base models (mean over seeds; the pre-registered bar is 90 for every entry): "
             "linear probe from the vision features to each colour's count (concatenated tokens / mean-pooled), "
             "and the % of the base's own captions of eval_id images that state the right count of every "
             "colour the question asks about, per family.", "",
             "| " + " | ".join(f"probe {c}" for c in res["probe"]["summary"]) + " | " +
             " | ".join(f"caption {f}" for f in fams) + " |",
             "|" + "---|" * (len(res["probe"]["summary"]) + len(fams))]
    lines.append("| " + " | ".join(f"{v['concat']['mean']:.1f} / {v['mean']['mean']:.1f}"
                                   for v in res["probe"]["summary"].values()) + " | " +
                 " | ".join(f"{res['captions']['summary'][f]['mean']:.1f}" for f in fams) + " |")
    failed = [seed for seed, ok in res["gate"].items() if not ok]
    lines += ["", "Gate: " + ("passed on every seed." if not failed else
                              f"**failed** on seeds {', '.join(failed)}: every verdict below is marked gate failed.")]
    lines += ["", "| arm | in-distribution | shifted | shifted: follows the hint | " +
              " | ".join(f"shifted {f}" for f in fams) + " | VAS (shifted) |",
              "|---|---|---|---|" + "---|" * len(fams) + "---|"]
    for name in ARMS + ["sft_multimodal + intervention"]:
        s = res["arms"][name]["summary"]
        fam = " | ".join(f"{s['eval_shift']['per_family'][f]['mean']:.0f}" for f in fams)
        lines.append(f"| {name} | {fmt_ci(s['eval_id']['accuracy'])} | {fmt_ci(s['eval_shift']['accuracy'])} | "
                     f"{fmt_ci(s['eval_shift']['hint_follow'])} | {fam} | {fmt_vas(s['eval_shift']['vas'])} |")
    lines += ["", "Verdicts (the rule, thresholds and predictions are in experiments/README.md; differences are "
              "paired on the seed, in points of accuracy unless marked):", "",
              "| claim | statistic | value [95% interval] | verdict |", "|---|---|---|---|"]
    for name, c in res["claims"].items():
        if name == "C1 within each arm":
            continue
        if "r" in c:
            val = (f"r = {c['r']:.3f} [{c['ci_low']:.3f}, {c['ci_high']:.3f}], n = {c['n']}" if c["r"] is not None
                   else "-")
            stat = "Pearson r, VAS vs shifted accuracy"
        elif "values" in c:
            val, stat = fmt_ci({k: (100 * c[k] if c[k] is not None else None) for k in ("mean", "ci_low", "ci_high")}), \
                "paired relative change of VAS, %"
        else:
            val = fmt_ci(c, 2 if "VAS" in name else 1)
            stat = "paired difference of VAS" if "VAS" in name else "paired difference"
        v = c["verdict"] + (" (gate failed)" if failed else "")
        lines.append(f"| {name} | {stat} | {val} | **{v}** |")
    t = res["arms"]["sft_text_only"]["summary"]
    gap = mean_ci([r["eval_id"]["accuracy"] - r["eval_shift"]["accuracy"] for r in res["arms"]["sft_text_only"]["runs"]])
    lines += ["", f"Does the cue compete (predicted: sft_text_only follows the hint on more than half of eval_shift, "
              f"and loses more than 20 points there)? It follows the hint on {fmt_ci(t['eval_shift']['hint_follow'])}% "
              f"of eval_shift; in-distribution minus shifted accuracy: {fmt_ci(gap)} points."]
    w = res["claims"]["C1 within each arm"]
    lines += ["", "VAS against shifted accuracy within each arm (over seeds): " + "; ".join(
        f"{a} r = {c['r']:.2f}" if c["r"] is not None else f"{a} r: -" for a, c in w.items()) + ".", "",
        f"![VAS against shifted accuracy](experiments/results/tally_vas_vs_accuracy_v{res['version']}.png)", "",
        README_END]
    return "\n".join(lines)


# ---- the experiment ----------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", default="tally", help="the world's folder (written with experiments/tally.py if missing)")
    ap.add_argument("--out", default="runs/tally_world", help="checkpoints and evaluations")
    ap.add_argument("--results", default=RESULTS, help="tally_world.json and the figure")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--limit", type=int, default=None, help="evaluate on the first N problems of each split (tiny runs)")
    ap.add_argument("--world-args", default="", help='extra arguments of experiments/tally.py (tiny runs)')
    ap.add_argument("--version", type=int, default=max(VERSIONS), choices=sorted(VERSIONS),
                    help="the pre-registered version to run (default: the latest)")
    ap.add_argument("--tiny", action="store_true", help="1 SFT epoch and 2 GRPO steps: a check that the pipeline "
                    "runs, not the pre-registered experiment (its JSON says so)")
    ap.add_argument("--jobs", type=int, default=3, help="seeds run at a time (one thread per command)")
    ap.add_argument("--perception-only", action="store_true", help="stop after the base models' perception check")
    ap.add_argument("--no-readme", action="store_true", help="do not rewrite the README section")
    args = ap.parse_args()
    os.chdir(ROOT)
    torch.set_num_threads(1)  # the probes and captions of two seeds share the cores with the commands
    t0 = time.time()
    py, world, out = sys.executable, args.world, args.out
    os.makedirs(out, exist_ok=True)
    os.makedirs(args.results, exist_ok=True)
    s = dict(VERSIONS[args.version], **(dict(sft_epochs=1, grpo_steps=2) if args.tiny else {}))
    runs_dir = out if args.version == 1 else os.path.join(out, f"v{args.version}")  # the bases are shared

    # the commands of every arm
    sft = [py, "train_sft.py", "--epochs", str(s["sft_epochs"]), "--lr", str(s["sft_lr"]), "--batch-size", "16",
           "--micro-batch", "8", "--save-every", "0", "--num-workers", "0"]
    plain = ["--agto-alpha", "0", "--agto-beta", "0"]
    guided = ["--agto-alpha", str(s["agto"]), "--agto-beta", str(s["agto"]), "--agto-sys-floor", str(s["sys_floor"])]
    grpo = [py, "train_grpo.py", "--data", f"{world}/rl.jsonl", "--lr", str(s["grpo_lr"]), "--max-steps",
            str(s["grpo_steps"]), "--group-size", "4", "--prompts-per-step", "8", "--max-new-tokens",
            str(s["max_new_tokens"]), "--save-every", "0", "--visual-form", "share"]
    limit = ["--limit", str(args.limit)] if args.limit else []
    ev = [py, "evaluate.py", "--bench", *(f"{world}/{sp}.jsonl" for sp in SPLITS), "--batch-size", "250",
          "--max-new-tokens", str(s["max_new_tokens"]), "--no-progress", *limit]
    tally_cmd = [py, "experiments/tally.py", "--out", world, *shlex.split(args.world_args)]
    run(tally_cmd + ["--no-model"], log=os.path.join(out, "world.log"))  # the world once, before the seeds share it
    info = json.load(open(os.path.join(world, "toy_world.json")))

    def one_seed(seed):
        """Seed s: its base model (cached), the base's perception (before any arm is judged), every
        arm's training and every evaluation (each kept once finished)."""
        d = lambda arm: os.path.join(runs_dir, f"{arm}_s{seed}")  # noqa: E731
        base = os.path.join(out, f"base_{seed}")
        run(tally_cmd + ["--model-seed", str(seed), "--model-out", base], log=base + ".log")
        perception_file = os.path.join(out, f"perception_s{seed}.json")
        if not os.path.exists(perception_file):
            p = {"probe": probe(base), "captions": caption_check(base, world)}
            json.dump(p, open(perception_file + ".tmp", "w"), indent=1)
            os.replace(perception_file + ".tmp", perception_file)
        perception = json.load(open(perception_file))
        print(f"seed {seed} perception: {json.dumps(perception)}", flush=True)
        if args.perception_only:
            return perception, {}
        plan = {
            "sft_multimodal": sft + plain + ["--data", f"{world}/sft.jsonl", "--model", base],
            "sft_text_only": sft + plain + ["--data", f"{world}/sft_text_only.jsonl", "--model", base],
            "sft_anchored": sft + plain + ["--data", f"{world}/sft_anchored.jsonl", "--model", base],
            "sft_avar": sft + guided + ["--data", f"{world}/sft_anchored.jsonl", "--model", base],
            "grpo_plain": grpo + ["--model", d("sft_avar"), "--lambda-v", "0"],
            "grpo_visual": grpo + ["--model", d("sft_avar"), "--lambda-v", str(s["lambda_v"])],
        }
        for arm, cmd in plan.items():
            if not os.path.exists(os.path.join(d(arm), "latest")):
                if os.path.exists(d(arm)):
                    shutil.rmtree(d(arm))  # an unfinished run: start it again
                run(cmd + ["--out", d(arm), "--seed", str(seed)], log=d(arm) + ".log")
        evals = [(arm, base if arm == "base" else d(arm), []) for arm in ARMS]
        evals.append(("sft_multimodal + intervention", d("sft_multimodal"),
                      ["--a-img", str(INTERVENTION[0]), "--a-sys", str(INTERVENTION[1])]))
        rows = {}
        for arm, model, extra in evals:
            folder = os.path.join(runs_dir, "eval", f"{arm.replace(' + ', '_')}_s{seed}")
            os.makedirs(os.path.dirname(folder), exist_ok=True)
            state = eval_state(folder, model, len(SPLITS))
            if state == "other":  # an evaluation of weights the arm no longer holds (trained again)
                shutil.rmtree(folder)
            if state != "done":  # an unfinished evaluation of these weights continues
                run(ev + ["--model", model, "--out", folder, *extra], log=folder + ".log")
            got = read_eval(folder, world)
            setting = next(k[1] for k in got)
            rows[arm] = {"seed": seed, "checkpoint": model, **{sp: got[(sp, setting)] for sp in SPLITS}}
        if "sft_loss_gate" in s:  # the SFT arms learnt their records (a gate of version 2 on)
            perception = dict(perception, sft_loss={a: sft_loss(d(a)) for a in ARMS if a.startswith("sft_")})
        print(f"seed {seed} done after {(time.time() - t0) / 60:.1f} min", flush=True)
        return perception, rows

    with ThreadPoolExecutor(args.jobs) as pool:  # each seed's commands run in processes of their own
        done = dict(zip(args.seeds, pool.map(one_seed, args.seeds)))
    if args.perception_only:
        return
    runs = {a: [done[seed][1][a] for seed in args.seeds] for a in ARMS}
    interv = [done[seed][1]["sft_multimodal + intervention"] for seed in args.seeds]
    perc = [done[seed][0] for seed in args.seeds]

    # 3. summaries, the verdicts, the JSON, the figure and the README section, in that order
    def summary(rs):
        return {sp: {"accuracy": mean_ci([r[sp]["accuracy"] for r in rs]), "vas": mean_ci([r[sp]["vas"] for r in rs]),
                     "hint_follow": mean_ci([r[sp]["hint_follow"] for r in rs]),
                     "per_family": {f: mean_ci([r[sp]["per_family"][f] for r in rs]) for f in info["families"]}}
                for sp in SPLITS}

    arms = {a: {"runs": runs[a], "summary": summary(runs[a])} for a in ARMS}
    arms["sft_multimodal + intervention"] = {"runs": interv, "summary": summary(interv)}
    res = {"version": args.version if not args.tiny else f"{args.version} (--tiny: not the pre-registered run)",
           "preregistration": preregistration_commit(args.version), "seeds": args.seeds,
           "n_eval": args.limit or info["eval_id"], "families": info["families"], "accuracy_unit": "percent",
           "chance": 100 * info["chance"], "settings": s, "intervention": INTERVENTION,
           "probe": {"runs": [p["probe"] for p in perc],
                     "summary": {c: {k: mean_ci([p["probe"][c][k] for p in perc]) for k in ("concat", "mean")}
                                 for c in tally.COLORS}},
           "captions": {"runs": [p["captions"] for p in perc],
                        "summary": {f: mean_ci([p["captions"][f] for p in perc]) for f in info["families"]}},
           "gate": {str(seed): gate(p, s.get("sft_loss_gate")) for seed, p in zip(args.seeds, perc)},
           "arms": arms, "claims": claims(runs, interv), "minutes": (time.time() - t0) / 60,
           "torch": torch.__version__}
    with open(os.path.join(args.results, f"tally_world_v{args.version}.json"), "w") as f:
        json.dump(res, f, indent=1)
    c1 = res["claims"]["C1 VAS tracks accuracy (shifted split, all checkpoints)"]
    if c1["r"] is not None:
        scatter_png([(a, r["eval_shift"]["vas"], r["eval_shift"]["accuracy"]) for a in ARMS for r in runs[a]],
                    os.path.join(args.results, f"tally_vas_vs_accuracy_v{args.version}.png"),
                    "VAS vs shifted accuracy, one dot per checkpoint (tally world)", c1, COLOURS,
                    y_label="accuracy on eval_shift %")
    section = readme_section(res)
    if not args.no_readme:
        update_readme(section, README_BEGIN, README_END)
    print(section)


# The settings of each version, fixed by its pre-registration in experiments/README.md: a change
# is a new version, and the old version's results stay (results/tally_world_v<N>.json).
VERSIONS = {
    1: dict(sft_epochs=3, sft_lr=5e-4, agto=0.15, sys_floor=0.25, grpo_steps=24, grpo_lr=5e-5, lambda_v=0.3,
            max_new_tokens=120),
    # version 2: version 1's SFT arms had not learnt the chains (LM loss ~0.35 after 186 steps); 8 epochs
    # (496 steps), and a second gate on that loss
    2: dict(sft_epochs=8, sft_lr=5e-4, agto=0.15, sys_floor=0.25, grpo_steps=24, grpo_lr=5e-5, lambda_v=0.3,
            max_new_tokens=120, sft_loss_gate=0.1),
}


def preregistration_commit(version):
    """The commit that wrote the version's pre-registration into experiments/README.md (the oldest
    commit adding its title), or None outside a git checkout."""
    title = f"## The tally world, version {version}: pre-registration"
    try:
        out = subprocess.run(["git", "log", "--format=%h", "-S", title, "--", "experiments/README.md"],
                             cwd=ROOT, capture_output=True, text=True, timeout=30)
    except OSError:
        return None
    commits = out.stdout.split()
    return commits[-1] if out.returncode == 0 and commits else None


def sft_loss(run_dir, n=20):
    """Mean LM loss of a training run's last n steps (its metrics.jsonl)."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return sum(r["lm_loss"] for r in rows[-n:]) / len(rows[-n:])


if __name__ == "__main__":
    main()
