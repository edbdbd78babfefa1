"""A bounded fuzz of the readers: a few hundred damaged inputs (fixed seed), each of which must end
in a clean refusal naming the file, a counted skip, or a valid read; never another exception.

Damage: random byte flips and truncations of jsonl lines, TSV files and PNG/JPEG images (all
written by the tools whose format they are: json, csv-style TSV as VLMEvalKit writes it, pillow),
deleted fields and fields of the wrong type in JSON records, deleted cells and columns in TSV rows.
Inputs go through what a run does with them, in-process: the SFT dataset (data.normalize_record,
validation, then `dataset[i]` as a data-loader worker calls it), the GRPO prompt dataset,
benchmarks.read_benchmark and the decoding of a benchmark's images.
"""

import base64
import copy
import io
import json
import random
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

import benchmarks
import train_grpo as tg
from data import DataError, ImageProcessor, SFTDataset, Tokenizer, load_image
from toy import make_byte_tokenizer

SEED, N_CASES = 0, 700


def image_bytes(fmt, seed=0, size=(56, 56)):
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    arr[: size[1] // 2] = (200, 30, 30)  # half flat, half noise: compressible and not trivial
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def flip_bytes(data: bytes, rng, n=None) -> bytes:
    b = bytearray(data)
    for _ in range(n or rng.randint(1, 4)):
        if b:
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    return bytes(b)


def cut(data: bytes, rng) -> bytes:
    return data[:rng.randrange(len(data))]


def damage_bytes(data: bytes, rng) -> bytes:
    return flip_bytes(data, rng) if rng.random() < 0.5 else cut(data, rng)


def set_size(data: bytes, w: int, h: int) -> bytes:
    """The image with other dimensions written into its header (PNG: with a valid CRC), as a
    huge or odd image would have them, over the same pixel data."""
    b = bytearray(data)
    if b[12:16] == b"IHDR":
        b[16:24] = struct.pack(">II", w, h)
        b[29:33] = struct.pack(">I", zlib.crc32(bytes(b[12:29])))
        return bytes(b)
    i = 2  # JPEG: walk the markers to the start of frame
    while b[i + 1] not in (0xC0, 0xC1, 0xC2):
        i += 2 + struct.unpack(">H", b[i + 2:i + 4])[0]
    b[i + 5:i + 9] = struct.pack(">HH", min(h, 65535), min(w, 65535))
    return bytes(b)


def damage_image(data: bytes, rng) -> bytes:
    if rng.random() < 0.3:
        return set_size(data, *rng.choice([(60000, 60000), (1, 1), (0, 56), (20000, 20), (3000, 3000)]))
    return damage_bytes(data, rng)


def paths_of(obj):
    """Every (container, key) inside a JSON value."""
    out = []
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else []
    for k, v in items:
        out.append((obj, k))
        out.extend(paths_of(v))
    return out


def damage_record(rec, rng):
    """Delete a field (or list item) anywhere in the record, or give it a value of another type."""
    rec = copy.deepcopy(rec)
    container, key = rng.choice(paths_of(rec))
    if rng.random() < 0.5:
        del container[key]
    else:
        container[key] = rng.choice([None, 0, 1.5, "", "<image>", [], {}, [None], {"type": "image"}, True])
    return rec


def sft_records():
    return [
        {"image": "a.png", "question": "Which color?", "response": "<answer>red</answer>", "system": "Be brief."},
        {"images": ["a.png", "b.jpg"], "problem": "<image>Compare <image>.", "solution": "Same."},
        {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]},
                      {"role": "assistant", "content": "A red square."}], "images": ["a.png"]},
        {"messages": [{"role": "user", "content": [{"type": "image", "image": "b.jpg"},
                                                   {"type": "text", "text": "Colour?"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "red"}]}]},
        {"conversations": [{"from": "human", "value": "<image>Name it."}, {"from": "gpt", "value": "A square."}],
         "images": ["a.png"], "system": "S"},
        {"question": "What is 2 + 3?", "answer": "5"},
    ]


