"""The tally world: a toy world where looking matters (the second toy world, beside toy.py).

    python experiments/tally.py --out tally                  # the world and the pretrained base model
    python experiments/tally.py --out tally --model-seed 1 --model-out runs/tally_world/base_1

The first toy world (toy.py) could not decide the paper's claims: three of its five families sat
at chance for want of perception, every answer was one visual fact in one sentence, and nothing
in the text competed with the image. This world is built so that the mechanism the paper
describes can exist:

- Perception is easy by construction. An 84x84 image is a 3x3 grid of 28-px cells, one merged
  vision token each; a cell is empty or holds one large flat shape in red, green or blue. Every
  question asks only about how many shapes of a colour there are (0-4 each), which the vision
  features carry token by token and the base model's captions state ("2 red, 0 green, 3 blue.").
- Answers need a chain over several visual facts:
      count  "How many red shapes are there?"                         0-4
      total  "How many red and blue shapes are there in all?"         0-8   (a sum)
      more   "Are there more red or blue shapes?"                     red / blue (never a tie)
      diff   "How many more red shapes than blue shapes are there?"   1-4   (a difference)
  The SFT chain (~50-70 tokens) reads the image, names the colours asked about, goes back to the
  image to count them, does the arithmetic and checks the hint against the image.
- A text cue competes with the image. Every question carries a hint ("Hint: 3."), a possible
  answer of its family. In every training split and in the in-distribution test split the hint
  is right with probability HINT_RIGHT (0.8) and otherwise a wrong answer drawn near the right
  one; in the shifted test split it is always wrong (as VQA-CP shifts answer priors). A model
  that reads the hint over the pixels scores ~80% in distribution and ~0% shifted; one that
  counts scores the same on both.

Files (under --out): images/, pretrain.jsonl (half captions, half hinted questions answered at
once), sft.jsonl (hinted questions with chains), sft_text_only.jsonl (the same without images),
sft_raw.jsonl + sft_anchored.jsonl (the paper's synthesis with TallyTeacher), rl.jsonl,
eval_id.jsonl, eval_shift.jsonl, toy_world.json (counts and chance). The base model is toy.py's
tiny Qwen2.5-VL and byte-level BPE, pretrained with train_sft.py's LM loss (toy.pretrain_toy_model).
"""

import argparse
import hashlib
import json
import logging
import os
import random
import re
import sys

from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project's modules
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # toy.py beside this file

import toy  # noqa: E402
from data import build_prompt, run_cli  # noqa: E402
from synthesize import TeacherError, synthesize  # noqa: E402

log = logging.getLogger("tally")

COLORS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220)}
GRID, CELL = 3, 28  # 3x3 cells of one merged vision token each: an 84x84 image, 9 image tokens
SIZE = GRID * CELL
MAX_PER_COLOR = 4
HINT_RIGHT = 0.8  # how often the hint is right in training and in the in-distribution split
FAMILIES = {  # family -> (answer_type, answers it can have)
    "count": ("integer", [str(k) for k in range(0, MAX_PER_COLOR + 1)]),
    "total": ("integer", [str(k) for k in range(0, 2 * MAX_PER_COLOR + 1)]),
    "more": ("text", list(COLORS)),
    "diff": ("integer", [str(k) for k in range(1, MAX_PER_COLOR + 1)]),
}
CAPTION_QUESTION = toy.CAPTION_QUESTION
PRETRAIN_EPOCHS = 3  # 4000 records x 3 = 750 steps of 16 (lr 5e-4, cosine): every caption right on seed 0


def rng_for(seed, split, i, attempt=0):
    # a string seed goes through sha512 in random.seed: stable across runs and PYTHONHASHSEED
    return random.Random(f"tally/{seed}/{split}/{i}/{attempt}")


def draw_counts(rng):
    """Counts per colour, 0..MAX_PER_COLOR each, 1..9 shapes in all."""
    while True:
        counts = {c: rng.randint(0, MAX_PER_COLOR) for c in COLORS}
        if 1 <= sum(counts.values()) <= GRID * GRID:
            return counts


