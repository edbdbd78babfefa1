"""Benchmark evaluation for the Qwen2.5-VL / AVAR models: read benchmarks, grade answers.

Answers are graded by grading.py (extract_answer, grade, format_ok; its docstring has the rules).
This top part is model-independent and is shared with training (the SFT and GRPO prompts):

  read_benchmark(path)        a VLMEvalKit .tsv or the project's .jsonl -> list of records.
  load_images(record)         decode a record's images (kept as sources until needed).
  build_prompt(record)        the user-turn text in the training format.

Records (one dict per question):
  id           str, unique in the file
  images       list of image sources: a str is base64-encoded image bytes (VLMEvalKit TSV), a
               pathlib.Path is a file, bytes are an encoded image (inline training images), a
               PIL.Image.Image is used as is. load_images() decodes them (data.load_image);
               the readers already checked that each one decodes.
  question     str (a TSV "hint" is prepended as "Hint: ...")
  options      list[str], option A first; empty when the question is not multiple choice
  answer       str, the gold answer; None in a test split without answers (predicted, not scored)
  answer_type  one of ANSWER_TYPES, or None (grade() then infers it)
  benchmark    the file's stem, e.g. "MathVista_MINI"
  and, from a TSV only where its columns give them:
  precision    int, decimals a float answer is graded to (MathVista)
  unit         str, the answer's unit, removed from predictions (MathVista)
  groups       {column: [values]} from the GROUP_COLUMNS (category, l2-category, task, skills,
               problem_version)
  options_in_question  True when the question text already lists the options (MathVista,
               MathVerse): build_prompt then does not repeat them

Inputs:
  VLMEvalKit TSV: columns index, question, answer, and image (base64; or a python/JSON list of
    base64 strings; or, when 64 characters or fewer, the index of another row holding the image)
    or image_path (paths relative to the TSV's folder); options in columns A, B, C, ...; optional
    hint, answer_type, question_type. Rows with no image are dropped, as VLMEvalKit drops them.
    MathVista_MINI: options only in `choices` (a python-literal list, read with ast.literal_eval),
    the answer as option text and `answer_option` its letter (graded, as VLMEvalKit does),
    question_type "multi_choice" / "free_form", answer_type integer / float / text / list,
    `precision`, `unit`, `task` and `skills` (a list literal). MathVerse: question_type
    "multi-choice" with the options in the question after a "Choices:" line ("A:2"), answer the
    letter. A test split (MMBench_TEST) with no answer column, or an empty one on every row: all
    rows are predicted, none scored; answers missing on only some rows is an error.
  jsonl, one JSON object per line (blank lines skipped):
    {"id": "geo-17", "images": ["img/17.png"], "question": "Find x.", "options": ["3", "4"],
     "answer": "B", "answer_type": "multi_choice"}
    images: paths relative to the jsonl's folder ("image": "img/17.png" is also accepted);
    options and answer_type are optional.
  Bad input raises ValueError naming the file and the row (TSV: data rows counted from 1 after
  the header) or line (jsonl).

The evaluation loop (batched generation, VAS, sweeps) follows the marker further down. Run:

    python evaluate.py --model DIR --bench MathVista_MINI.tsv my.jsonl --out results/
    python evaluate.py --model DIR --bench b.tsv --out sweep/ --a-img 0 0.15 --a-sys 0 0.05 0.4
    python evaluate.py --correlate ckpt1/predictions/*.jsonl ckpt2/predictions/*.jsonl --out corr/
"""

import ast
import base64
import csv
import io
import json
import math
import re
import sys
from pathlib import Path

from PIL import Image

from data import build_prompt, prompt_content  # the prompt format, re-exported
from grading import ANSWER_TYPES, extract_answer, format_ok, grade, same_value  # format_ok: re-exported

# ---- benchmark readers ----

# What PIL raises on bad image data (an image over its pixel limit raises DecompressionBombError,
# which is not an OSError).
IMAGE_ERRORS = (ValueError, OSError, SyntaxError, Image.DecompressionBombError)


def _check_image(data: bytes | Path) -> None:
    """Raise unless the bytes or file are an image PIL can open. verify() reads headers and
    checksums without decoding pixels, so checking a whole benchmark stays cheap."""
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
        im.verify()


def _b64_bytes(text: str) -> bytes:
    return base64.b64decode("".join(text.split()), validate=True)


def _open_rgb(src) -> Image.Image:
    """One image source -> RGB exactly as transformers' processor sees it (data.load_image:
    transparency composited on white)."""
    from data import load_image

    if isinstance(src, str):  # base64 (VLMEvalKit TSV)
        src = _b64_bytes(src)
    return load_image(src)


def load_images(record: dict) -> list[Image.Image]:
    """Decode a record's images as RGB PIL images (what the processor expects)."""
    return [_open_rgb(src) for src in record["images"]]


def _check_file(p: Path, where: str) -> None:
    if not p.is_file():
        raise ValueError(f"{where}: image file {str(p)!r} does not exist")
    try:
        _check_image(p)
    except IMAGE_ERRORS as e:
        raise ValueError(f"{where}: {str(p)!r} is not an image ({e})") from None


def _present(cell: str | None) -> bool:
    """A TSV cell with content (pandas writes missing values as "" or "nan")."""
    return cell is not None and cell.strip() != "" and cell.strip().lower() != "nan"