def rl_records():
    return [{"id": "r0", "images": ["a.png"], "question": "What color?", "answer": "red", "answer_type": "text"},
            {"id": "r1", "image": "b.jpg", "question": "Which?", "options": ["red", "blue"], "answer": "A"},
            {"id": "r2", "images": [], "question": "2 + 3?", "answer": "5"}]


def bench_tsv(images):
    """A VLMEvalKit TSV: base64 images, an image given as the index of another row, options A-C, hint."""
    b64 = [base64.b64encode(d).decode() for d in images]
    rows = [["index", "question", "hint", "A", "B", "C", "answer", "image"],
            ["1", "Which colour?", "", "red", "blue", "", "A", b64[0]],
            ["2", "How many?", "Count them.", "", "", "", "3", b64[1]],
            ["3", "Pick one.", "", "x", "y", "z", "C", "1"]]
    return rows


def bench_jsonl():
    return [{"id": "q0", "images": ["a.png"], "question": "Find x.", "options": ["3", "4"], "answer": "B"},
            {"id": "q1", "image": "b.jpg", "question": "Colour?", "answer": "red", "answer_type": "text"}]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    make_byte_tokenizer(str(root))
    return {"root": root, "tok": Tokenizer(str(root)), "improc": ImageProcessor(max_pixels=112 * 112),
            "png": image_bytes("PNG", 1), "jpg": image_bytes("JPEG", 2)}


def check_refusal(e, path, what):
    assert str(path) in str(e), f"{what}: the message does not name {path}: {e}"


def run_sft(env, path, outcomes, what, check_images="header"):
    try:
        ds = SFTDataset(str(path), env["tok"], env["improc"], max_len=4096, check_images=check_images)
    except DataError as e:
        check_refusal(e, path, what)
        outcomes["refused"] += 1
        return
    for i in range(len(ds)):  # as a data-loader worker does: an undecodable image is returned as a skip
        item = ds[i]
        if "error" in item:
            check_refusal(item["error"], path, what)
            outcomes["skipped"] += 1
        else:
            assert len(item["input_ids"]) == ds.lengths[i], what
            outcomes["ok"] += 1


def run_rl(env, path, outcomes, what):
    try:
        ds = tg.PromptDataset(str(path), env["tok"], env["improc"])
    except DataError as e:
        check_refusal(e, path, what)
        outcomes["refused"] += 1
        return
    for i in range(len(ds)):
        try:
            ds[i]
            outcomes["ok"] += 1
        except DataError as e:  # the loop skips (--skip-bad) or stops on it
            check_refusal(e, path, what)
            outcomes["skipped"] += 1


def run_bench(path, outcomes, what):
    try:
        records = benchmarks.read_benchmark(path)
    except ValueError as e:  # the readers' refusal (DataError is one too)
        check_refusal(e, path, what)
        outcomes["refused"] += 1
        return
    for rec in records:
        try:  # what evaluate_benchmark does with a record's images; it catches exactly these
            benchmarks.load_images(rec)
            outcomes["ok"] += 1
        except benchmarks.IMAGE_ERRORS:
            outcomes["skipped"] += 1


