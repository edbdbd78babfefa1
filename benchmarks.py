"""Benchmark files -> question records: VLMEvalKit TSVs and the project's jsonl.

  read_benchmark(path)        a VLMEvalKit .tsv or the project's .jsonl -> list of records.
  read_benchmark_file(path)   the same for the command line: bad input is a UserError.
  load_images(record)         decode a record's images (kept as sources until needed).

Records (one dict per question):
  id           str, unique in the file
  images       list of image sources: a str is base64-encoded image bytes (VLMEvalKit TSV), a
               pathlib.Path is a file, bytes are an encoded image (inline training images), a
               PIL.Image.Image is used as is. load_images() decodes them (data.load_image);
               the readers already checked that each one decodes.
  question     str (a TSV "hint" is prepended as "Hint: ...")
  options      list[str], option A first; empty when the question is not multiple choice
  answer       str, the gold answer; None in a test split without answers (predicted, not scored)
  answer_type  one of grading.ANSWER_TYPES, or None (grading.grade then infers it)
  benchmark    the file's stem, e.g. "MathVista_MINI"
  and, from a TSV only where its columns give them:
  precision    int, decimals a float answer is graded to (MathVista)
  unit         str, the answer's unit, removed from predictions (MathVista)
  groups       {column: [values]} from the GROUP_COLUMNS (category, l2-category, task, skills,
               problem_version)
  options_in_question  True when the question text already lists the options (MathVista,
               MathVerse): the prompt then does not repeat them

The VLMEvalKit TSV columns read, and what they mean:
  index        the question's id, unique in the file
  question     the question text
  answer       the gold answer (an option letter for most multiple-choice benchmarks)
  image        base64 image bytes; or a python/JSON list of base64 strings; or, when 64
               characters or fewer, the index of another row holding the image (VLMEvalKit
               writes a repeated image once)
  image_path   instead of image: path(s) relative to the TSV's folder
  A, B, C, ... the options, consecutive from A
  hint         context, prepended to the question as "Hint: ..."
  answer_type  integer / float / text / list (MathVista): kept when it is one of
               grading.ANSWER_TYPES, else left to grading.grade to infer
  question_type  "multi_choice" / "free_form" (MathVista), "multi-choice" (MathVerse); a row
               with options or a multiple-choice question_type gets answer_type multi_choice
  choices      MathVista: the options as a python-literal list (read with ast.literal_eval)
  answer_option  MathVista: the letter of the answer, which `answer` gives as option text;
               graded as the letter, as VLMEvalKit does
  precision, unit  MathVista: decimals a float answer is graded to, the answer's unit
  category, l2-category, task, skills, problem_version  groups the summary reports accuracy
               by (GROUP_COLUMNS; skills is a list literal)
  Rows with no image are dropped, as VLMEvalKit drops them. MathVerse lists its options in the
  question after a "Choices:" line ("A:2"), its answer the letter. A test split (MMBench_TEST)
  with no answer column, or an empty one on every row: all rows are predicted, none scored;
  answers missing on only some rows is an error.

The project's jsonl, one JSON object per line (blank lines skipped):
    {"id": "geo-17", "images": ["img/17.png"], "question": "Find x.", "options": ["3", "4"],
     "answer": "B", "answer_type": "multi_choice"}
  images: paths relative to the jsonl's folder ("image": "img/17.png" is also accepted);
  options and answer_type are optional.

Bad input raises ValueError naming the file and the row (TSV: data rows counted from 1 after
the header) or line (jsonl).
"""

import ast
import base64
import csv
import io
import json
import os
import re
import sys
from pathlib import Path

from PIL import Image

from data import ImageProcessor, Tokenizer, UserError, encode_chat, load_image, prompt_content
from grading import ANSWER_TYPES, same_value

# What PIL raises on bad image data (an image over its pixel limit raises DecompressionBombError,
# which is not an OSError).
IMAGE_ERRORS = (ValueError, OSError, SyntaxError, Image.DecompressionBombError)

# Columns whose values group the accuracy in the summary: MMBench's category / l2-category,
# MathVista's task and skills (a list literal: a question counts in each of its skills), MathVerse's
# problem_version (the split VLMEvalKit's MathVerse score lists).
GROUP_COLUMNS = ("category", "l2-category", "task", "skills", "problem_version")


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


def load_images(record: dict) -> list[Image.Image]:
    """Decode a record's images as RGB PIL images (what the processor expects)."""
    return [_open_rgb(src) for src in record["images"]]