def _cell_list(cell: str) -> list[str]:
    """A TSV cell holding one string or a list of strings (JSON or python repr: ['a', 'b'])."""
    cell = cell.strip()
    if not cell.startswith("["):
        return [cell]
    try:
        items = json.loads(cell)
    except json.JSONDecodeError:
        # python repr of a list of base64 strings or paths: quoted items, no quotes inside
        items = re.findall(r"'([^']*)'|\"([^\"]*)\"", cell)
        items = [a or b for a, b in items]
    if not isinstance(items, list) or not items or not all(isinstance(x, str) for x in items):
        raise ValueError("expected a list of strings")
    return items


def _answer_type(options: list, answer_type: str | None, question_type: str | None) -> str | None:
    """The record's answer type from the file's columns; None when they state none we know.
    question_type is "multi_choice" in MathVista, "multi-choice" in MathVerse."""
    if options or question_type.replace("-", "_") == "multi_choice":
        return "multi_choice"
    return answer_type if answer_type in ANSWER_TYPES else None


def _literal_list(cell: str) -> list | None:
    """A python-literal list cell (MathVista's choices and skills: "['3/11', '8/11']"), read with
    ast.literal_eval (never eval); None when the cell is not one."""
    try:
        value = ast.literal_eval(cell.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else None


_TEXT_OPTION = re.compile(r"\(?([A-Z])\)?\s*[:.)]?\s*(.+)")


def _options_in_text(question: str) -> list[str]:
    """The options a question lists after its "Choices:" line (MathVerse: "A:2", MathVista:
    "(A) 2"), option A first and consecutive; [] when it lists none."""
    m = re.search(r"(?im)^\s*choices\s*:?\s*$", question)
    if m is None:
        return []
    options = []
    for line in question[m.end():].strip().splitlines():
        hit = _TEXT_OPTION.fullmatch(line.strip())
        if hit is None or hit.group(1) != chr(65 + len(options)):
            break
        options.append(hit.group(2).strip())
    return options


# Columns whose values group the accuracy in the summary: MMBench's category / l2-category,
# MathVista's task and skills (a list literal: a question counts in each of its skills), MathVerse's
# problem_version (the split VLMEvalKit's MathVerse score lists).
GROUP_COLUMNS = ("category", "l2-category", "task", "skills", "problem_version")


def _set_csv_field_limit() -> None:
    # base64 images are far longer than csv's default 128 KiB field limit
    limit = sys.maxsize
    while True:
        try:
            csv.field_size_limit(limit)
            return
        except OverflowError:  # C long is 32 bits on some platforms
            limit //= 10


def read_tsv(path: str | Path) -> list[dict]:
    """Read a VLMEvalKit benchmark TSV (format in the module docstring)."""
    path = Path(path)
    _set_csv_field_limit()
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, delimiter="\t")
        header = reader.fieldnames
        if not header:
            raise ValueError(f"{path}: empty file")
        rows = list(reader)
    missing = [c for c in ("index", "question") if c not in header]
    if "image" not in header and "image_path" not in header:
        missing.append("image")
    if missing:
        raise ValueError(f"{path}: missing required column(s) {missing}")
    if not rows:
        raise ValueError(f"{path}: no rows")
    letters = [chr(65 + i) for i in range(26) if chr(65 + i) in header]
    # A test split (MMBench_TEST) has no answers: no answer column, or an empty one. Its rows are
    # predicted and left unscored. A file with some answers missing is an error instead.
    scored = "answer" in header and any(_present(r.get("answer")) for r in rows)

    # VLMEvalKit saves space by writing, in place of a repeated image, the index of a row that
    # holds it; a real base64 image is always longer than 64 characters.
    by_index = {(r.get("index") or "").strip(): r.get("image") or "" for r in rows}
    checked = set()  # image cells already decoded once (shared by referring rows)
    records, seen = [], set()
    for n, row in enumerate(rows, 1):
        where = f"{path}: row {n} (index {row.get('index')!r})"
        for col in ("index", "question") + (("answer",) if scored else ()):
            if not _present(row.get(col)):
                raise ValueError(f"{where}: empty {col!r}")
        idx = row["index"].strip()
        if idx in seen:
            raise ValueError(f"{where}: duplicate index")
        seen.add(idx)

        cell = (row.get("image") or "").strip()
        if _present(cell):
            key = idx
            if len(cell) <= 64:
                key, cell = cell, by_index.get(cell, "").strip()
                if len(cell) <= 64:
                    raise ValueError(f"{where}: image refers to index {key!r}, which holds no image")
            try:
                images = _cell_list(cell)
            except ValueError:
                raise ValueError(f"{where}: image cell is not base64 nor a list of base64 strings") from None
            for b64 in images if key not in checked else []:
                try:
                    data = _b64_bytes(b64)
                except ValueError:
                    raise ValueError(f"{where}: image is not valid base64") from None
                try:
                    _check_image(data)
                except IMAGE_ERRORS as e:
                    raise ValueError(f"{where}: image bytes are not an image ({type(e).__name__})") from None
            checked.add(key)
        elif _present(row.get("image_path")):
            try:
                images = [path.parent / p for p in _cell_list(row["image_path"])]
            except ValueError as e:
                raise ValueError(f"{where}: bad image_path ({e})") from None
            for p in images:
                _check_file(p, where)
        else:
            continue  # no image: VLMEvalKit drops such rows too

        filled = [c for c in letters if _present(row[c])]
        if filled != letters[:len(filled)]:  # a gap (A, B, D) would silently re-letter D as C
            raise ValueError(f"{where}: option columns are not consecutive from A")
        options = [row[c].strip() for c in filled]
        question = row["question"].strip()
        question_type = (row.get("question_type") or "").strip()
        extra = {}
        if not options and _present(row.get("choices")) and row["choices"].strip() != "None":
            # MathVista: multiple-choice options only in `choices`, a list literal
            options = _literal_list(row["choices"])  # None: not a list
            if options is None:
                raise ValueError(f"{where}: choices {row['choices'][:80]!r} is not a list literal")
        if not options and question_type.replace("-", "_") == "multi_choice":
            options = _options_in_text(question)  # MathVerse: options inside the question
            extra["options_in_question"] = bool(options)
        elif options and not filled:
            # MathVista's question already lists its choices: the prompt must not repeat them.
            extra["options_in_question"] = bool(re.search(r"(?im)^\s*choices\s*:", question))
        if not extra.get("options_in_question"):
            extra.pop("options_in_question", None)
        if _present(row.get("hint")):
            question = f"Hint: {row['hint'].strip()}\n{question}"
        answer = row["answer"].strip() if scored else None
        letter = (row.get("answer_option") or "").strip()
        if answer is not None and re.fullmatch(r"[A-Z]", letter):
            # MathVista: answer is the option's text, answer_option its letter; VLMEvalKit grades
            # the letter (two options may share a text).
            if ord(letter) - 65 >= len(options):
                raise ValueError(f"{where}: answer_option {letter!r} but {len(options)} options")
            if not same_value(options[ord(letter) - 65], answer):  # a misaligned row
                raise ValueError(f"{where}: answer {answer!r} is not option {letter} "
                                 f"({options[ord(letter) - 65]!r})")
            answer = letter
        if _present(row.get("precision")):
            try:
                extra["precision"] = int(float(row["precision"]))
            except ValueError:
                raise ValueError(f"{where}: precision {row['precision']!r} is not a number") from None
        if _present(row.get("unit")):
            extra["unit"] = row["unit"].strip()
        groups = {}
        for col in GROUP_COLUMNS:
            if _present(row.get(col)):
                cell = row[col].strip()
                groups[col] = (_literal_list(cell) or [cell]) if cell.startswith("[") else [cell]
        if groups:
            extra["groups"] = groups
        records.append(dict(
            id=idx, images=images, question=question, options=options, answer=answer,
            answer_type=_answer_type(options, (row.get("answer_type") or "").strip(), question_type),
            benchmark=path.stem, **extra))
    return records


