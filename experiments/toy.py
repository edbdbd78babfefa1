"""The toy visual-reasoning world, its tokenizer and model, and the base model's pretraining.

    python experiments/toy.py --out toy --n-train 2000 --n-eval 200       # the world and the pretrained base model
    python experiments/toy.py --out toy --model-seed 1 --model-out runs/base_1   # the base model of another seed

Small flat drawings (56x56 by default: 2x2 merged vision tokens of 28 px) with short questions whose
answers need the image, so that a tiny Qwen2.5-VL-shaped model with a byte-level BPE tokenizer
learned from the toy texts (`make_toy_model`) can be trained from scratch on 2 CPU cores in minutes
and scored above chance.
Families (answer space, chance):
    color  open  "What color is the shape?"            red/green/blue/yellow/purple   1/5
    shape  MC    "What shape is shown?" + 3 options     option letter                  1/3
    count  open  "How many shapes are there?"          1-4                            1/4
    side   open  "Is the circle on the left or right?"  left/right                     1/2
    bars   MC    "Which bar is taller?" + 2 options     option letter                  1/2
Every problem is a pure function of its seed; sft, rl and eval use disjoint seeds, and an eval
problem whose (pixels, question) pair also occurs in sft or rl is redrawn. SFT responses are
`<think>...</think><answer>X</answer>` under 200 characters (~30 toy tokens): they cite what they
see ("I see a red square.") and re-check the image ("Looking at the image again, ..."). The
text-only variant keeps the same question and reasoning without the image (the paper's text-only
cold-start, section 2).

The base model (`pretrain_toy_model`): the random model trained with train_sft.py's LM loss on
pretrain.jsonl, problems of their own drawn by the same renderer, half captions ("Describe the
image." -> "A red triangle in the top left."), half the question answered at once
("<answer>red</answer>"): like an instruction-tuned VLM it reads images and answers before any
cold-start, and it carries an attention sink on the system turn.

The visual-anchored records (sft_anchored.jsonl) are the SFT problems run through the cold-start
synthesis of synthesize.py with ToyTeacher, a teacher that sees the drawing exactly.
"""

import argparse
import hashlib
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys

from PIL import Image, ImageDraw
from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
from tokenizers.pre_tokenizers import ByteLevel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project's modules

from data import (DEFAULT_SYSTEM, QWEN_SPECIAL_TOKENS, ImageProcessor, Tokenizer, build_prompt,  # noqa: E402
                  format_question, option_letter, run_cli)
from hub import resolve_checkpoint  # noqa: E402
from model import Config, Qwen2_5_VL, VisionConfig, init_weights, save_pretrained  # noqa: E402
from synthesize import DESCRIBE_PROMPT, REASON_PROMPT, Teacher, TeacherError, synthesize  # noqa: E402

log = logging.getLogger("toy")


# --------------------------------------------------------------------------------------------
# The world: renderer, problems, the files of every split
# --------------------------------------------------------------------------------------------

TOY_BACKGROUND = (255, 255, 255)
# Well separated, exact colours (drawn without antialiasing, so a pixel is one of these or white).
TOY_COLORS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 200, 20),
    "purple": (140, 50, 180),
}
TOY_SHAPES = ("circle", "square", "triangle")
TOY_CELL = 28  # one merged vision token covers 28x28 pixels (14 px patches, 2x2 merge)
TOY_MAX_COUNT = 4

# family -> (answer_type, the answers an open question can have; None for multiple choice)
TOY_FAMILIES = {
    "color": ("text", tuple(TOY_COLORS)),
    "shape": ("multi_choice", None),
    "count": ("integer", tuple(str(k) for k in range(1, TOY_MAX_COUNT + 1))),
    "side": ("text", ("left", "right")),
    "bars": ("multi_choice", None),
}