def _open_rgb(src) -> Image.Image:
    """One image source -> RGB exactly as transformers' processor sees it (data.load_image:
    transparency composited on white)."""
    if isinstance(src, str):  # base64 (VLMEvalKit TSV)
        src = _b64_bytes(src)
    return load_image(src)


# ---- VLMEvalKit TSV ----

def read_tsv(path: str | Path) -> list[dict]:
    """Read a VLMEvalKit benchmark TSV (columns in the module docstring)."""
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
        images = _row_images(row, idx, where, path.parent, by_index, checked)
        if images is None:
            continue  # no image: VLMEvalKit drops such rows too
        records.append(_row_record(row, idx, images, letters, scored, where, path.stem))
    return records


def _row_images(row: dict, idx: str, where: str, folder: Path, by_index: dict, checked: set) -> list | None:
    """A row's image sources: base64 strings from `image` (following a reference to another row's
    index), or the files of `image_path` (relative to `folder`), each checked to be an image; None
    when the row has no image. `checked` holds the image cells already decoded once."""
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
        return images
    if _present(row.get("image_path")):
        try:
            images = [folder / p for p in _cell_list(row["image_path"])]
        except ValueError as e:
            raise ValueError(f"{where}: bad image_path ({e})") from None
        for p in images:
            _check_file(p, where)
        return images
    return None


def _row_record(row: dict, idx: str, images: list, letters: list[str], scored: bool, where: str,
                benchmark: str) -> dict:
    """A row with its images -> the record: options (columns A, B, ...; MathVista's `choices`;
    MathVerse's "Choices:" in the question), the hinted question, the gold answer (MathVista's
    answer_option letter), answer type, and precision, unit and groups where the row has them."""
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
    return dict(id=idx, images=images, question=question, options=options, answer=answer,
                answer_type=_answer_type(options, (row.get("answer_type") or "").strip(), question_type),
                benchmark=benchmark, **extra)


def _set_csv_field_limit() -> None:
    # base64 images are far longer than csv's default 128 KiB field limit
    limit = sys.maxsize
    while True:
        try:
            csv.field_size_limit(limit)
            return
        except OverflowError:  # C long is 32 bits on some platforms
            limit //= 10


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


def _answer_type(options: list, answer_type: str | None, question_type: str | None) -> str | None:
    """The record's answer type from the file's columns; None when they state none we know.
    question_type is "multi_choice" in MathVista, "multi-choice" in MathVerse."""
    if options or question_type.replace("-", "_") == "multi_choice":
        return "multi_choice"
    return answer_type if answer_type in ANSWER_TYPES else None


# ---- the project's jsonl ----

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


# ---- image checks ----

def _check_image(data: bytes | Path) -> None:
    """Raise unless the bytes or file are an image PIL can open. verify() reads headers and
    checksums without decoding pixels, so checking a whole benchmark stays cheap."""
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
        im.verify()


def _b64_bytes(text: str) -> bytes:
    return base64.b64decode("".join(text.split()), validate=True)


def _check_file(p: Path, where: str) -> None:
    if not p.is_file():
        raise ValueError(f"{where}: image file {str(p)!r} does not exist")
    try:
        _check_image(p)
    except IMAGE_ERRORS as e:
        raise ValueError(f"{where}: {str(p)!r} is not an image ({e})") from None


# ---- one record as the model's input ----

def encode_record(tok: Tokenizer, proc: ImageProcessor, record: dict, format_prompt=None) -> dict:
    """One question in the training format: default system turn, then a user turn holding the
    record's images followed by build_prompt(record, format_prompt), then the assistant header.
    Returns input_ids (T,), roles (T,), pixel_values (N, 1176) or None, image_grid_thw (n, 3) or None."""
    images = load_images(record)
    names = [f"{record.get('benchmark')}: id {record['id']}: image {i}" for i in range(len(images))]
    pixel_values, grid = proc(images, names) if images else (None, None)
    n_tokens = [int(g.prod()) // proc.merge ** 2 for g in grid] if grid is not None else []
    enc = encode_chat(tok, [{"role": "user", "content": prompt_content(record, format_prompt)}], n_tokens,
                      add_generation_prompt=True)
    return {"input_ids": enc["input_ids"], "roles": enc["roles"], "pixel_values": pixel_values,
            "image_grid_thw": grid}