def read_jsonl(path: str | Path) -> list[dict]:
    """Read the project's benchmark jsonl (format in the module docstring)."""
    path = Path(path)
    records, seen = [], set()
    with open(path, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}: line {n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: expected a JSON object")
            for key in ("id", "question", "answer"):
                if obj.get(key) is None or str(obj[key]).strip() == "":
                    raise ValueError(f"{where}: missing field {key!r}")
            if "images" in obj:
                paths = obj["images"]
            elif "image" in obj:
                paths = [obj["image"]]
            else:
                raise ValueError(f"{where}: missing field 'images'")
            if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
                raise ValueError(f"{where}: 'images' must be a list of paths")
            images = [path.parent / p for p in paths]  # an absolute p stays absolute
            for p in images:
                _check_file(p, where)
            options = obj.get("options") or []
            if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
                raise ValueError(f"{where}: 'options' must be a list of strings")
            answer_type = obj.get("answer_type")
            if answer_type is not None and answer_type not in ANSWER_TYPES:
                raise ValueError(f"{where}: answer_type {answer_type!r} not in {ANSWER_TYPES}")
            rid = str(obj["id"])
            if rid in seen:
                raise ValueError(f"{where}: duplicate id {rid!r}")
            seen.add(rid)
            records.append(dict(
                id=rid, images=images, question=str(obj["question"]).strip(), options=options,
                answer=str(obj["answer"]).strip(),
                answer_type=answer_type or ("multi_choice" if options else None),
                benchmark=path.stem))
    if not records:
        raise ValueError(f"{path}: empty file")
    return records


def read_benchmark(path: str | Path) -> list[dict]:
    """Read a benchmark file, by extension: .tsv (VLMEvalKit) or .jsonl (this project)."""
    suffix = Path(path).suffix.lower()
    try:
        if suffix == ".tsv":
            return read_tsv(path)
        if suffix == ".jsonl":
            return read_jsonl(path)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason})") from None
    raise ValueError(f"{path}: unknown benchmark format {suffix!r} (expected .tsv or .jsonl)")


