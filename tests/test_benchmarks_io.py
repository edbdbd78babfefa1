"""Benchmark readers of evaluate.py: VLMEvalKit TSV and the project's jsonl, good and bad input."""

import base64
import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evaluate import (ANSWER_INSTRUCTION, CHOICE_INSTRUCTION, build_prompt, load_images, read_benchmark)

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
    assert build_prompt(mc) == f"Which animal?\nA. cat\nB. dog\n{ANSWER_INSTRUCTION} {CHOICE_INSTRUCTION}"
    free = dict(question="How many legs? ", options=[], answer_type="integer")
    assert build_prompt(free) == f"How many legs?\n{ANSWER_INSTRUCTION}"
    letters_in_text = dict(question="Pick one: (A) 1 (B) 2", options=[], answer_type="multi_choice")
    assert build_prompt(letters_in_text).endswith(CHOICE_INSTRUCTION)
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
    no_answer = write_tsv(tmp_path / "no_answer.tsv", [dict(index=1, question="q", image="x")],
                          ["index", "question", "image"])
    with pytest.raises(ValueError, match=r"no_answer\.tsv: missing required column.*answer"):
        read_benchmark(no_answer)
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