def render(rng, counts):
    """The image and its shapes: each shape alone in a random cell, large (radius 10-12 px), a disc
    or a square (the kind is never asked: it only varies the pixels)."""
    image = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    colours = [c for c in COLORS for _ in range(counts[c])]
    cells = rng.sample(range(GRID * GRID), len(colours))
    shapes = []
    for colour, cell in zip(colours, cells):
        r = rng.randint(10, 12)
        cx = (cell % GRID) * CELL + rng.randint(r + 1, CELL - r - 2)
        cy = (cell // GRID) * CELL + rng.randint(r + 1, CELL - r - 2)
        kind = rng.choice(["circle", "square"])
        toy._draw_shape(draw, kind, cx, cy, r, COLORS[colour])
        shapes.append({"color": colour, "kind": kind, "cell": cell, "cx": cx, "cy": cy, "r": r})
    return image, shapes


def caption(counts):
    """What the base model is taught to say about an image: every colour's count, in a fixed order."""
    return ", ".join(f"{counts[c]} {c}" for c in COLORS) + "."


def solve(family, counts, x, y):
    """(answer, the arithmetic step) of a question about colours x (and y) given the counts."""
    nx, ny = counts[x], counts.get(y, 0) if y else 0
    if family == "count":
        return str(nx), f"So there are {nx} {x} shapes"
    if family == "total":
        return str(nx + ny), f"{nx} + {ny} = {nx + ny}"
    if family == "more":
        more, less = (x, y) if nx > ny else (y, x)
        return more, f"{max(nx, ny)} is more than {min(nx, ny)}, so there are more {more} shapes"
    return str(nx - ny), f"{nx} - {ny} = {nx - ny}"


def stem(family, x, y):
    return {"count": f"How many {x} shapes are there?",
            "total": f"How many {x} and {y} shapes are there in all?",
            "more": f"Are there more {x} or {y} shapes?",
            "diff": f"How many more {x} shapes than {y} shapes are there?"}[family]


def wrong_hint(rng, family, answer, x, y):
    """A wrong answer of the family, near the right one (the hint a careless reader would give)."""
    if family == "more":
        return y if answer == x else x
    values = [int(v) for v in FAMILIES[family][1] if v != answer]
    near = [v for v in values if abs(v - int(answer)) <= 2]
    return str(rng.choice(near or values))


def make_problem(rng, family, shifted=False):
    """One problem, a pure function of rng's state. Returns a dict: image, question (the stem and
    its hint), answer, answer_type, facts (counts, shapes, family, colours, hint, hint_right,
    the chain `response`)."""
    x, y = rng.sample(list(COLORS), 2)
    while True:
        counts = draw_counts(rng)
        if family == "more" and counts[x] == counts[y]:
            continue
        if family == "diff" and counts[x] <= counts[y]:
            continue
        break
    image, shapes = render(rng, counts)
    answer, step = solve(family, counts, x, y)
    hint_right = (not shifted) and rng.random() < HINT_RIGHT
    hint = answer if hint_right else wrong_hint(rng, family, answer, x, y)
    question = f"{stem(family, x, y)}\nHint: {hint}."
    about = x if family == "count" else f"{x} and {y}"
    again = f"{counts[x]} {x}" if family == "count" else f"{counts[x]} {x} and {counts[y]} {y}"
    check = "which agrees with the image" if hint_right else f"but the image shows {answer}"
    response = (f"<think>I look at the image: I see {caption(counts)[:-1]}. The question is about {about}. "
                f"Looking at the image again, I count {again}. {step}. The hint says {hint}, {check}."
                f"</think><answer>{answer}</answer>")
    facts = {"family": family, "counts": counts, "shapes": shapes, "colors": [x, y] if family != "count" else [x],
             "hint": hint, "hint_right": hint_right, "stem": stem(family, x, y), "response": response}
    return {"image": image, "question": question, "answer": answer,
            "answer_type": FAMILIES[family][0], "facts": facts}


def chance(family):
    """Accuracy of a uniform guess over the family's answers (more: the two colours named)."""
    return 0.5 if family == "more" else 1.0 / len(FAMILIES[family][1])


def pretrain_record(problem, as_caption):
    """A perception record of the base model: the caption, or the hinted question answered at
    once from the image (an instruction-tuned model answers before cold-start teaches it to
    reason), in the prompt evaluate.py builds."""
    if as_caption:
        return {"question": CAPTION_QUESTION, "response": caption(problem["facts"]["counts"])}
    return {"question": build_prompt(problem), "response": f"<answer>{problem['answer']}</answer>"}


def write_world(out_dir, n_train=1000, n_rl=1000, n_eval=1000, n_pretrain=4000, seed=0, anchored=True):
    """Write the world's files under out_dir (see the module docstring); families round robin.
    Test problems whose (pixels, question) also occur in a training split are redrawn."""
    families = list(FAMILIES)
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    train_keys = set()

    def build(split, n, shifted=False, avoid=None):
        rows, redrawn = [], 0
        for i in range(n):
            for attempt in range(1000):
                p = make_problem(rng_for(seed, split, i, attempt), families[i % len(families)], shifted)
                key = hashlib.sha1(p["image"].tobytes() + b"\0" + p["question"].encode()).hexdigest()
                if avoid is None or key not in avoid:
                    break
                redrawn += 1
            else:
                raise RuntimeError(f"could not draw a {split} problem unseen in training")
            if avoid is None:
                train_keys.add(key)
            p["id"] = f"tally-{split}-{i:05d}"
            p["images"] = [f"images/{p['id']}.png"]
            p["image"].save(os.path.join(out_dir, p["images"][0]))
            rows.append(p)
        return rows, redrawn

    def dump(name, records):
        with open(os.path.join(out_dir, name), "w") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")

    def bench(p):  # the benchmark jsonl form (the hint is part of the question), plus the facts it asks about
        f = p["facts"]
        return {"id": p["id"], "images": p["images"], "question": p["question"], "answer": p["answer"],
                "answer_type": p["answer_type"], "family": f["family"], "colors": f["colors"], "counts": f["counts"],
                "hint": f["hint"], "hint_right": f["hint_right"]}

    pre, _ = build("pretrain", n_pretrain)
    sft, _ = build("sft", n_train)
    rl, _ = build("rl", n_rl)
    ev_id, red_id = build("eval_id", n_eval, avoid=train_keys)
    ev_shift, red_shift = build("eval_shift", n_eval, shifted=True, avoid=train_keys)

    sft_records = [{"id": p["id"], "images": p["images"], "question": build_prompt(p),
                    "response": p["facts"]["response"], "answer": p["answer"]} for p in sft]
    dump("pretrain.jsonl", [{"id": p["id"], "images": p["images"], **pretrain_record(p, i % 2 == 0)}
                            for i, p in enumerate(pre)])
    dump("sft.jsonl", sft_records)
    dump("sft_text_only.jsonl", [{**r, "images": []} for r in sft_records])
    dump("sft_raw.jsonl", [bench(p) for p in sft])
    dump("rl.jsonl", [bench(p) for p in rl])
    dump("eval_id.jsonl", [bench(p) for p in ev_id])
    dump("eval_shift.jsonl", [bench(p) for p in ev_shift])

    def hint_rate(rows):
        return sum(p["facts"]["hint_right"] for p in rows) / max(len(rows), 1)

    summary = {"world": "tally", "seed": seed, "image_size": SIZE, "families": families, "hint_right": HINT_RIGHT,
               "pretrain": len(pre), "sft": len(sft), "sft_text_only": len(sft), "rl": len(rl),
               "eval_id": len(ev_id), "eval_shift": len(ev_shift), "eval_redrawn": red_id + red_shift,
               "hint_right_rate": {"sft": hint_rate(sft), "rl": hint_rate(rl), "eval_id": hint_rate(ev_id),
                                   "eval_shift": hint_rate(ev_shift)},
               "chance": sum(chance(families[i % len(families)]) for i in range(n_eval)) / max(n_eval, 1),
               "chance_by_family": {f: chance(f) for f in families}}
    if anchored:
        for name in ("sft_anchored.jsonl", "sft_anchored.jsonl.filtered"):  # synthesize appends: start afresh
            if os.path.exists(os.path.join(out_dir, name)):
                os.remove(os.path.join(out_dir, name))
        counts = synthesize(os.path.join(out_dir, "sft_raw.jsonl"), os.path.join(out_dir, "sft_anchored.jsonl"),
                            TallyTeacher(sft))
        summary["sft_anchored"] = counts["done"]
    with open(os.path.join(out_dir, "toy_world.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


class TallyTeacher(toy.ToyTeacher):
    """The teacher of the paper's three synthesis stages for this world (toy.ToyTeacher's stages:
    it sees exactly, finding each drawing's facts by its pixels, and reads the question's colours
    and family from its words, never from a stored answer):
        describe  a four-part description (global scan, elements cell by cell, linking, synthesis);
        reason    from the description alone: the counts, the step, the hint checked, <answer>;
        anchor    <think>Looking at the image, ... Let me check the image again: ...</think><answer>."""

    PATTERNS = [(family, re.compile("^" + re.escape(stem(family, "X", "Y")).replace("X", "(\\w+)").replace("Y", "(\\w+)") + "$"))
                for family in FAMILIES]

    def __init__(self, problems):
        self.facts = {hashlib.sha1(p["image"].convert("RGB").tobytes()).hexdigest(): p["facts"] for p in problems}
        self.by_description = {}

    @classmethod
    def parse(cls, question):
        """(family, colours, hint) from a question's text."""
        lines = question.strip().split("\n")
        for family, pattern in cls.PATTERNS:
            m = pattern.match(lines[0].strip())
            if m:
                hint = re.search(r"Hint: (\w+)\.", question)
                return family, list(m.groups()), hint.group(1) if hint else None
        raise TeacherError(f"TallyTeacher: not a tally question: {lines[0]!r}")

    @staticmethod
    def _describe(facts):
        cells = {s["cell"]: s for s in facts["shapes"]}
        rows = []
        for r in range(GRID):
            row = [cells[r * GRID + c]["color"] if r * GRID + c in cells else "empty" for c in range(GRID)]
            rows.append(f"- row {r + 1}: " + ", ".join(row))
        return "\n".join([f"1. Global scan: a {SIZE}x{SIZE} drawing, a {GRID}x{GRID} grid of cells on white.",
                          "2. Element decomposition:", *rows,
                          f"3. Linking: {len(facts['shapes'])} separate shapes, one per cell.",
                          f"4. Synthesis: {caption(facts['counts'])}"])

    def _write(self, facts, question, reason):
        counts = facts["counts"]
        family, colours, hint = self.parse(question)
        answer, step = solve(family, counts, *colours, *([None] if len(colours) == 1 else []))
        seen = " and ".join(f"{counts[c]} {c}" for c in colours)
        verdict = "agrees" if hint == answer else f"is wrong: it is {answer}"
        if reason:
            return (f"The description counts {caption(counts)[:-1]}. The question is about {' and '.join(colours)}: "
                    f"{seen}. {step}. Re-checking against the description: {seen}, so the answer holds. "
                    f"The hint {verdict}.\n<answer>{answer}</answer>")
        return (f"<think>Looking at the image, I see {caption(counts)[:-1]}. The question is about "
                f"{' and '.join(colours)}: {seen}. {step}. Let me check the image again: {seen}. "
                f"The hint {verdict}.</think><answer>{answer}</answer>")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="tally")
    p.add_argument("--n-train", type=int, default=1000, help="sft problems")
    p.add_argument("--n-rl", type=int, default=1000)
    p.add_argument("--n-eval", type=int, default=1000, help="problems in each test split")
    p.add_argument("--n-pretrain", type=int, default=4000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-out", default=None, help="the base model's folder (default: OUT/model)")
    p.add_argument("--model-seed", type=int, default=None, help="seed of the base model (default: --seed)")
    p.add_argument("--pretrain-epochs", type=float, default=PRETRAIN_EPOCHS)
    p.add_argument("--pretrain-lr", type=float, default=toy.TOY_PRETRAIN["lr"])
    p.add_argument("--no-model", action="store_true", help="write the world only")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    log.info("config: %s", json.dumps(vars(args)))
    world_file = os.path.join(args.out, "toy_world.json")
    wanted = dict(n_train=args.n_train, n_rl=args.n_rl, n_eval=args.n_eval, n_pretrain=args.n_pretrain, seed=args.seed)
    try:
        with open(world_file) as f:
            have = json.load(f)
        same = have.get("args") == wanted
    except (OSError, ValueError):
        same = False
    if same:
        result = have
        log.info("%s: the world with these settings is already there", args.out)
    else:
        result = write_world(args.out, **wanted)
        result["args"] = wanted
        with open(world_file, "w") as f:
            json.dump(result, f, indent=2)
    if args.no_model:
        return result
    model_dir = args.model_out or os.path.join(args.out, "model")
    mseed = args.seed if args.model_seed is None else args.model_seed
    result.update(toy.base_model(args.out, model_dir, mseed, args.pretrain_epochs, args.pretrain_lr))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    run_cli(main)