# ---- evaluation loop ----
#
# Batched generation over benchmark records, one predictions jsonl per (benchmark, setting):
#
#   evaluate_benchmark(model, tok, proc, records, out_path, setting=Setting(), ...) -> summary row
#   evaluate(model, tok, proc, bench_paths, out_dir, settings, ...)  -> rows; writes summary.md/.json
#   correlate(paths) -> {"r", "p", "n", "files"}: Pearson r between mean VAS and accuracy
#
# Run:
#   python evaluate.py --model DIR --bench MathVista_MINI.tsv geo.jsonl --out results/
#   python evaluate.py --model DIR --bench MathVista_MINI.tsv --out sweep/ --a-img 0.15 --a-sys 0 0.05 0.4
#   python evaluate.py --correlate ckpt1/predictions/X__base.jsonl ckpt2/predictions/X__base.jsonl
#
# Predictions file out/predictions/<benchmark>__<setting>.jsonl, one line per question:
#   {"id", "benchmark", "setting": {a_img, a_sys, layers}, "config": {max_new_tokens, temperature,
#    top_p, seed, min_pixels, max_pixels, vas, vas_layers}, "answer" (gold), "answer_type", "response",
#    "extracted", "correct", "stopped" (ended on a stop token rather than at max_new_tokens),
#    "new_tokens", "prompt_tokens", "vas", "vas_per_layer" (VAS of each layer in "vas_layers"),
#    and "groups" (the record's category / task / skills) where the benchmark has them}
# VAS is null for a prompt it does not count (no image or no system turn); "answer" and "correct"
# are null on a test split without answers (predicted, not scored).
# Beside it, <benchmark>__<setting>.tsv: the VLMEvalKit-style table (index, question, answer,
# prediction, hit, extracted), rewritten when the benchmark is done.
# Lines are appended and flushed batch by batch. A rerun with the same arguments skips the ids
# already in the file; the half-written last line a crash may leave is cut off and redone. A file
# written with another setting or config is refused rather than mixed.
#
# Bands of the paper (VAS): "narrow" < 10 <= "wide" <= 15 < "panoramic".

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import os  # noqa: E402

import torch  # noqa: E402

from data import PAD_ROLE, DataError, ImageProcessor, Tokenizer, encode_chat  # noqa: E402
from data import UserError, run_cli  # noqa: E402
from model import from_pretrained, resolve_checkpoint  # noqa: E402
from vas import Intervention, measure_vas, parse_layers  # noqa: E402
from vas import vas as vas_of_stats  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Setting:
    """The training-free intervention (method section 3): logits to image keys times (1 + a_img),
    to system keys times (1 - a_sys), in `layers` (None: all). a_img = a_sys = 0 is the model as is."""
    a_img: float = 0.0
    a_sys: float = 0.0
    layers: tuple[int, ...] | None = None

    @property
    def active(self) -> bool:
        return self.a_img != 0 or self.a_sys != 0

    @property
    def tag(self) -> str:
        """File-name tag: "base", or e.g. "aimg0.15_asys0.05" (+ "_L0-1-2" for chosen layers)."""
        if not self.active:
            return "base"
        tag = f"aimg{self.a_img:g}_asys{self.a_sys:g}"
        return tag + ("_L" + "-".join(map(str, self.layers)) if self.layers is not None else "")

    def to_dict(self) -> dict:
        return {"a_img": self.a_img, "a_sys": self.a_sys,
                "layers": list(self.layers) if self.layers is not None else None}


def vas_band(vas: float | None) -> str:
    if vas is None or not math.isfinite(vas):
        return "-"
    return "narrow" if vas < 10 else "wide" if vas <= 15 else "panoramic"