def _draw_shape(draw, kind, cx, cy, r, rgb):
    """A shape of 'radius' r centred at (cx, cy): its bounding box is [cx-r, cx+r] x [cy-r, cy+r]."""
    box = (cx - r, cy - r, cx + r, cy + r)
    if kind == "circle":
        draw.ellipse(box, fill=rgb)
    elif kind == "square":
        draw.rectangle(box, fill=rgb)
    elif kind == "triangle":  # pointing up; (cx, cy) lies inside it (width r at mid height)
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=rgb)
    else:
        raise ValueError(f"unknown shape {kind!r}")


def _shape(kind, color, cx, cy, r):
    return {"kind": kind, "color": color, "rgb": list(TOY_COLORS[color]), "cx": cx, "cy": cy, "r": r}


def _a(shape):
    return f"a {shape['color']} {shape['kind']}"


def _response(seen, check, answer):
    return f"<think>I see {seen}. Looking at the image again, {check}.</think><answer>{answer}</answer>"


def make_toy_problem(rng, family, image_size=56):
    """One problem of a family, a pure function of the state of `rng` (a random.Random).

    Returns (image, question, answer, options, answer_type, facts): the question text already
    holds the options and the instruction for multiple choice; the answer is the option letter
    for multiple choice, else a word or a digit; facts describe the drawing exactly (shape centres,
    radii, colours, bar boxes) plus "family", "stem" (the question without options) and
    "response" (the SFT response for this problem).
    """
    if family not in TOY_FAMILIES:
        raise ValueError(f"unknown toy family {family!r}; known: {sorted(TOY_FAMILIES)}")
    size = image_size
    if size % TOY_CELL or size < 2 * TOY_CELL:
        raise ValueError(f"image_size must be a multiple of {TOY_CELL} and at least {2 * TOY_CELL}")
    image = Image.new("RGB", (size, size), TOY_BACKGROUND)
    draw = ImageDraw.Draw(image)
    colors = list(TOY_COLORS)
    answer_type = TOY_FAMILIES[family][0]
    options = []
    facts = {"family": family, "size": size}

    if family in ("color", "shape"):
        r = rng.randint(size // 4, size // 3)  # large: the colour must dominate its image tokens
        s = _shape(rng.choice(TOY_SHAPES), rng.choice(colors),
                   rng.randint(r + 1, size - r - 2), rng.randint(r + 1, size - r - 2), r)
        facts["shapes"] = [s]
        if family == "color":
            stem, answer = "What color is the shape?", s["color"]
            response = _response(_a(s), f"the {s['kind']} is {s['color']}", answer)
        else:
            options = list(TOY_SHAPES)
            rng.shuffle(options)
            answer = option_letter(options.index(s["kind"]))
            stem = "What shape is shown?"
            response = _response(_a(s), f"it is a {s['kind']}, option {answer}", answer)

    elif family == "count":
        n = size // TOY_CELL
        k = rng.randint(1, TOY_MAX_COUNT)
        cells = sorted(rng.sample(range(n * n), k))  # reading order: row by row
        shapes = []
        for cell in cells:  # one shape inside each chosen 28x28 cell, so shapes never touch
            r = rng.randint(7, 11)
            x0, y0 = (cell % n) * TOY_CELL, (cell // n) * TOY_CELL
            shapes.append(_shape(rng.choice(TOY_SHAPES), rng.choice(colors),
                                 x0 + rng.randint(r + 1, TOY_CELL - r - 2),
                                 y0 + rng.randint(r + 1, TOY_CELL - r - 2), r))
        facts["shapes"], facts["count"] = shapes, k
        names = [_a(s) for s in shapes]
        seen = names[0] if k == 1 else f"{k} shapes: " + ", ".join(names)
        stem, answer = "How many shapes are there?", str(k)
        response = _response(seen, f"I count {k}", answer)

    elif family == "side":
        half = size // 2
        r = rng.randint(6, min(size // 5, half // 2 - 2))
        side = rng.choice(["left", "right"])
        lo = r + 1 if side == "left" else half + r + 1  # the whole circle inside its half
        cx = rng.randint(lo, lo + half - 2 * r - 3)
        s = _shape("circle", rng.choice(colors), cx, rng.randint(r + 1, size - r - 2), r)
        facts["shapes"], facts["side"] = [s], side
        stem, answer = "Is the circle on the left or right?", side
        response = _response(f"a {s['color']} circle on the {side}", f"the circle is on the {side}", side)

    else:  # bars
        half, bottom = size // 2, size - 3
        gap = max(4, size // 7)
        h1 = rng.randint(size // 6, size - 6)
        h2 = rng.choice([h for h in range(size // 6, size - 5) if abs(h - h1) >= gap])
        bars = []
        for side, h, lo in (("left", h1, 2), ("right", h2, half + 2)):
            w = rng.randint(size // 8, size // 5)
            x0 = rng.randint(lo, lo + half - w - 4)
            color = rng.choice(colors)
            bars.append({"side": side, "color": color, "rgb": list(TOY_COLORS[color]),
                         "x0": x0, "x1": x0 + w - 1, "top": bottom - h + 1, "bottom": bottom})
            draw.rectangle((x0, bottom - h + 1, x0 + w - 1, bottom), fill=TOY_COLORS[color])
        taller = "left" if h1 > h2 else "right"
        facts["bars"], facts["taller"] = bars, taller
        options = ["left", "right"]
        rng.shuffle(options)
        answer = option_letter(options.index(taller))
        stem = "Which bar is taller?"
        response = _response(f"a {bars[0]['color']} bar on the left and a {bars[1]['color']} bar on the right",
                             f"the {taller} bar is taller, option {answer}", answer)

    for s in facts.get("shapes", []):
        _draw_shape(draw, s["kind"], s["cx"], s["cy"], s["r"], tuple(s["rgb"]))
    facts["stem"], facts["response"] = stem, response
    return image, format_question(stem, options), answer, options, answer_type, facts


def toy_chance(family, options=None):
    """Accuracy of a uniform random guess: 1/len(options) for multiple choice, else 1 over the
    number of answers the family's open question can have."""
    if options:
        return 1.0 / len(options)
    return 1.0 / len(TOY_FAMILIES[family][1])


def _where(s, size):
    """Where a shape's centre lies: "top left", "bottom right", ..."""
    return f"{'top' if s['cy'] < size / 2 else 'bottom'} {'left' if s['cx'] < size / 2 else 'right'}"


def toy_caption(facts):
    """A one-line description of a drawing from its facts: what, how many, where, which bar is taller."""
    size = facts["size"]
    if "bars" in facts:
        left, right = facts["bars"]
        return (f"Two bars: a {left['color']} bar on the left and a {right['color']} bar on the right. "
                f"The {facts['taller']} bar is taller.")
    shapes = facts["shapes"]
    if facts["family"] == "side":
        return f"A {shapes[0]['color']} circle on the {facts['side']}."
    names = [f"{_a(s)} in the {_where(s, size)}" for s in shapes]
    if len(names) == 1:
        return names[0][0].upper() + names[0][1:] + "."
    return f"{len(names)} shapes: " + ", ".join(names) + "."


CAPTION_QUESTION = "Describe the image."


def toy_pretrain_record(problem, caption):
    """A perception record of the base model's pretraining, for one toy problem: the caption
    (CAPTION_QUESTION -> toy_caption) or the problem's question, in the prompt evaluate.py builds,
    answered at once without reasoning ("<answer>X</answer>"), as an instruction-tuned model
    answers before cold-start teaches it to reason first."""
    _, _, answer, options, answer_type, facts = problem
    if caption:
        return {"question": CAPTION_QUESTION, "response": toy_caption(facts)}
    prompt = build_prompt({"question": facts["stem"], "options": options, "answer_type": answer_type})
    return {"question": prompt, "response": f"<answer>{answer}</answer>"}


def _toy_rng(seed, split, i, attempt=0):
    # A string seed goes through sha512 in random.seed: stable across runs and PYTHONHASHSEED,
    # and the split name keeps the seeds of sft, rl and eval disjoint.
    return random.Random(f"toy/{seed}/{split}/{i}/{attempt}")


def _problem_key(image, question):
    return hashlib.sha1(image.tobytes() + b"\0" + question.encode()).hexdigest()


def write_toy_world(out_dir, n_train=2000, n_eval=200, seed=0, image_size=56, n_rl=None,
                    families=None, n_pretrain=None, anchored=True):
    """Write the toy world under out_dir:
        images/<id>.png
        sft.jsonl            {"id", "images": ["images/<id>.png"], "question", "response", "answer"}
        sft_text_only.jsonl  the same records with "images": [] (text-only cold-start)
        rl.jsonl             {"id", "images", "question", "answer", "options", "answer_type"}
        eval.jsonl           {"id", "images", "question", "options", "answer", "answer_type"}
        pretrain.jsonl       perception records of the base model's pretraining (toy_pretrain_record):
                             half captions, half direct answers, on problems of their own
        sft_raw.jsonl        the sft problems as raw problems (the synthesis input form)
        sft_anchored.jsonl   visual-anchored records: `synthesize` over sft_raw.jsonl with ToyTeacher
        toy_world.json       these counts and the chance accuracy
    n_train problems for sft, n_rl (default n_train) for rl, n_pretrain (default 1.5 * n_train) for
    pretraining, n_eval held out; families are assigned round robin. Image paths are relative to
    out_dir. Returns the counts, the chance accuracy of eval.jsonl (overall and per family) and how
    many eval problems were redrawn because they also occur in the training splits (pretraining
    included). anchored=False skips the synthesis.
    """
    families = list(families or TOY_FAMILIES)
    n_rl = n_train if n_rl is None else n_rl
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    train_keys = set()
    summary = {"image_size": image_size, "seed": seed, "families": families}

    def build(split, n, avoid=None):
        rows, redrawn = [], 0
        for i in range(n):
            family = families[i % len(families)]
            for attempt in range(1000):
                problem = make_toy_problem(_toy_rng(seed, split, i, attempt), family, image_size)
                key = _problem_key(problem[0], problem[1])
                if avoid is None or key not in avoid:
                    break
                redrawn += 1
            else:
                raise RuntimeError(f"could not draw a {family} problem unseen in training")
            if avoid is None:
                train_keys.add(key)
            rid = f"toy-{split}-{i:05d}"
            rel = f"images/{rid}.png"
            problem[0].save(os.path.join(out_dir, rel))
            rows.append((rid, rel, family, problem))
        return rows, redrawn

    def dump(name, records):
        with open(os.path.join(out_dir, name), "w") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")

    n_pretrain = 3 * n_train // 2 if n_pretrain is None else n_pretrain
    sft, _ = build("sft", n_train)
    rl, _ = build("rl", n_rl)
    pre, _ = build("pretrain", n_pretrain)
    ev, redrawn = build("eval", n_eval, avoid=train_keys)

    # The SFT question is the whole user turn exactly as data.build_prompt renders it for
    # rl.jsonl and eval.jsonl (question stem, option lines, answer instruction): the model is
    # trained and evaluated on one prompt format.
    def stem(p):
        return {"question": p[5]["stem"], "options": p[3], "answer_type": p[4]}

    sft_records = [{"id": rid, "images": [rel], "question": build_prompt(stem(p)), "response": p[5]["response"],
                    "answer": p[2]} for rid, rel, _, p in sft]
    dump("sft.jsonl", sft_records)
    dump("sft_text_only.jsonl", [{**r, "images": []} for r in sft_records])
    dump("rl.jsonl", [{"id": rid, "images": [rel], "answer": p[2], **stem(p)} for rid, rel, _, p in rl])
    dump("eval.jsonl", [{"id": rid, "images": [rel], "answer": p[2], **stem(p)} for rid, rel, _, p in ev])
    dump("pretrain.jsonl", [{"id": rid, "images": [rel], **toy_pretrain_record(p, caption=i % 2 == 0)}
                            for i, (rid, rel, _, p) in enumerate(pre)])
    dump("sft_raw.jsonl", [{"id": rid, "images": [rel], "answer": p[2], **stem(p)} for rid, rel, _, p in sft])

    per_family = {}
    for _, _, family, (_, _, _, o, _, _) in ev:
        per_family.setdefault(family, []).append(toy_chance(family, o))
    chances = [c for cs in per_family.values() for c in cs]
    summary.update({
        "sft": len(sft), "sft_text_only": len(sft), "rl": len(rl), "eval": len(ev), "pretrain": len(pre),
        "eval_redrawn": redrawn,
        "chance": round(sum(chances) / len(chances), 6) if chances else 0.0,
        "chance_by_family": {f: round(sum(cs) / len(cs), 6) for f, cs in per_family.items()},
    })
    if anchored:
        for name in ("sft_anchored.jsonl", "sft_anchored.jsonl.filtered"):  # synthesize appends: start afresh
            if os.path.exists(os.path.join(out_dir, name)):
                os.remove(os.path.join(out_dir, name))
        teacher = ToyTeacher(p for _, _, _, p in sft)
        counts = synthesize(os.path.join(out_dir, "sft_raw.jsonl"), os.path.join(out_dir, "sft_anchored.jsonl"), teacher)
        summary["sft_anchored"] = counts["done"]
    with open(os.path.join(out_dir, "toy_world.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


# --------------------------------------------------------------------------------------------
# The toy world's teacher for the visual-anchored synthesis
# --------------------------------------------------------------------------------------------

class ToyTeacher(Teacher):
    """The toy world's teacher for the three synthesis stages: it sees exactly (it is handed the
    facts of every drawing it may be shown, found by the image's pixels) and writes what the
    paper's three models write, in the toy's words:
        describe  a four-part description (global scan, elements, linking, synthesis);
        reason    from the description alone: the answer, one self-check, <answer>X</answer>;
        anchor    <think>Looking at the image, ... Let me check the image again: ...</think><answer>X</answer>.
    It answers from the facts and the question's option lines, never from a stored answer, so
    `synthesize` grades it like any teacher. A stand-in for a strong VLM: perfect perception."""

    def __init__(self, problems):
        self.facts = {}
        for image, *_, facts in problems:
            self.facts[hashlib.sha1(image.convert("RGB").tobytes()).hexdigest()] = facts
        self.by_description = {}

    @staticmethod
    def _options(question):
        return dict(re.findall(r"(?m)^([A-Z])\. (.+)$", question))

    @staticmethod
    def _solve(facts, question):
        """(answer, the step that gives it, the re-check) for what the question asks. The family
        comes from the question (two families can draw the same pixels), the answer from the
        drawing."""
        stem = question.split("\n")[0].strip()
        family = {"What color is the shape?": "color", "What shape is shown?": "shape",
                  "How many shapes are there?": "count", "Is the circle on the left or right?": "side",
                  "Which bar is taller?": "bars"}.get(stem)
        if family is None:
            raise TeacherError(f"ToyTeacher: not a toy question: {stem!r}")
        letter = {v.strip(): k for k, v in ToyTeacher._options(question).items()}
        if family in ("color", "shape"):
            s = facts["shapes"][0]
            if family == "color":
                return s["color"], f"the shape is {s['color']}", f"the {s['kind']} is {s['color']}"
            return (letter[s["kind"]], f"it is a {s['kind']}, option {letter[s['kind']]}",
                    f"the shape is a {s['kind']}")
        if family == "count":
            k = len(facts["shapes"])
            return str(k), f"I count {k}", f"there are {k} separate shapes"
        if family == "side":
            side = "left" if facts["shapes"][0]["cx"] < facts["size"] / 2 else "right"
            return side, f"the circle is in the {side} half", f"the circle is on the {side}"
        t = facts["taller"]
        return letter[t], f"the {t} bar is taller, option {letter[t]}", f"the {t} bar reaches higher"

    def _describe(self, facts):
        size = facts["size"]
        if "bars" in facts:
            elements = [f"- a {b['color']} bar on the {b['side']}, {b['bottom'] - b['top'] + 1} px tall"
                        for b in facts["bars"]]
            linking = "both bars stand on the same baseline"
        else:
            elements = [f"- {_a(s)} in the {_where(s, size)}" for s in facts["shapes"]]
            linking = (f"{len(elements)} separate shapes, none touching" if len(elements) > 1
                       else "a single shape")
        return "\n".join([f"1. Global scan: a {size}x{size} drawing of flat shapes on a white background.",
                          "2. Element decomposition:", *elements, f"3. Linking: {linking}.",
                          f"4. Synthesis: {toy_caption(facts)}"])

    def chat(self, messages, images=()):
        """Stage 1 finds the drawing by its pixels and describes it; stages 2 and 3 find it again by
        that description (they see the description, not the facts) and write (self._write)."""
        prompt = messages[-1]["content"]
        question = prompt.rsplit("Question:\n", 1)[-1].split("\n\nReasoning:")[0]
        if prompt.startswith(DESCRIBE_PROMPT.split("\n")[0]):
            key = hashlib.sha1(images[0].convert("RGB").tobytes()).hexdigest()
            if key not in self.facts:
                raise TeacherError(f"{type(self).__name__}: an image it was not given the facts of")
            text = self._describe(self.facts[key])
            self.by_description[text] = self.facts[key]
            return text
        description = prompt.split("Visual description:\n", 1)[1].split("\n\nQuestion:", 1)[0]
        return self._write(self.by_description[description], question,
                           reason=prompt.startswith(REASON_PROMPT.split("\n")[0]))

    def _write(self, facts, question, reason):
        """Stage 2 (reason: from the description) or stage 3 (anchored in the image)."""
        answer, step, check = self._solve(facts, question)
        if reason:
            return (f"The description shows: {toy_caption(facts)} So {step}. Let me re-check against the "
                    f"description: {check}. The answer holds.\n<answer>{answer}</answer>")
        seen = toy_caption(facts).rstrip(".")
        return (f"<think>Looking at the image, I see {seen[0].lower() + seen[1:]}. So {step}. "
                f"Let me check the image again: {check}.</think><answer>{answer}</answer>")


# --------------------------------------------------------------------------------------------
# A byte-level BPE tokenizer for models trained from scratch
# --------------------------------------------------------------------------------------------


def byte_level_bpe(corpus=None, max_merges: int = 1024):
    """A byte-level BPE tokenizer (a `tokenizers.Tokenizer`) for tiny models trained from scratch:
    ids 0..255 are the 256 bytes, then up to `max_merges` merges learned from `corpus` (an
    iterable of strings; none without one), then Qwen's special tokens in Qwen's order. Like
    Qwen's own tokenizer it splits text with GPT-2's pattern before merging (so merges stay inside
    words) and any text round-trips through the byte tokens."""
    byte_chars = _bytes_to_unicode()  # the 256 printable stand-ins for raw bytes
    assert set(byte_chars.values()) == set(ByteLevel.alphabet())
    merges = []
    if corpus is not None and max_merges > 0:
        learner = HFTokenizer(models.BPE())
        learner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        learner.train_from_iterator(corpus, trainers.BpeTrainer(
            vocab_size=256 + max_merges, initial_alphabet=ByteLevel.alphabet(), min_frequency=2, show_progress=False))
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
                  for m in json.loads(learner.to_str())["model"]["merges"]]
    # Renumber: bytes first, in byte order, then each merge's result in the order it was learned.
    vocab = {byte_chars[b]: b for b in range(256)}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in QWEN_SPECIAL_TOKENS])
    return tok


def make_byte_tokenizer(out_dir: str, corpus=None, max_merges: int = 1024) -> str:
    """Write `byte_level_bpe(corpus, max_merges)` to out_dir. Without a corpus there are no merges:
    every byte is a token and the special tokens take ids 256..269. Returns the file path."""
    return save_tokenizer(byte_level_bpe(corpus, max_merges), out_dir)


def save_tokenizer(tok, out_dir: str) -> str:
    """out_dir/tokenizer.json, plus a tokenizer_config.json that lets transformers load it too."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "tokenizer.json")
    tok.save(path)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>",
                   "pad_token": "<|endoftext|>", "model_max_length": 32768}, f, indent=2)
    return path


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


# --------------------------------------------------------------------------------------------
# The toy model and its pretraining (the base model)
# --------------------------------------------------------------------------------------------

TOY_MODEL = dict(  # a Qwen2.5-VL of a few hundred thousand parameters: every script runs on a CPU
    text=dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, mrope_section=[4, 6, 6]),
    vision=dict(depth=2, hidden_size=64, num_heads=2, intermediate_size=128, fullatt_block_indexes=[1],
                window_size=112, out_hidden_size=128),
    min_pixels=56 * 56, max_pixels=112 * 112,
)


def toy_corpus(toy_dir):
    """The texts a toy tokenizer learns its merges from: the chat template's words, the default
    system prompt and the questions and responses of the SFT, pretraining and anchored records."""
    texts = ["system\n", "user\n", "assistant\n", DEFAULT_SYSTEM]
    for name in ("sft.jsonl", "pretrain.jsonl", "sft_anchored.jsonl"):
        if not os.path.exists(os.path.join(toy_dir, name)):
            continue
        with open(os.path.join(toy_dir, name)) as f:
            for line in f:
                r = json.loads(line)
                texts += [r["question"], r["response"]]
    return texts


def make_toy_model(out_dir, seed=0, corpus=None):
    """A randomly initialised tiny Qwen2.5-VL folder in the hub layout (config.json,
    model.safetensors, tokenizer.json, preprocessor_config.json). Its tokenizer is a byte-level
    BPE with merges learned from `corpus` (toy_corpus: ~170 merges, whole words, records ~3x
    shorter than bytes) followed by Qwen's special tokens; the vocabulary is padded to a multiple
    of 16 as Qwen pads its own. Every script loads it exactly as it loads Qwen2.5-VL-7B."""
    tok = byte_level_bpe(corpus)
    special = {name: tok.token_to_id(name) for name in QWEN_SPECIAL_TOKENS}
    vocab_size = -(-tok.get_vocab_size(with_added_tokens=True) // 16) * 16
    cfg = Config(**TOY_MODEL["text"], vocab_size=vocab_size, tie_word_embeddings=False, max_position_embeddings=4096,
                 image_token_id=special["<|image_pad|>"], video_token_id=special["<|video_pad|>"],
                 vision_start_token_id=special["<|vision_start|>"], vision_end_token_id=special["<|vision_end|>"],
                 bos_token_id=special["<|endoftext|>"], eos_token_id=special["<|im_end|>"],
                 vision=VisionConfig(**TOY_MODEL["vision"]))
    save_pretrained(init_weights(Qwen2_5_VL(cfg), seed=seed), out_dir)  # (re)creates the folder
    save_tokenizer(tok, out_dir)
    assert Tokenizer(out_dir).image_pad_id == cfg.image_token_id
    ImageProcessor(min_pixels=TOY_MODEL["min_pixels"], max_pixels=TOY_MODEL["max_pixels"]).save(out_dir)
    return out_dir


# The base model's pretraining: 3000 records x 6 epochs = 1122 steps, LM loss 6.1 -> ~0.24, ~2 minutes on
# 2 CPU cores. At lr 1e-3 (4 epochs) the loss stalls at ~0.45 and colour questions stay at 30%.
TOY_PRETRAIN = dict(epochs=6, lr=5e-4, batch_size=16)


def pretrain_toy_model(toy_dir, init_dir, out_dir, seed=0, epochs=TOY_PRETRAIN["epochs"], lr=TOY_PRETRAIN["lr"],
                       batch_size=TOY_PRETRAIN["batch_size"]):
    """The toy base model: train_sft.py's LM loss (no attention terms) on toy_dir/pretrain.jsonl
    from the random model in init_dir; the last checkpoint's hub files go to out_dir, with
    pretrain.json (these settings and the final LM loss). The run itself stays in out_dir + ".run".
    Like a real base model it reads images before any cold-start, and it grows the attention sink
    on the system turn that VAS divides by (the README measures it)."""
    run_dir = os.path.abspath(out_dir) + ".run"
    train_sft = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train_sft.py")
    subprocess.run([sys.executable, train_sft, "--data", os.path.join(toy_dir, "pretrain.jsonl"), "--model", init_dir,
                    "--out", run_dir, "--epochs", str(epochs), "--lr", str(lr),
                    "--batch-size", str(batch_size), "--micro-batch", "8", "--seed", str(seed),
                    "--agto-alpha", "0", "--agto-beta", "0", "--save-every", "0", "--num-workers", "0"], check=True)
    ckpt = resolve_checkpoint(run_dir)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f if line.strip()]
    tmp = os.path.abspath(out_dir) + ".partial"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    for name in os.listdir(ckpt):
        if name not in ("train_state.pt", "run_config.json"):
            shutil.copy2(os.path.join(ckpt, name), os.path.join(tmp, name))
    info = dict(settings=toy_pretrain_settings(toy_dir, seed, epochs, lr, batch_size),
                final_lm_loss=metrics[-1]["lm_loss"], steps=len(metrics))
    with open(os.path.join(tmp, "pretrain.json"), "w") as f:
        json.dump(info, f, indent=2)
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return info


def toy_pretrain_settings(toy_dir, seed, epochs, lr, batch_size):
    """What a cached base model was made from: the world's summary and the pretraining settings."""
    with open(os.path.join(toy_dir, "toy_world.json")) as f:
        world = json.load(f)
    return dict(world=world, seed=seed, epochs=epochs, lr=lr, batch_size=batch_size)


def base_model(world_dir, model_dir, seed, epochs, lr):
    """The base model of world_dir in model_dir: kept when pretrained with these settings (cached),
    else a fresh random model (model_dir + ".init") pretrained. Returns {"model"} (+ "pretrain":
    the pretraining's summary when it ran). Shared by both worlds' command lines."""
    settings = toy_pretrain_settings(world_dir, seed, epochs, lr, TOY_PRETRAIN["batch_size"])
    if cached_base(model_dir, settings):
        log.info("%s: the base model pretrained with these settings is already there (cached)", model_dir)
        return {"model": model_dir}
    init = make_toy_model(model_dir + ".init", seed=seed, corpus=toy_corpus(world_dir))
    return {"pretrain": pretrain_toy_model(world_dir, init, model_dir, seed=seed, epochs=epochs, lr=lr),
            "model": model_dir}


def cached_base(out_dir, settings) -> bool:
    """True when out_dir holds a base model pretrained with exactly these settings."""
    try:
        with open(os.path.join(out_dir, "pretrain.json")) as f:
            return json.load(f)["settings"] == settings
    except (OSError, ValueError, KeyError):
        return False


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="toy")
    p.add_argument("--n-train", type=int, default=2000, help="sft problems")
    p.add_argument("--n-rl", type=int, default=None, help="rl problems (default: n-train)")
    p.add_argument("--n-eval", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=56, help="a multiple of 28: 56 -> 4 image tokens")
    p.add_argument("--model-out", default=None, help="the toy base model's folder (default: OUT/model)")
    p.add_argument("--model-seed", type=int, default=None, help="seed of the model's initialisation and pretraining "
                                                                "(default: --seed)")
    p.add_argument("--n-pretrain", type=int, default=None, help="pretraining problems (default: 1.5 * n-train)")
    p.add_argument("--pretrain-epochs", type=float, default=TOY_PRETRAIN["epochs"])
    p.add_argument("--pretrain-lr", type=float, default=TOY_PRETRAIN["lr"])
    p.add_argument("--no-pretrain", action="store_true", help="leave the model randomly initialised (no base model)")

    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    log.info("config: %s", json.dumps(vars(args)))

    result = write_toy_world(args.out, n_train=args.n_train, n_eval=args.n_eval, seed=args.seed,
                             image_size=args.image_size, n_rl=args.n_rl, n_pretrain=args.n_pretrain)
    model_dir = args.model_out or os.path.join(args.out, "model")
    mseed = args.seed if args.model_seed is None else args.model_seed
    if args.no_pretrain:
        result["model"] = make_toy_model(model_dir, seed=mseed, corpus=toy_corpus(args.out))
    else:
        result.update(base_model(args.out, model_dir, mseed, args.pretrain_epochs, args.pretrain_lr))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    run_cli(main)
