"""The tally world (experiments/tally.py) and the statistics of its experiment
(experiments/tally_world.py): answers checked against the pixels, the hint's rates per split, the
synthesis, the chains' lengths, and the verdict rule on hand-computed numbers."""

import json
import math
import os
import random
import sys

import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))

import tally  # noqa: E402
import tally_world  # noqa: E402
import toy  # noqa: E402
from data import Tokenizer, build_prompt  # noqa: E402
from grading import extract_answer, format_ok, grade  # noqa: E402


def _jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def counts_from_pixels(image):
    """Each colour's count read from the drawing itself: a cell holds a shape of the colour whose
    exact RGB covers its centre pixel area (shapes are drawn without antialiasing)."""
    counts = {c: 0 for c in tally.COLORS}
    rgb_to_name = {v: k for k, v in tally.COLORS.items()}
    px = image.convert("RGB").load()
    for cell in range(tally.GRID * tally.GRID):
        x0, y0 = (cell % tally.GRID) * tally.CELL, (cell // tally.GRID) * tally.CELL
        seen = {px[x, y] for x in range(x0, x0 + tally.CELL) for y in range(y0, y0 + tally.CELL)} - {(255, 255, 255)}
        assert len(seen) <= 1, f"cell {cell} holds more than one colour"
        if seen:
            counts[rgb_to_name[seen.pop()]] += 1
    return counts


def answer_from_counts(family, counts, x, y):
    if family == "count":
        return str(counts[x])
    if family == "total":
        return str(counts[x] + counts[y])
    if family == "more":
        return x if counts[x] > counts[y] else y
    return str(counts[x] - counts[y])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("tally")
    summary = tally.write_world(str(d), n_train=48, n_rl=8, n_eval=40, n_pretrain=24, seed=3)
    return d, summary


def test_every_answer_follows_from_the_pixels(world):
    d, _ = world
    for split in ("eval_id", "eval_shift", "rl", "sft_raw"):
        for r in _jsonl(d / f"{split}.jsonl"):
            counts = counts_from_pixels(Image.open(d / r["images"][0]))
            assert counts == r["counts"]
            x, y = (r["colors"] + [None])[:2]
            assert r["answer"] == answer_from_counts(r["family"], counts, x, y)
            assert r["question"].endswith(f"\nHint: {r['hint']}.")
            assert (r["hint"] == r["answer"]) == r["hint_right"]


def test_the_hint_is_right_80_percent_in_distribution_and_never_when_shifted():
    n = 800
    for shifted in (False, True):
        right, far = 0, 0
        for i in range(n):
            family = list(tally.FAMILIES)[i % 4]
            p = tally.make_problem(random.Random(f"hint-test/{shifted}/{i}"), family, shifted)
            f = p["facts"]
            right += f["hint"] == p["answer"]
            if family != "more" and f["hint"] != p["answer"]:
                far += abs(int(f["hint"]) - int(p["answer"])) > 2
            if family == "more":
                assert f["hint"] in f["colors"]
        assert far == 0  # a wrong hint stays near the right answer
        if shifted:
            assert right == 0
        else:  # binomial sd at n = 800 is 1.4 points: 0.8 +- 0.05 is over 3.5 sd
            assert abs(right / n - tally.HINT_RIGHT) < 0.05


def test_captions_and_direct_answers_of_the_pretraining(world):
    d, _ = world
    for i, r in enumerate(_jsonl(d / "pretrain.jsonl")):
        counts = counts_from_pixels(Image.open(d / r["images"][0]))
        if i % 2 == 0:
            assert r["question"] == tally.CAPTION_QUESTION
            assert tally_world.parse_caption(r["response"]) == counts
        else:
            assert r["response"].startswith("<answer>") and "Hint: " in r["question"]


def test_sft_chains_and_their_text_only_copy(world):
    d, _ = world
    sft, text_only = _jsonl(d / "sft.jsonl"), _jsonl(d / "sft_text_only.jsonl")
    raw = {r["id"]: r for r in _jsonl(d / "sft_raw.jsonl")}
    assert [r["response"] for r in sft] == [r["response"] for r in text_only]
    assert all(r["images"] == [] for r in text_only)
    for r in sft:
        assert format_ok(r["response"]) and grade(extract_answer(r["response"]), r["answer"], None, None)
        assert r["question"] == build_prompt(raw[r["id"]])  # the prompt evaluate.py builds
        assert r["response"].count("image") >= 2  # it reads the image, then goes back to it


def test_anchored_synthesis_keeps_every_problem_and_its_answer(world):
    d, summary = world
    anchored = _jsonl(d / "sft_anchored.jsonl")
    assert summary["sft_anchored"] == len(anchored) == 48
    raw = {r["id"]: r for r in _jsonl(d / "sft_raw.jsonl")}
    for r in anchored:
        assert extract_answer(r["response"]) == raw[r["id"]]["answer"]
        assert "Let me check the image again" in r["response"] and format_ok(r["response"])


def test_chains_are_40_to_120_tokens_of_the_worlds_tokenizer(world, tmp_path):
    d, _ = world
    tok_dir = tmp_path / "tok"
    toy.save_tokenizer(toy.byte_level_bpe(toy.toy_corpus(str(d))), str(tok_dir))
    tok = Tokenizer(str(tok_dir))
    for name in ("sft.jsonl", "sft_anchored.jsonl"):
        lengths = [len(tok.encode(r["response"])) for r in _jsonl(d / name)]
        assert 40 <= min(lengths) and max(lengths) <= 120, (name, min(lengths), max(lengths))


def test_teacher_parses_every_family_and_refuses_other_questions():
    for family in tally.FAMILIES:
        q = tally.stem(family, "green", "red") + "\nHint: 2."
        got = tally.TallyTeacher.parse(q)
        assert got == (family, ["green", "red"][:1 if family == "count" else 2], "2")
    with pytest.raises(Exception, match="not a tally question"):
        tally.TallyTeacher.parse("What shape is shown?")


# ---- the statistics of the experiment ---------------------------------------------------------

def test_fisher_interval_and_the_verdict_rule():
    # r = 0.5, n = 28: atanh(0.5) = 0.549306, se = 1 / 5, 1.959964 / 5 = 0.391993
    lo, hi = tally_world.fisher_ci(0.5, 28)
    assert lo == pytest.approx(math.tanh(0.549306 - 0.391993), abs=1e-6)
    assert hi == pytest.approx(math.tanh(0.549306 + 0.391993), abs=1e-6)
    assert (round(lo, 3), round(hi, 3)) == (0.156, 0.736)  # the textbook interval of r = 0.5, n = 28
    assert tally_world.verdict(0.1, 2.0) == "holds"
    assert tally_world.verdict(-2.0, -0.1) == "does not hold"
    assert tally_world.verdict(-0.1, 2.0) == "inconclusive"
    assert tally_world.verdict(None, None) == "inconclusive"


def _runs(values, key="accuracy"):
    return [{"seed": s, "eval_shift": {key: v, "vas": v}, "eval_id": {key: v, "vas": v}} for s, v in enumerate(values)]


def test_paired_differences_are_taken_seed_by_seed():
    runs = {"a": _runs([61.0, 52.0, 70.0]), "b": _runs([60.0, 50.0, 67.0])}
    runs["b"] = list(reversed(runs["b"]))  # the order of the runs must not matter, only the seed
    p = tally_world.paired(runs, "a", "b", "eval_shift")
    assert p["diffs"] == [1.0, 2.0, 3.0] and p["mean"] == 2.0
    # sd 1, n 3: 4.302653 / sqrt(3)
    assert p["ci_low"] == pytest.approx(2.0 - 4.302653 / 3 ** 0.5, rel=1e-5)
    assert p["verdict"] == "inconclusive"  # [-0.48, 4.48] contains zero
    runs["a"] = _runs([62.0, 52.5, 70.0])  # diffs 2, 2.5, 3: sd 0.5, 2.5 +- 1.24
    assert tally_world.paired(runs, "a", "b", "eval_shift")["verdict"] == "holds"


def test_the_equivalence_verdict_of_keeps_vas():
    base = _runs([1.0, 1.0, 1.0, 1.0])
    assert tally_world.relative_change({"a": _runs([1.05, 0.98, 1.02, 1.0]), "b": base}, "a", "b",
                                       "eval_shift")["verdict"] == "holds"
    assert tally_world.relative_change({"a": _runs([1.6, 1.7, 1.65, 1.62]), "b": base}, "a", "b",
                                       "eval_shift")["verdict"] == "does not hold"
    assert tally_world.relative_change({"a": _runs([1.0, 1.5, 0.9, 1.3]), "b": base}, "a", "b",
                                       "eval_shift")["verdict"] == "inconclusive"


def test_read_eval_counts_answers_that_follow_the_hint(tmp_path):
    world = tmp_path / "w"
    world.mkdir()
    recs = {sp: [{"id": f"tally-{sp}-{i:05d}", "question": f"q\nHint: {h}.", "hint": h, "family": fam}
                 for i, (h, fam) in enumerate([("3", "count"), ("red", "more"), ("5", "total"), ("2", "diff")])]
            for sp in tally_world.SPLITS}
    rows = []
    for sp, rs in recs.items():
        (world / f"{sp}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))
        # answers: the hint, the hint, another number (right), nothing
        preds = [{"id": r["id"], "extracted": e, "correct": c} for r, e, c in
                 zip(rs, ["3", "Red", "4", None], [False, False, True, False])]
        path = tmp_path / f"{sp}.jsonl"
        path.write_text("".join(json.dumps(p) + "\n" for p in preds))
        rows.append({"benchmark": sp, "setting": "base", "accuracy": 25.0, "mean_vas": 0.5, "predictions": str(path)})
    (tmp_path / "summary.json").write_text(json.dumps({"rows": rows}))
    got = tally_world.read_eval(str(tmp_path), str(world))
    row = got[("eval_shift", "base")]
    assert row["hint_follow"] == 50.0 and row["n"] == 4
    assert row["per_family"] == {"count": 0.0, "more": 0.0, "total": 100.0, "diff": 0.0}


def test_the_gates_of_a_seed():
    good = {"probe": {c: {"concat": 50.0, "mean": 95.0} for c in tally.COLORS},
            "captions": {f: 100.0 for f in tally.FAMILIES}}
    assert tally_world.gate(good)  # the concatenated probe is reported, not gated
    assert not tally_world.gate({**good, "captions": {**good["captions"], "diff": 89.9}})
    assert not tally_world.gate({**good, "probe": {**good["probe"], "red": {"concat": 99.0, "mean": 80.0}}})
    losses = {"sft_loss": {"sft_multimodal": 0.05, "sft_avar": 0.12}}
    assert tally_world.gate({**good, **losses})  # version 1 has no loss gate
    assert not tally_world.gate({**good, **losses}, sft_loss_gate=0.1)
    assert tally_world.gate({**good, **losses}, sft_loss_gate=0.15)