def encode_record(tok: Tokenizer, proc: ImageProcessor, record: dict) -> dict:
    """One question in the training format: default system turn, then a user turn holding the
    record's images followed by build_prompt(record), then the assistant header.
    Returns input_ids (T,), roles (T,), pixel_values (N, 1176) or None, image_grid_thw (n, 3) or None."""
    images = load_images(record)
    names = [f"{record.get('benchmark')}: id {record['id']}: image {i}" for i in range(len(images))]
    pixel_values, grid = proc(images, names) if images else (None, None)
    n_tokens = [int(g.prod()) // proc.merge ** 2 for g in grid] if grid is not None else []
    enc = encode_chat(tok, [{"role": "user", "content": prompt_content(record)}], n_tokens, add_generation_prompt=True)
    return {"input_ids": enc["input_ids"], "roles": enc["roles"], "pixel_values": pixel_values,
            "image_grid_thw": grid}


def _concat_images(encs: list[dict]):
    pv = [e["pixel_values"] for e in encs if e["pixel_values"] is not None]
    grids = [e["image_grid_thw"] for e in encs if e["image_grid_thw"] is not None]
    return (torch.cat(pv), torch.cat(grids)) if pv else (None, None)


# ---- VAS and the intervention (vas.py) ----

def _ctl_factory(encs: list[dict], setting: Setting):
    """attn_ctl_factory for model.generate: the intervention over the left-padded prompt keys (roles
    from encode_chat) and the generated keys (RESPONSE)."""
    return Intervention.for_generation([e["roles"] for e in encs], setting.a_img, setting.a_sys, setting.layers)


def _nan_to_none(x: float):
    return None if x != x else float(x)


def _measure_vas(model, encs: list[dict], setting: Setting, layers=None) -> list[tuple]:
    """(VAS, per-layer VAS list, layer ids) of each prompt, by vas.measure_vas in one no-grad
    forward over the right-padded batch, user-turn queries (Q = U + V), under the same intervention as
    generation. (None, None, None) for a prompt that VAS does not count (no image or no system turn)."""
    dev = next(model.parameters()).device
    B, T = len(encs), max(len(e["input_ids"]) for e in encs)
    ids = torch.zeros(B, T, dtype=torch.long)  # the pad id is never read: attention_mask is 0 there
    mask = torch.zeros(B, T, dtype=torch.long)
    roles = torch.full((B, T), PAD_ROLE, dtype=torch.long)
    for b, e in enumerate(encs):
        n = len(e["input_ids"])
        ids[b, :n], roles[b, :n], mask[b, :n] = e["input_ids"], e["roles"], 1
    pv, grids = _concat_images(encs)
    batch = {"input_ids": ids.to(dev), "attention_mask": mask.to(dev), "roles": roles.to(dev),
             "pixel_values": pv.to(dev) if pv is not None else None,
             "image_grid_thw": grids.to(dev) if grids is not None else None}
    interv = Intervention(batch["roles"], setting.a_img, setting.a_sys, setting.layers) if setting.active else None
    res = measure_vas(model, batch, "user", layers, interv)
    # per sample and layer: VAS restricted to one recorded layer (vas.vas on the same masses)
    per_layer = torch.stack([vas_of_stats(res.stats, layers=[l]).per_sample for l in res.layers], 1)  # (B, L)
    out = []
    for b in range(B):
        if not bool(res.counted[b]):
            out.append((None, None, None))
        else:
            out.append((_nan_to_none(float(res.per_sample[b])), [_nan_to_none(float(v)) for v in per_layer[b]],
                        list(res.layers)))
    return out


# ---- the predictions file ----

def read_predictions(path: str | Path, repair: bool = False) -> list[dict]:
    """The records of a predictions jsonl. A last line that is cut short (no newline, or not valid
    JSON: a crash during the write) is ignored, and with `repair` removed from the file so that
    appending can continue. A bad line anywhere else raises ValueError naming file and line."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    good_end, preds = 0, []  # byte offset just after the last good line
    offset = 0
    for n, line in enumerate(lines, 1):
        last = n == len(lines) or (n == len(lines) - 1 and lines[-1] == b"")
        end = offset + len(line) + (1 if n < len(lines) else 0)
        if line.strip():
            try:
                obj = json.loads(line.decode("utf-8"))
                if not isinstance(obj, dict) or "id" not in obj:
                    raise ValueError("not a prediction record")
                if n == len(lines):  # complete JSON but no newline: the write may have stopped there
                    raise ValueError("no newline")
            except (ValueError, UnicodeDecodeError) as e:
                if not last:
                    raise ValueError(f"{path}: line {n}: bad prediction record ({e})") from None
                break
            preds.append(obj)
        good_end = end
        offset = end
    if repair and good_end < len(data):
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return preds


def _check_same_run(path, pred: dict, setting: dict, config: dict) -> None:
    for key, want in (("setting", setting), ("config", config)):
        if pred.get(key) != want:
            raise ValueError(f"{path}: id {pred.get('id')!r} was made with {key} {pred.get(key)}, this run "
                             f"uses {want}: choose another output folder (or delete the file)")


# ---- the evaluation loop ----

def evaluate_benchmark(model, tok: Tokenizer, proc: ImageProcessor, records: list[dict], out_path: str | Path, *,
                       setting: Setting = Setting(), batch_size: int = 8, max_new_tokens: int = 512,
                       temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, vas: bool = True,
                       vas_layers=None, progress: bool = True, on_batch=None, compile: bool = False,
                       skip_bad: bool = False) -> dict:
    """Answer `records` (one benchmark) with `model` and grade them; returns the summary row.

    Predictions go to `out_path` (a jsonl, appended batch by batch; ids already there are skipped).
    Each batch: encode the prompts, generate (KV cache, intervention `setting` in every decode step),
    grade, and measure VAS on the prompts (user-turn queries, the same intervention) unless `vas` is
    False. Sampling (temperature > 0) draws from seed + the batch's first record index, so a resumed
    run repeats the batches it had not finished. on_batch(preds) is called after each batch is written.

    A question whose image passed the reader's check but does not decode (a truncated file) stops
    the run with DataError naming it (the predictions written so far are kept, a rerun continues);
    with skip_bad it is left out, logged and counted in the row's "skipped" (a rerun tries it again).
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    gen_kw = {"compile": True} if compile else {}  # model.generate's compiled decode step (GPU)
    config = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "seed": seed,
              "min_pixels": proc.min_pixels, "max_pixels": proc.max_pixels, "vas": vas,
              "vas_layers": sorted(int(l) for l in vas_layers) if vas_layers is not None else None}
    ids = [r["id"] for r in records]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{out_path}: the records repeat ids")
    done = {}
    for p in read_predictions(out_path, repair=True):
        _check_same_run(out_path, p, setting.to_dict(), config)
        done[p["id"]] = p
    todo = [(i, r) for i, r in enumerate(records) if r["id"] not in done]
    bar = None
    if progress:
        from tqdm import tqdm
        name = records[0].get("benchmark", out_path.stem) if records else out_path.stem
        bar = tqdm(total=len(records), initial=len(records) - len(todo), desc=f"{name} [{setting.tag}]",
                   unit="q", dynamic_ncols=True)
    stop_ids = list(tok.stop_ids)
    skipped = []
    with open(out_path, "a", encoding="utf-8") as f:
        for start in range(0, len(todo), batch_size):
            chunk, encs = [], []
            for i, rec in todo[start:start + batch_size]:
                try:
                    encs.append(encode_record(tok, proc, rec))
                    chunk.append((i, rec))
                except IMAGE_ERRORS as e:
                    files = ", ".join(str(p) for p in rec["images"] if isinstance(p, Path)) or "base64 cell"
                    err = f"{rec.get('benchmark')}: id {rec['id']!r}: cannot decode image ({files}): {e}"
                    if not skip_bad:
                        raise DataError(f"{err}; the predictions so far are kept in {out_path} (a rerun "
                                        f"continues; --skip-bad skips such questions)") from None
                    skipped.append(rec["id"])
                    (bar.write if bar is not None else print)(f"skipped (--skip-bad): {err}")
                    if bar is not None:
                        bar.update(1)
            if not chunk:
                continue
            pixel_values, grids = _concat_images(encs)
            dev = next(model.parameters()).device
            if pixel_values is not None:
                pixel_values, grids = pixel_values.to(dev), grids.to(dev)
            tokens, lengths = model.generate(
                [e["input_ids"] for e in encs], pixel_values, grids, max_new_tokens=max_new_tokens,
                temperature=temperature, top_p=top_p, seed=seed + chunk[0][0], stop_ids=stop_ids,
                pad_id=tok.pad_id, vocab_limit=tok.vocab_size,
                attn_ctl_factory=_ctl_factory(encs, setting) if setting.active else None, **gen_kw)
            tokens, lengths = tokens.cpu(), lengths.cpu()
            vas_values = _measure_vas(model, encs, setting, vas_layers) if vas else [(None, None, None)] * len(encs)
            preds = []
            for (_, rec), enc, row, n, (v, v_layers, v_ids) in zip(chunk, encs, tokens, lengths.tolist(), vas_values):
                out = row[:n].tolist()
                response = tok.decode_response(out)
                extracted = extract_answer(response)
                correct = None  # a test split without answers: predicted, not scored
                if rec["answer"] is not None:
                    correct = grade(extracted, rec["answer"], rec.get("options"), rec.get("answer_type"),
                                    precision=rec.get("precision"), unit=rec.get("unit"))
                preds.append({
                    "id": rec["id"], "benchmark": rec.get("benchmark"), "setting": setting.to_dict(),
                    "config": config, "answer": rec["answer"], "answer_type": rec.get("answer_type"),
                    "response": response, "extracted": extracted, "correct": correct,
                    "stopped": bool(out) and out[-1] in stop_ids, "new_tokens": n,
                    "prompt_tokens": len(enc["input_ids"]), "vas": v,
                    "vas_per_layer": v_layers, "vas_layers": v_ids,
                    **({"groups": rec["groups"]} if rec.get("groups") else {})})
            # one write per batch, then flush: a crash leaves whole batches plus at most a cut line
            f.write("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in preds))
            f.flush()
            os.fsync(f.fileno())
            done.update((p["id"], p) for p in preds)
            if bar is not None:
                bar.update(len(preds))
            if on_batch is not None:
                on_batch(preds)
    if bar is not None:
        bar.close()
    kept = [r for r in records if r["id"] in done]  # a question skipped under skip_bad has no prediction
    write_prediction_table(kept, [done[r["id"]] for r in kept], out_path.with_suffix(".tsv"))
    row = summarize([done[r["id"]] for r in kept])
    row.update(benchmark=records[0].get("benchmark") if records else out_path.stem, setting=setting.tag,
               predictions=str(out_path), skipped=len(skipped))
    return row


def write_prediction_table(records: list[dict], preds: list[dict], path: str | Path) -> None:
    """The predictions as VLMEvalKit writes them beside its results: a TSV with columns index,
    question, answer, prediction (the whole response), hit (1 or 0; empty when unscored), plus our
    extracted answer. Cells with tabs, newlines or quotes are quoted as pandas.to_csv quotes them."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(["index", "question", "answer", "prediction", "hit", "extracted"])
        for rec, p in zip(records, preds):
            hit = "" if p.get("correct") is None else int(p["correct"])
            w.writerow([rec["id"], rec["question"], "" if rec["answer"] is None else rec["answer"],
                        p["response"], hit, "" if p["extracted"] is None else p["extracted"]])


def _accuracy(preds: list[dict]) -> float | None:
    scored = [p["correct"] for p in preds if p.get("correct") is not None]
    return 100.0 * sum(map(bool, scored)) / len(scored) if scored else None


def summarize(preds: list[dict]) -> dict:
    """n, accuracy (%, over the scored predictions; None when none is: a test split without
    answers), unscored, mean VAS (over the predictions that have one) and its band, and, where the
    benchmark has group columns (GROUP_COLUMNS), "groups": {column: {value: {"n", "accuracy"}}}."""
    n = len(preds)
    vas = [p["vas"] for p in preds if p.get("vas") is not None]
    mean_vas = sum(vas) / len(vas) if vas else None
    row = {"n": n, "accuracy": _accuracy(preds), "unscored": sum(p.get("correct") is None for p in preds),
           "mean_vas": mean_vas, "band": vas_band(mean_vas),
           "no_answer": sum(p.get("extracted") is None for p in preds)}
    members = {}  # column -> value -> predictions
    for p in preds:
        for col, values in (p.get("groups") or {}).items():
            for v in dict.fromkeys(values):
                members.setdefault(col, {}).setdefault(v, []).append(p)
    if members:
        row["groups"] = {col: {v: {"n": len(ps), "accuracy": _accuracy(ps)} for v, ps in sorted(by.items())}
                         for col, by in members.items()}
    return row


def evaluate(model, tok: Tokenizer, proc: ImageProcessor, benchmarks, out_dir: str | Path,
             settings=(Setting(),), limit: int | None = None, **kw) -> list[dict]:
    """Every benchmark under every intervention setting (a sweep: one predictions file each); writes
    out_dir/summary.md and out_dir/summary.json and returns the rows. `kw` goes to evaluate_benchmark.
    benchmarks: file paths, or record lists already read by read_benchmark. All files are read (and
    so checked) before the first generation."""
    out_dir = Path(out_dir)
    benches = []
    for bench in benchmarks:
        records = bench if isinstance(bench, list) else read_benchmark(bench)
        if not records:
            raise UserError(f"{bench if not isinstance(bench, list) else 'a benchmark record list'}: no questions")
        name = records[0]["benchmark"]
        if name in [b[0] for b in benches]:
            raise UserError(f"{bench if not isinstance(bench, list) else name}: a second benchmark named "
                             f"{name!r} (predictions files are named by the file stem)")
        benches.append((name, records[:limit] if limit is not None else records))
    rows = []
    for setting in settings:
        for name, records in benches:
            rows.append(evaluate_benchmark(model, tok, proc, records,
                                           out_dir / "predictions" / f"{name}__{setting.tag}.jsonl",
                                           setting=setting, **kw))
            rows[-1]["setting_detail"] = setting.to_dict()
            write_summary(rows, out_dir)  # after each file, so an interrupted sweep keeps its table
    return rows


def _fmt(x, digits=2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def summary_table(rows: list[dict]) -> str:
    """Markdown table, one row per (benchmark, setting); with several benchmarks, a "mean" row per
    setting (unweighted mean over benchmarks, as the paper's "avg" column)."""
    lines = ["| benchmark | setting | n | accuracy | mean VAS | band |", "|---|---|---|---|---|---|"]
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    for s in settings:
        group = [r for r in rows if r["setting"] == s]
        for r in group:
            lines.append(f"| {r['benchmark']} | {s} | {r['n']} | {_fmt(r['accuracy'])} | {_fmt(r['mean_vas'])} | {r['band']} |")
        if len(group) > 1:
            acc = [r["accuracy"] for r in group if r["accuracy"] is not None]
            vas = [r["mean_vas"] for r in group if r["mean_vas"] is not None]
            mean_vas = sum(vas) / len(vas) if len(vas) == len(group) else None
            lines.append(f"| mean | {s} | {sum(r['n'] for r in group)} | "
                         f"{_fmt(sum(acc) / len(acc) if len(acc) == len(group) else None)} | "
                         f"{_fmt(mean_vas)} | {vas_band(mean_vas)} |")
    grouped = [r for r in rows if r.get("groups")]
    if grouped:  # accuracy per category / task / skill, as VLMEvalKit's score files list it
        lines += ["", "| benchmark | setting | column | group | n | accuracy |", "|---|---|---|---|---|---|"]
        for r in grouped:
            for col, by in r["groups"].items():
                lines += [f"| {r['benchmark']} | {r['setting']} | {col} | {v} | {g['n']} | "
                          f"{_fmt(g['accuracy'])} |" for v, g in by.items()]
    return "\n".join(lines) + "\n"


def write_summary(rows: list[dict], out_dir: str | Path, config: dict | None = None) -> str:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = summary_table(rows)
    (out_dir / "summary.md").write_text(table, encoding="utf-8")
    summary = {"rows": rows}
    if config is not None:
        summary["config"] = config
    elif (out_dir / "summary.json").exists():  # keep the run's config written by main()
        try:
            summary["config"] = json.loads((out_dir / "summary.json").read_text()).get("config")
        except (ValueError, OSError):
            pass
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return table


# ---- VAS against accuracy ----

def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) by its continued fraction (modified Lentz; Numerical
    Recipes 6.4), using the symmetry I_x(a, b) = 1 - I_{1-x}(b, a) where the fraction converges slowly."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - _betainc(b, a, 1.0 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 500):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return front * f


def pearson(x, y) -> dict:
    """Pearson r = sum (x - mx)(y - my) / sqrt(sum (x - mx)^2 sum (y - my)^2), and the two-sided
    p-value of H0: r = 0 from t = r sqrt((n - 2) / (1 - r^2)) with n - 2 degrees of freedom:
    p = I_{df / (df + t^2)}(df / 2, 1 / 2). r is None when n < 2 or one side is constant; p is None
    when n < 3."""
    import numpy as np

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"pearson: x and y must be 1-D of one length, got {x.shape} and {y.shape}")
    n = len(x)
    if n < 2:
        return {"r": None, "p": None, "n": n}
    dx, dy = x - x.mean(), y - y.mean()
    denom = math.sqrt(float((dx * dx).sum()) * float((dy * dy).sum()))
    if denom == 0.0:
        return {"r": None, "p": None, "n": n}
    r = max(-1.0, min(1.0, float((dx * dy).sum()) / denom))
    return {"r": r, "p": pearson_p(r, n), "n": n}