def test_fuzz_readers(env, tmp_path):
    rng = random.Random(SEED)
    kinds = ("sft_line", "sft_field", "rl_field", "tsv_bytes", "tsv_cells", "bench_jsonl", "image")
    per_kind = {k: {"ok": 0, "refused": 0, "skipped": 0} for k in kinds}
    n_cases = 0
    t0 = time.time()
    for case in range(N_CASES):
        d = tmp_path / f"c{case}"
        d.mkdir()
        png, jpg = env["png"], env["jpg"]
        kind = kinds[case % len(kinds)]
        outcomes = per_kind[kind]
        what = f"case {case} ({kind})"
        if kind == "image":  # a damaged image in every reader
            fmt = rng.choice(["png", "jpg"])
            data = damage_image(png if fmt == "png" else jpg, rng)
            (d / "a.png").write_bytes(data if fmt == "png" else png)
            (d / "b.jpg").write_bytes(data if fmt == "jpg" else jpg)
            what += f" {fmt}"
            try:
                load_image(str(d / ("a.png" if fmt == "png" else "b.jpg")))
                outcomes["ok"] += 1
            except ValueError as e:
                check_refusal(e, d, what)
                outcomes["refused"] += 1
            recs = sft_records()[:2]
            (d / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
            run_sft(env, d / "sft.jsonl", outcomes, what)
            run_sft(env, d / "sft.jsonl", outcomes, what + " full", check_images="full")
            (d / "rl.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rl_records()))
            run_rl(env, d / "rl.jsonl", outcomes, what)
            (d / "bench.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bench_jsonl()))
            run_bench(d / "bench.jsonl", outcomes, what)
            rows = bench_tsv([data if fmt == "png" else png, data if fmt == "jpg" else jpg])
            (d / "Bench.tsv").write_text("\n".join("\t".join(r) for r in rows) + "\n")
            run_bench(d / "Bench.tsv", outcomes, what + " tsv")
        else:
            (d / "a.png").write_bytes(png)
            (d / "b.jpg").write_bytes(jpg)
        if kind == "sft_line":  # damaged bytes of one jsonl line among good ones
            lines = [json.dumps(r, ensure_ascii=False).encode() for r in sft_records()]
            k = rng.randrange(len(lines))
            lines[k] = damage_bytes(lines[k], rng).replace(b"\n", b" ")
            (d / "sft.jsonl").write_bytes(b"\n".join(lines) + b"\n")
            run_sft(env, d / "sft.jsonl", outcomes, what)
        elif kind == "sft_field":
            recs = sft_records()
            k = rng.randrange(len(recs))
            recs[k] = damage_record(recs[k], rng)
            (d / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
            run_sft(env, d / "sft.jsonl", outcomes, what)
        elif kind == "rl_field":
            recs = rl_records()
            k = rng.randrange(len(recs))
            recs[k] = damage_record(recs[k], rng) if rng.random() < 0.7 else recs[k]
            text = "".join(json.dumps(r) + "\n" for r in recs).encode()
            if rng.random() < 0.3:
                text = flip_bytes(text, rng)
            (d / "rl.jsonl").write_bytes(text)
            run_rl(env, d / "rl.jsonl", outcomes, what)
        elif kind == "tsv_bytes":
            rows = bench_tsv([png, jpg])
            data = ("\n".join("\t".join(r) for r in rows) + "\n").encode()
            x = rng.random()
            data = flip_bytes(data, rng, 1) if x < 0.5 else cut(data, rng) if x < 0.75 else flip_bytes(data, rng, 20)
            (d / "Bench.tsv").write_bytes(data)
            run_bench(d / "Bench.tsv", outcomes, what)
        elif kind == "tsv_cells":  # a deleted cell (the row shifts left) or a deleted column
            rows = bench_tsv([png, jpg])
            if rng.random() < 0.5:
                r = rng.randrange(len(rows))
                del rows[r][rng.randrange(len(rows[r]))]
            else:
                c = rng.randrange(len(rows[0]))
                rows = [row[:c] + row[c + 1:] for row in rows]
            (d / "Bench.tsv").write_text("\n".join("\t".join(r) for r in rows) + "\n")
            run_bench(d / "Bench.tsv", outcomes, what)
        elif kind == "bench_jsonl":
            recs = bench_jsonl()
            k = rng.randrange(len(recs))
            recs[k] = damage_record(recs[k], rng)
            text = "".join(json.dumps(r) + "\n" for r in recs).encode()
            if rng.random() < 0.3:
                text = damage_bytes(text, rng)
            (d / "bench.jsonl").write_bytes(text)
            run_bench(d / "bench.jsonl", outcomes, what)
        n_cases += 1
    elapsed = time.time() - t0
    assert n_cases == N_CASES and elapsed < 60, elapsed
    # every kind of damage was refused in some cases and read in others (a damage that never bites,
    # or always does, would prove little); damaged images were also skipped at decoding
    for kind, counts in per_kind.items():
        assert counts["refused"] > 0 and counts["ok"] > 0, (kind, counts)
    assert per_kind["image"]["skipped"] > 0, per_kind
