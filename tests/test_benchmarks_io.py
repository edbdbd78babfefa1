"""Benchmark readers of benchmarks.py: VLMEvalKit TSV and the project's jsonl, good and bad input."""

import base64
import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data import ANSWER_INSTRUCTION, MC_INSTRUCTION, build_prompt
from benchmarks import load_images
from evaluate import grade, read_benchmark

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
HEADER = ["index", "question", "hint", "A", "B", "C", "D", "answer", "answer_type", "image"]


def png_bytes(color=RED, size=(8, 6)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def noise_png(side: int) -> bytes:
    """An incompressible PNG: its base64 is about 4 * side**2 characters."""
    rng = np.random.default_rng(side)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def write_tsv(path: Path, rows: list[dict], header=HEADER):
    # the layout pandas' to_csv(sep="\t") writes: minimal quoting, missing values as "nan" or ""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=header, delimiter="\t", extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow({k: row.get(k, "") for k in header})
    return path


def good_rows():
    return [
        dict(index=1, question="Which animal is shown?", hint="Look at the ears.", A="cat", B="dog",
             C="nan", D="", answer="B", image=b64(png_bytes(RED))),
        dict(index=2, question="How many legs?", A="nan", answer="4", answer_type="integer", image="1"),
        dict(index=3, question="Compare <image 1> and <image 2>.", answer="no",
             image=json.dumps([b64(png_bytes(GREEN)), b64(png_bytes(BLUE, (4, 4)))])),
        dict(index=4, question="Python-list cell.", answer="2.5", answer_type="float",
             image=str([b64(png_bytes(BLUE)), b64(png_bytes(RED))])),
        dict(index=5, question="No image: dropped, as VLMEvalKit does.", answer="1", image="nan"),
        # a cell larger than csv's default 128 KiB field limit
        dict(index=6, question="A big image.", answer="7", image=b64(noise_png(300))),
    ]


def test_read_tsv(tmp_path):
    path = write_tsv(tmp_path / "Bench_MINI.tsv", good_rows())
    recs = read_benchmark(path)
    assert [r["id"] for r in recs] == ["1", "2", "3", "4", "6"]
    assert all(r["benchmark"] == "Bench_MINI" for r in recs)
    r1, r2, r3, r4, r6 = recs
    assert r1["question"] == "Hint: Look at the ears.\nWhich animal is shown?"
    assert r1["options"] == ["cat", "dog"] and r1["answer"] == "B" and r1["answer_type"] == "multi_choice"
    assert r2["options"] == [] and r2["answer_type"] == "integer" and r2["question"] == "How many legs?"
    assert r3["answer_type"] is None and r4["answer_type"] == "float"
    # images stay encoded until load_images
    assert all(isinstance(s, str) for r in recs for s in r["images"])
    (im1,), (im2,) = load_images(r1), load_images(r2)
    assert im1.mode == "RGB" and im1.size == (8, 6) and im1.getpixel((0, 0)) == RED
    assert im2.tobytes() == im1.tobytes()  # index-reference row shares row 1's image
    ims3 = load_images(r3)
    assert [im.getpixel((0, 0)) for im in ims3] == [GREEN, BLUE] and ims3[1].size == (4, 4)
    assert [im.getpixel((0, 0)) for im in load_images(r4)] == [BLUE, RED]
    assert load_images(r6)[0].size == (300, 300)


def test_read_tsv_image_path_column(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(png_bytes(GREEN))
    (tmp_path / "imgs" / "b.png").write_bytes(png_bytes(BLUE))
    header = ["index", "question", "answer", "question_type", "image_path"]
    path = write_tsv(tmp_path / "paths.tsv", [
        dict(index="q1", question="One", answer="A", question_type="multi_choice", image_path="imgs/a.png"),
        dict(index="q2", question="Two", answer="yes", image_path="['imgs/a.png', 'imgs/b.png']"),
    ], header)
    r1, r2 = read_benchmark(path)
    assert r1["images"] == [tmp_path / "imgs" / "a.png"] and r1["answer_type"] == "multi_choice"
    assert [im.getpixel((0, 0)) for im in load_images(r2)] == [GREEN, BLUE]


def test_read_jsonl(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "1.png").write_bytes(png_bytes(RED))
    (tmp_path / "img" / "2.png").write_bytes(png_bytes(GREEN))
    lines = [
        json.dumps(dict(id="g1", images=["img/1.png", "img/2.png"], question="Find x.",
                        options=["3", "4"], answer="B")),
        "",
        json.dumps(dict(id=7, image="img/2.png", question="Area?", answer=12, answer_type="integer")),
        json.dumps(dict(id="t", images=[], question="No image.", answer="yes")),
    ]
    path = tmp_path / "geo.jsonl"
    path.write_text("\n".join(lines) + "\n")
    r1, r2, r3 = read_benchmark(path)
    assert r1 == dict(id="g1", images=[tmp_path / "img/1.png", tmp_path / "img/2.png"], question="Find x.",
                      options=["3", "4"], answer="B", answer_type="multi_choice", benchmark="geo")
    assert r2["id"] == "7" and r2["answer"] == "12" and r2["answer_type"] == "integer" and r2["options"] == []
    assert r3["images"] == [] and r3["answer_type"] is None
    assert [im.getpixel((0, 0)) for im in load_images(r1)] == [RED, GREEN]


def test_build_prompt():
    mc = dict(question="Which animal?", options=["cat", "dog"], answer_type="multi_choice")
    assert build_prompt(mc) == f"Which animal?\nA. cat\nB. dog\n{ANSWER_INSTRUCTION} {MC_INSTRUCTION}"
    free = dict(question="How many legs? ", options=[], answer_type="integer")
    assert build_prompt(free) == f"How many legs?\n{ANSWER_INSTRUCTION}"
    letters_in_text = dict(question="Pick one: (A) 1 (B) 2", options=[], answer_type="multi_choice")
    assert build_prompt(letters_in_text).endswith(MC_INSTRUCTION)
    assert "<think>" in ANSWER_INSTRUCTION and "<answer>" in ANSWER_INSTRUCTION


# ---- bad input: a ValueError that names the file and the row or line ----

def _tsv_with(tmp_path, bad_row: dict, header=HEADER):
    rows = [dict(index=1, question="ok", answer="1", image=b64(png_bytes()))]
    return write_tsv(tmp_path / "bad.tsv", rows + [bad_row], header)


BAD_TSV_ROWS = {
    "not base64": (dict(index=2, question="q", answer="1", image="!!not base64!!" * 10), "row 2"),
    "not an image": (dict(index=2, question="q", answer="1", image=b64(b"hello world " * 20)), "row 2"),
    "truncated png": (dict(index=2, question="q", answer="1", image=b64(noise_png(32)[:1500])), "row 2"),
    "dangling reference": (dict(index=2, question="q", answer="1", image="99"), "row 2"),
    "empty answer": (dict(index=2, question="q", answer="", image="1"), "row 2"),
    "empty question": (dict(index=2, question="nan", answer="1", image="1"), "row 2"),
    "duplicate index": (dict(index=1, question="q", answer="1", image="1"), "row 2"),
    "option gap": (dict(index=2, question="q", A="x", C="z", answer="A", image="1"), "row 2"),
    "bad image list": (dict(index=2, question="q", answer="1", image="[" + "1, " * 30 + "2]"), "row 2"),
}


@pytest.mark.parametrize("case", sorted(BAD_TSV_ROWS))
def test_bad_tsv_rows(tmp_path, case):
    row, where = BAD_TSV_ROWS[case]
    path = _tsv_with(tmp_path, row)
    with pytest.raises(ValueError, match=rf"bad\.tsv: {where}\b"):
        read_benchmark(path)


def test_bad_tsv_files(tmp_path):
    empty = tmp_path / "empty.tsv"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"empty\.tsv: empty file"):
        read_benchmark(empty)
    header_only = write_tsv(tmp_path / "header_only.tsv", [])
    with pytest.raises(ValueError, match=r"header_only\.tsv: no rows"):
        read_benchmark(header_only)
    no_question = write_tsv(tmp_path / "no_question.tsv", [dict(index=1, answer="1", image="x")],
                            ["index", "answer", "image"])
    with pytest.raises(ValueError, match=r"no_question\.tsv: missing required column.*question"):
        read_benchmark(no_question)  # (no answer column is a test split: test_answerless_split)
    no_image = write_tsv(tmp_path / "no_image.tsv", [dict(index=1, question="q", answer="1")],
                         ["index", "question", "answer"])
    with pytest.raises(ValueError, match=r"no_image\.tsv: missing required column.*image"):
        read_benchmark(no_image)
    missing_file = write_tsv(tmp_path / "missing_file.tsv",
                             [dict(index=1, question="q", answer="1", image_path="nope.png")],
                             ["index", "question", "answer", "image_path"])
    with pytest.raises(ValueError, match=r"missing_file\.tsv: row 1 .*nope\.png.*does not exist"):
        read_benchmark(missing_file)
    with pytest.raises(ValueError, match=r"bench\.csv: unknown benchmark format"):
        read_benchmark(tmp_path / "bench.csv")


GOOD_LINE = json.dumps(dict(id="a", images=["ok.png"], question="q", answer="1"))
BAD_JSONL_LINES = {
    "invalid json": ('{"id": "b", "question": ', "line 2"),
    "not an object": ("[1, 2]", "line 2"),
    "missing question": (json.dumps(dict(id="b", images=[], answer="1")), "line 2"),
    "missing answer": (json.dumps(dict(id="b", images=[], question="q")), "line 2"),
    "missing images": (json.dumps(dict(id="b", question="q", answer="1")), "line 2"),
    "images not a list": (json.dumps(dict(id="b", images="ok.png", question="q", answer="1")), "line 2"),
    "no such file": (json.dumps(dict(id="b", images=["gone.png"], question="q", answer="1")), "line 2"),
    "not an image": (json.dumps(dict(id="b", images=["fake.png"], question="q", answer="1")), "line 2"),
    "bad answer_type": (json.dumps(dict(id="b", images=[], question="q", answer="1", answer_type="num")),
                        "line 2"),
    "options not strings": (json.dumps(dict(id="b", images=[], question="q", answer="A", options=[1, 2])),
                            "line 2"),
    "duplicate id": (GOOD_LINE, "line 2"),
}


@pytest.mark.parametrize("case", sorted(BAD_JSONL_LINES))
def test_bad_jsonl_lines(tmp_path, case):
    (tmp_path / "ok.png").write_bytes(png_bytes())
    (tmp_path / "fake.png").write_bytes(b"this is text, not a PNG")
    line, where = BAD_JSONL_LINES[case]
    path = tmp_path / "bad.jsonl"
    path.write_text(GOOD_LINE + "\n" + line + "\n")
    with pytest.raises(ValueError, match=rf"bad\.jsonl: {where}\b"):
        read_benchmark(path)


def test_empty_jsonl(tmp_path):
    path = tmp_path / "blank.jsonl"
    path.write_text("\n  \n")
    with pytest.raises(ValueError, match=r"blank\.jsonl: empty file"):
        read_benchmark(path)


# ---- VLMEvalKit's math benchmarks and test splits, with the columns their TSVs carry ----

MATHVISTA_HEADER = ["index", "image", "question", "answer", "question_type", "answer_type", "choices",
                    "unit", "precision", "task", "skills", "answer_option"]
MC_QUERY = ("Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, at "
            "the end.\nQuestion: What fraction of the shape is blue?\nChoices:\n(A) 3/11\n(B) 8/11\n(C) 6/11\n"
            "(D) 3/5")


def mathvista_rows():
    """Rows shaped as VLMEvalKit's MathVista_MINI.tsv: the full query in `question` (choices listed
    in it), multiple-choice options only in `choices` (a python list literal), the answer as option
    text plus `answer_option`, missing cells as pandas writes them ("nan")."""
    img = b64(png_bytes(BLUE))
    return [
        dict(index=1, image=img, question=MC_QUERY, answer="8/11", question_type="multi_choice",
             answer_type="text", choices="['3/11', '8/11', '6/11', '3/5']", unit="nan", precision="nan",
             task="math word problem", skills="['arithmetic reasoning', 'numeric commonsense']",
             answer_option="B"),
        dict(index=2, image=img, question="Hint: ... two decimal places ...\nQuestion: How much money does Luca "
             "need? (Unit: $)", answer="1.45", question_type="free_form", answer_type="float", choices="nan",
             unit="$", precision="2.0", task="math word problem", skills="['arithmetic reasoning']",
             answer_option="nan"),
        dict(index=3, image=img, question="Question: What is the perimeter? (Unit: cm)", answer="14",
             question_type="free_form", answer_type="integer", choices="", unit="cm", precision="",
             task="geometry problem solving", skills="['geometry reasoning', 'algebraic reasoning']",
             answer_option=""),
        # two options with one text: only answer_option says which is meant
        dict(index=4, image=img, question="Question: Which bar is taller?\nChoices:\n(A) 5\n(B) 5\n(C) 7",
             answer="5", question_type="multi_choice", answer_type="text", choices="['5', '5', '7']",
             task="figure question answering", skills="['statistical reasoning']", answer_option="B"),
    ]


def test_mathvista_columns(tmp_path):
    path = write_tsv(tmp_path / "MathVista_MINI.tsv", mathvista_rows(), MATHVISTA_HEADER)
    mc, money, perim, twin = read_benchmark(path)
    assert mc["options"] == ["3/11", "8/11", "6/11", "3/5"] and mc["answer_type"] == "multi_choice"
    assert mc["answer"] == "B"  # answer_option, which VLMEvalKit grades
    assert mc["groups"] == {"task": ["math word problem"], "skills": ["arithmetic reasoning", "numeric commonsense"]}
    # the query lists the choices already: the prompt must not list them twice
    assert mc["options_in_question"] and build_prompt(mc).count("8/11") == 1
    assert money["options"] == [] and money["answer_type"] == "float"
    assert money["precision"] == 2 and money["unit"] == "$" and "options_in_question" not in money
    assert perim["answer_type"] == "integer" and perim["unit"] == "cm" and "precision" not in perim
    assert twin["answer"] == "B" and twin["options"] == ["5", "5", "7"]

    def graded(rec, pred):
        return grade(pred, rec["answer"], rec["options"], rec["answer_type"],
                     precision=rec.get("precision"), unit=rec.get("unit"))

    # a letter, the letter with its text, or the option text: all name B
    assert [graded(mc, p) for p in ("B", "(B) 8/11", "8/11", "(B)", "B. 8/11")] == [True] * 5
    assert [graded(mc, p) for p in ("A", "3/11", "(C) 6/11", "D")] == [False] * 4
    # what the reader gave before `choices` was read: no options, gold "8/11", type text
    assert grade("B", "8/11", [], "text") is False
    # MathVista's scorer rounds a float prediction to `precision` decimals; the unit is not part of it
    assert [graded(money, p) for p in ("1.45", "$1.45", "1.449", "1.45 $")] == [True] * 4
    assert [graded(money, p) for p in ("1.4", "1.46", "145")] == [False] * 3
    assert graded(perim, "14 cm") and graded(perim, "14") and not graded(perim, "15 cm")
    assert graded(twin, "B") and not graded(twin, "A") and not graded(twin, "5")  # "5" is ambiguous


def test_mathverse_multi_choice_in_the_question(tmp_path):
    """MathVerse (VLMEvalKit's MathVerse_MINI*.tsv): question_type "multi-choice" with a hyphen,
    the options in the question text after "Choices:", the answer a letter."""
    header = ["index", "image", "question", "answer", "question_type", "problem_version", "query_cot"]
    q = ("As shown in the figure, circle O has a radius 1.0, if angle BAC = 60.0, then the length of BC is ()\n"
         "Choices:\nA:2\nB:2\u221a{3}\nC:\u221a{3}\nD:2\u221a{2}")
    rows = [dict(index=5, image=b64(png_bytes()), question=q, answer="C", question_type="multi-choice",
                 problem_version="Vision Intensive", query_cot=q),
            dict(index=6, image="5", question="Find the area of the square.", answer="16",
                 question_type="free-form", problem_version="Vision Intensive", query_cot="...")]
    mc, free = read_benchmark(write_tsv(tmp_path / "MathVerse_MINI_Vision_Intensive.tsv", rows, header))
    assert mc["answer_type"] == "multi_choice" and mc["answer"] == "C"
    assert mc["groups"] == {"problem_version": ["Vision Intensive"]}
    assert mc["options"] == ["2", "2\u221a{3}", "\u221a{3}", "2\u221a{2}"] and mc["options_in_question"]
    assert build_prompt(mc).count("\u221a{3}") == 2  # B and C, each once
    assert all(grade(p, "C", mc["options"], "multi_choice") for p in ("C", "(C)", "C: \u221a{3}", "\u221a{3}"))
    assert not any(grade(p, "C", mc["options"], "multi_choice") for p in ("B", "2\u221a{3}", "D"))
    assert free["answer_type"] is None and free["options"] == [] and grade("16", free["answer"])


@pytest.mark.parametrize("answer_column", [False, True])
def test_answerless_split(tmp_path, answer_column):
    """A test split (MMBench_TEST_EN-style: no answer column, or one left empty): every row is read,
    with answer None, for prediction without scoring."""
    header = ["index", "question", "hint", "A", "B", "C", "D", "category", "l2-category", "image"]
    header += ["answer"] if answer_column else []
    rows = [dict(index=i, question=f"Q{i}?", A="x", B="y", category="attribute_recognition",
                 **{"l2-category": "finegrained_perception"}, answer="",
                 image=b64(png_bytes()) if i == 0 else "0") for i in range(3)]
    recs = read_benchmark(write_tsv(tmp_path / "MMBench_TEST_EN.tsv", rows, header))
    assert [r["id"] for r in recs] == ["0", "1", "2"]
    assert all(r["answer"] is None and r["answer_type"] == "multi_choice" for r in recs)
    assert recs[0]["groups"] == {"category": ["attribute_recognition"], "l2-category": ["finegrained_perception"]}


def test_bad_math_benchmark_rows(tmp_path):
    rows = mathvista_rows()[:1]
    bad = [dict(rows[0], index=7, choices="['3/11', '8/11'"),  # cut list literal
           dict(rows[0], index=8, choices="__import__('os')"),  # never evaluated
           dict(rows[0], index=9, answer_option="F"),
           dict(rows[0], index=11, answer_option="C"),  # option C is 6/11, the answer 8/11
           dict(mathvista_rows()[1], index=10, precision="two")]
    for row in bad:
        path = write_tsv(tmp_path / "bad.tsv", rows + [row], MATHVISTA_HEADER)
        with pytest.raises(ValueError, match=r"bad\.tsv: row 2 \(index '\d+'\)"):
            read_benchmark(path)