def pearson_p(r: float, n: int) -> float | None:
    """Two-sided p-value of a Pearson r from n pairs (Student t, n - 2 degrees of freedom)."""
    if n < 3:
        return None
    if abs(r) >= 1.0:
        return 0.0
    df = n - 2
    t2 = r * r * df / (1.0 - r * r)
    return _betainc(df / 2.0, 0.5, df / (df + t2))


def correlate(paths) -> dict:
    """Accuracy and mean VAS of each predictions file (e.g. one per checkpoint), and Pearson r (with p)
    between them across the files. A file with no VAS, or an infinite one (a model that puts no
    attention at all on the system turn), is listed but left out of r."""
    files = []
    for path in paths:
        preds = read_predictions(path)
        if not preds:
            raise ValueError(f"{path}: no predictions")
        row = summarize(preds)
        row["file"] = str(path)
        files.append(row)
    used = [f for f in files if f["mean_vas"] is not None and math.isfinite(f["mean_vas"])
            and f["accuracy"] is not None]
    result = pearson([f["mean_vas"] for f in used], [f["accuracy"] for f in used])
    result["files"] = files
    return result


def correlation_table(result: dict) -> str:
    lines = ["| file | n | accuracy | mean VAS | band |", "|---|---|---|---|---|"]
    for f in result["files"]:
        lines.append(f"| {f['file']} | {f['n']} | {_fmt(f['accuracy'])} | {_fmt(f['mean_vas'])} | {f['band']} |")
    r, p = result["r"], result["p"]
    lines.append("")
    lines.append(f"Pearson r (mean VAS vs accuracy) = {_fmt(r, 4)}, p = {'-' if p is None else f'{p:.3g}'}, "
                 f"n = {result['n']} files")
    return "\n".join(lines) + "\n"


# ---- command line ----

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="Evaluate a Qwen2.5-VL checkpoint on benchmarks (accuracy, VAS, "
                                             "intervention sweeps), or correlate VAS with accuracy.")
    ap.add_argument("--model", help="model folder (config.json, safetensors, tokenizer.json)")
    ap.add_argument("--bench", nargs="+", default=[], help="benchmark files: VLMEvalKit .tsv or .jsonl")
    ap.add_argument("--out", help="output folder: predictions/, summary.md, summary.json")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-pixels", type=int, default=None, help="image processor max_pixels (default: the model's)")
    ap.add_argument("--min-pixels", type=int, default=None)
    ap.add_argument("--limit", type=int, default=None, help="only the first N questions of each benchmark")
    ap.add_argument("--a-img", type=float, nargs="+", default=[0.0], help="intervention: image-key logit gain(s)")
    ap.add_argument("--a-sys", type=float, nargs="+", default=[0.0], help="intervention: system-key logit cut(s)")
    ap.add_argument("--intervention-layers", nargs="+", default=None,
                    help="layers the intervention acts in, e.g. 0-7 or 0 3 5 (default: all)")
    ap.add_argument("--vas-layers", nargs="+", default=None, help="layers averaged in VAS, e.g. 0-7 (default: all)")
    ap.add_argument("--no-vas", action="store_true", help="skip the VAS forward pass")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="default: bfloat16 on GPU, float32 on CPU")
    ap.add_argument("--correlate", nargs="+", default=None, metavar="PREDICTIONS_JSONL",
                    help="instead of evaluating: Pearson r between mean VAS and accuracy across these files")
    ap.add_argument("--compile", action="store_true", help="torch.compile the decode step (worth it on a GPU)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--skip-bad", action="store_true",
                    help="skip (and count) questions whose image fails to decode, instead of stopping")
    args = ap.parse_args(argv)
    if args.correlate is None:
        missing = [f"--{k}" for k in ("model", "bench", "out") if not getattr(args, k)]
        if missing:
            ap.error(f"evaluation needs {' '.join(missing)} (or use --correlate)")
    if args.batch_size < 1 or args.max_new_tokens < 1 or (args.limit is not None and args.limit < 1):
        ap.error("--batch-size, --max-new-tokens and --limit must be positive")
    if not 0.0 < args.top_p <= 1.0 or args.temperature < 0:
        ap.error("--top-p must be in (0, 1] and --temperature >= 0")
    return args


def read_benchmark_file(path: str) -> list[dict]:
    """read_benchmark for the command line: a file that is missing, not UTF-8, empty or not a
    benchmark is a UserError naming it (the readers' messages name the file and row)."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such benchmark file")
    try:
        records = read_benchmark(path)
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except ValueError as e:
        raise UserError(str(e)) from None
    if not records:
        raise UserError(f"{path}: no questions")
    return records


def main(argv=None):
    args = parse_args(argv)
    if args.correlate is not None:
        result = correlate(args.correlate)
        print(correlation_table(result), end="")
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "correlation.json").write_text(json.dumps(result, indent=2) + "\n")
            (Path(args.out) / "correlation.md").write_text(correlation_table(result))
        return result

    config = vars(args).copy()
    print("config:", json.dumps(config))
    benchmarks = [read_benchmark_file(path) for path in args.bench]  # bad input fails before the model loads
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float32 if args.device == "cpu" else torch.bfloat16)
    model = from_pretrained(args.model, dtype=dtype, device=args.device).eval()
    model_dir = resolve_checkpoint(args.model)  # a run folder: its latest checkpoint
    tok = Tokenizer(model_dir)
    proc = ImageProcessor.from_pretrained(model_dir, max_pixels=args.max_pixels, min_pixels=args.min_pixels)
    n_layers = model.cfg.num_hidden_layers
    layers = parse_layers(args.intervention_layers, n_layers)
    layers = tuple(layers) if layers is not None else None
    vas_layers = parse_layers(args.vas_layers, n_layers)
    settings = list(dict.fromkeys(Setting(a, s, layers if (a or s) else None)
                                  for a in args.a_img for s in args.a_sys))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_summary([], out, config=config)
    rows = evaluate(model, tok, proc, benchmarks, out, settings, limit=args.limit, batch_size=args.batch_size,
                    max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                    seed=args.seed, vas=not args.no_vas, vas_layers=vas_layers,
                    progress=not args.no_progress, compile=args.compile, skip_bad=args.skip_bad)
    table = write_summary(rows, out, config=config)
    print(table, end="")
    return rows


if __name__ == "__main__":
    run_cli(main)
