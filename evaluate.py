"""Benchmark evaluation for the Qwen2.5-VL / AVAR models: read benchmarks, grade answers.

This top part is model-independent and is shared with training (GRPO's accuracy and format
rewards, the SFT prompt):

  extract_answer(response)    the final answer of a response: the last <answer>...</answer>,
                              else the last \\boxed{...}, else a trailing "the answer is X".
  grade(pred, gold, ...)      is the extracted answer right? (rules below)
  format_ok(response)         <think>...</think> then <answer>...</answer>, nothing else.
  read_benchmark(path)        a VLMEvalKit .tsv or the project's .jsonl -> list of records.
  load_images(record)         decode a record's images (kept as sources until needed).
  build_prompt(record)        the user-turn text in the training format.

Grading rules (grade). Model output is never evaluated as code: numbers and small arithmetic
expressions (+ - * / ^, parentheses, \\frac, \\sqrt, \\pi) are read by a hand-written parser.
  multi_choice  the gold is a letter (or an option's text); the prediction may be "B", "(B)",
                "B.", "B) text", "Option B", or the text of an option (case/space-insensitive).
  integer       the values must be equal (within 1e-6): "1,000" = "1000" = "1000.0".
  float         relative tolerance 1e-4 (absolute 1e-6): "3/4" = "\\frac{3}{4}" = "0.75".
  yes_no        the first word, case-insensitive: "Yes." = "yes" = "Yes, it is."
  text          string equality after normalisation (LaTeX wrappers, case, spaces removed),
                or numeric equality when both sides read as numbers.
  None          inferred from the gold answer (infer_answer_type).
  Normalisation drops $...$, \\text{} / \\mathrm{} wrappers, \\left / \\right, degree marks
  (^\\circ, °), a short "x =" prefix, and a trailing unit word ("5 cm" = "5"). Percentages: the
  % sign is dropped, so "50%" = "50" but not "0.5" (mathruler's choice: benchmark answers state
  percentages in the unit the question asks for).

Records (one dict per question):
  id           str, unique in the file
  images       list of image sources: a str is base64-encoded image bytes (VLMEvalKit TSV), a
               pathlib.Path is a file, a PIL.Image.Image is used as is. load_images() decodes them;
               the readers already checked that each one decodes.
  question     str (a TSV "hint" is prepended as "Hint: ...")
  options      list[str], option A first; empty when the question is not multiple choice
  answer       str, the gold answer
  answer_type  one of ANSWER_TYPES, or None (grade() then infers it)
  benchmark    the file's stem, e.g. "MathVista_MINI"

Inputs:
  VLMEvalKit TSV: columns index, question, answer, and image (base64; or a python/JSON list of
    base64 strings; or, when 64 characters or fewer, the index of another row holding the image)
    or image_path (paths relative to the TSV's folder); options in columns A, B, C, ...; optional
    hint, answer_type, question_type. Rows with no image are dropped, as VLMEvalKit drops them.
  jsonl, one JSON object per line (blank lines skipped):
    {"id": "geo-17", "images": ["img/17.png"], "question": "Find x.", "options": ["3", "4"],
     "answer": "B", "answer_type": "multi_choice"}
    images: paths relative to the jsonl's folder ("image": "img/17.png" is also accepted);
    options and answer_type are optional.
  Bad input raises ValueError naming the file and the row (TSV: data rows counted from 1 after
  the header) or line (jsonl).

The evaluation loop (batched generation, VAS, sweeps) follows the marker at the end of the file.
"""

import base64
import csv
import io
import json
import math
import re
import sys
from pathlib import Path

from PIL import Image

ANSWER_TYPES = ("multi_choice", "integer", "float", "text", "yes_no")
REL_TOL = 1e-4  # float answers: relative tolerance ...
ABS_TOL = 1e-6  # ... and absolute tolerance (also the only one for integers)

# The instruction closing every user turn; training data synthesis reuses these two strings.
ANSWER_INSTRUCTION = ("Think step by step inside <think> </think> tags, "
                      "then give the final answer inside <answer> </answer> tags.")
CHOICE_INSTRUCTION = "For a multiple-choice question, the final answer is the option letter only."


# ---- answer extraction ----

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.S)
_ANSWER_PHRASE = re.compile(r"\banswer\s*(?:is\b\s*:?|:)[ \t]*([^\n]*)", re.I)
# Inside <think> or <answer> no other tag may appear, so a response cannot hide a second answer.
_NO_TAG = r"(?:(?!</?think>|</?answer>).)*"
_FORMAT = re.compile(rf"\s*<think>{_NO_TAG}</think>\s*<answer>({_NO_TAG})</answer>\s*", re.S)


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} whose braces balance (nested braces allowed), or None."""
    end = len(text)
    start = text.rfind("\\boxed{", 0, end)
    while start != -1:
        depth = 0
        for i in range(start + 7, end):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                if depth == 0:
                    return text[start + 7:i]
                depth -= 1
        # This box never closes, so an earlier one can only close before it: scan no further.
        # (Keeps the search linear on adversarial text full of "\boxed{".)
        end = start
        start = text.rfind("\\boxed{", 0, end)
    return None


def _clean(answer: str | None) -> str | None:
    """Strip whitespace, markdown bold and a trailing period; None when nothing is left."""
    if answer is None:
        return None
    answer = answer.strip().strip("*").strip()
    if answer.endswith("."):
        answer = answer[:-1].rstrip()
    return answer or None


def extract_answer(response: str) -> str | None:
    """The final answer of a response, or None when it states none."""
    if not isinstance(response, str) or not response.strip():
        return None
    tags = _ANSWER_TAG.findall(response)
    if tags:
        # "<answer>\boxed{5}</answer>" is common: take the box inside the tag.
        boxed = _last_boxed(tags[-1])
        return _clean(boxed if boxed is not None else tags[-1])
    boxed = _last_boxed(response)
    if boxed is not None:
        return _clean(boxed)
    phrases = [p for p in _ANSWER_PHRASE.findall(response) if p.strip()]
    return _clean(phrases[-1]) if phrases else None


def format_ok(response: str) -> bool:
    """GRPO's format reward: exactly <think>...</think> then a non-empty <answer>...</answer>."""
    if not isinstance(response, str):
        return False
    m = _FORMAT.fullmatch(response)
    return m is not None and m.group(1).strip() != ""


# ---- reading numbers without eval ----

_TOKEN = re.compile(r"\s*(\d+\.?\d*(?:[eE][-+]?\d+)?|\.\d+|frac|sqrt|pi|[-+*/^()])")
_SYMBOLS = [("\\dfrac", "frac"), ("\\tfrac", "frac"), ("\\frac", "frac"), ("\\sqrt", "sqrt"),
            ("\\pi", "pi"), ("\\cdot", "*"), ("\\times", "*"), ("\\div", "/"), ("×", "*"),
            ("·", "*"), ("÷", "/"), ("√", "sqrt"), ("π", "pi"), ("−", "-"), ("{", "("), ("}", ")")]


def _arith(s: str) -> float | None:
    """Value of a small arithmetic expression, or None if it is anything else.

    Grammar: expr = term {(+|-) term}; term = unary {(*|/) unary | implicit product};
    unary = (+|-) unary | power; power = atom [^ unary]; atom = number | pi | (expr) |
    sqrt atom | frac atom atom. Implicit products ("2\\sqrt{3}", "3\\pi", "2(1+3)") never join two
    bare numbers, so "7 3" is not 21.
    """
    if len(s) > 200:  # answers are short; this also bounds the recursion depth
        return None
    s = re.sub(r"\\[dt]?frac(\d)(\d)", r"\\frac{\1}{\2}", s)  # \frac12 -> \frac{1}{2}
    # a whole number just before a fraction of whole numbers is a mixed number: 1\frac{1}{2} = 1.5
    s = re.sub(r"(?<![\d.])(\d+)\s*\\[dt]?frac\{(\d+)\}\{(\d+)\}", r"(\1+\2/\3)", s)
    for latex, plain in _SYMBOLS:
        s = s.replace(latex, plain)
    s = s.strip()
    tokens, pos = [], 0
    while pos < len(s):
        m = _TOKEN.match(s, pos)
        if m is None:
            return None
        tokens.append(m.group(1))
        pos = m.end()
    n = len(tokens)

    def expr(i):
        v, i = term(i)
        while i < n and tokens[i] in ("+", "-"):
            w, j = term(i + 1)
            v, i = (v + w if tokens[i] == "+" else v - w), j
        return v, i

    def term(i):
        v, i = unary(i)
        while i < n:
            if tokens[i] in ("*", "/"):
                w, j = unary(i + 1)
                v, i = (v * w if tokens[i] == "*" else v / w), j
            elif tokens[i] in ("(", "sqrt", "pi", "frac"):
                w, i = power(i)
                v *= w
            else:
                break
        return v, i

    def unary(i):
        if i < n and tokens[i] in ("+", "-"):
            v, j = unary(i + 1)
            return (-v if tokens[i] == "-" else v), j
        return power(i)

    def power(i):
        v, i = atom(i)
        if i < n and tokens[i] == "^":
            e, i = unary(i + 1)
            if abs(e) > 64 or abs(v) > 1e6:  # no 10^10^10
                raise ValueError("exponent too large")
            v = v ** e  # a complex result (negative base, fractional power) is rejected below
        return v, i

    def atom(i):
        if i >= n:
            raise ValueError("expression ends early")
        t = tokens[i]
        if t == "(":
            v, i = expr(i + 1)
            if i >= n or tokens[i] != ")":
                raise ValueError("unbalanced parenthesis")
            return v, i + 1
        if t == "pi":
            return math.pi, i + 1
        if t == "sqrt":
            v, i = atom(i + 1)
            return math.sqrt(v), i  # ValueError when v < 0
        if t == "frac":
            a, i = atom(i + 1)
            b, i = atom(i)
            return a / b, i
        if t[0].isdigit() or t[0] == ".":
            return float(t), i + 1
        raise ValueError(f"unexpected {t!r}")

    try:
        v, i = expr(0)
    except (ValueError, TypeError, ZeroDivisionError, OverflowError, RecursionError):
        return None
    if i != n or isinstance(v, complex) or not math.isfinite(v):
        return None
    return float(v)


# ---- normalisation and grading ----

_UNIT = re.compile(r"(?<=[\d\s)}])\s*(?:square\s+)?(?:units?|cm|mm|km|m|kg|mg|g|ml|l|liters?|litres?|"
                   r"s|sec|seconds?|min|minutes?|h|hours?|days?|weeks?|months?|years?|degrees?|deg|"
                   r"inch(?:es)?|in|ft|feet|foot|yards?|miles?|mph|meters?|metres?|centimeters?|"
                   r"dollars?|cents?|points?|pounds?|lbs?|percent)(?:\^?\(?[23]\)?|[²³])?$", re.I)


def _normalize(s: str) -> str:
    """Strip LaTeX presentation that does not change an answer's meaning."""
    s = s.strip()
    s = re.sub(r"\\[\[\]()]", "", s)  # \( \) \[ \] math delimiters
    s = s.replace("\\$", "").replace("$", "")
    for _ in range(3):  # unwrap nested \text{\textbf{...}}
        s = re.sub(r"\\(?:text|mathrm|textbf|mathbf|textit|mbox|operatorname)\s*\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\(?:left|right)(?![A-Za-z])", "", s)
    s = re.sub(r"\\[,;:! ]", " ", s)  # LaTeX spacing
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?", "", s).replace("°", "")  # degrees
    s = s.replace("\\%", "%")
    s = re.sub(r"^[A-Za-z]\w?\s*=\s*(?=[^=]+$)", "", s)  # "x = 5" -> "5" (a short left side only)
    s = re.sub(r"\s+", " ", s).strip()
    if s.endswith("."):
        s = s[:-1].rstrip()
    return s


def _to_number(s: str) -> float | None:
    """The value of an answer that is a number (with units, %, separators, LaTeX), else None."""
    s = _normalize(s).replace("{,}", ",")
    s = _UNIT.sub("", s).strip()
    s = s.rstrip("%").strip()
    if re.fullmatch(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):  # "1,000" but never the pair "1,2"
        s = s.replace(",", "")
    return _arith(s)


def _text_key(s: str) -> str:
    """Comparison key of a free-text answer: normalised, case-folded, without spaces."""
    s = re.sub(r"\s+", "", _normalize(s).casefold())
    if s.startswith("{") and s.endswith("}"):
        s = s[1:-1]
    return s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")


def _same_value(pred: str, gold: str, integer: bool = False) -> bool:
    """Numeric equality when both read as numbers, else equality of the text keys."""
    p, g = _to_number(pred), _to_number(gold)
    if p is not None and g is not None:
        if integer:
            return abs(p - g) <= ABS_TOL
        return math.isclose(p, g, rel_tol=REL_TOL, abs_tol=ABS_TOL)
    return _text_key(pred) == _text_key(gold)


def _yes_no(s: str) -> str | None:
    m = re.match(r"\s*(yes|no)\b", s, re.I)
    return m.group(1).lower() if m else None


_LETTER_ONLY = re.compile(r"(?:option\s*)?\(?([A-Za-z])\)?[.:)]?", re.I)
_LETTER_PREFIX = re.compile(r"(?:option\s*)?(?:\(([A-Z])\)|([A-Z])[.:)](?=\s))", re.I)


def _choice_letter(s: str, options: list[str]) -> str | None:
    """The option letter an answer names ("B", "(b)", "B. text", "Option B", an option's text)."""
    s = _normalize(s)
    m = _LETTER_ONLY.fullmatch(s)
    if m:
        return m.group(1).upper()
    m = _LETTER_PREFIX.match(s)
    if m and (m.group(1) or m.group(2)).isupper():  # "B) text", but not a sentence "a) ..."
        return m.group(1) or m.group(2)
    hits = [chr(65 + i) for i, opt in enumerate(options) if _same_value(s, opt)]
    return hits[0] if len(hits) == 1 else None  # two equal options: ambiguous


def infer_answer_type(gold: str, options: list[str] | None = None) -> str:
    """Guess the answer type from the gold answer, for records that do not state it."""
    gold = str(gold).strip()
    if re.fullmatch(r"\(?[A-Z]\)?\.?", gold):
        return "multi_choice"
    if options and _choice_letter(gold, options) is not None:
        return "multi_choice"
    if re.fullmatch(r"(?i)(yes|no)\.?", gold):
        return "yes_no"
    value = _to_number(gold)
    if value is not None:
        return "integer" if value == round(value) and "." not in gold else "float"
    return "text"


def grade(pred: str | None, gold: str, options: list[str] | None = None,
          answer_type: str | None = None) -> bool:
    """Whether the predicted answer matches the gold one (rules in the module docstring)."""
    if pred is None or gold is None or not str(pred).strip():
        return False
    pred, gold, options = str(pred).strip(), str(gold).strip(), list(options or [])
    if answer_type is None:
        answer_type = infer_answer_type(gold, options)
    if answer_type not in ANSWER_TYPES:
        raise ValueError(f"unknown answer_type {answer_type!r}, expected one of {ANSWER_TYPES}")
    if answer_type == "multi_choice":
        gold_letter = _choice_letter(gold, options)
        if gold_letter is not None:
            return _choice_letter(pred, options) == gold_letter
        # The gold is an answer text that no option matches (options unknown): compare values,
        # reading a predicted letter as the text of its option.
        letter = _choice_letter(pred, options)
        if letter is not None and ord(letter) - 65 < len(options):
            pred = options[ord(letter) - 65]
        return _same_value(pred, gold)
    if answer_type == "yes_no":
        return _yes_no(gold) is not None and _yes_no(pred) == _yes_no(gold)
    return _same_value(pred, gold, integer=answer_type == "integer")


# ---- benchmark readers ----

def _check_image(data: bytes | Path) -> None:
    """Raise unless the bytes or file are an image PIL can open. verify() reads headers and
    checksums without decoding pixels, so checking a whole benchmark stays cheap."""
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
        im.verify()


def _b64_bytes(text: str) -> bytes:
    return base64.b64decode("".join(text.split()), validate=True)


def _open_rgb(src) -> Image.Image:
    if isinstance(src, Image.Image):
        return src.convert("RGB")
    with Image.open(src if isinstance(src, Path) else io.BytesIO(_b64_bytes(src))) as im:
        return im.convert("RGB")  # convert() decodes the pixels, so closing the file is safe


def load_images(record: dict) -> list[Image.Image]:
    """Decode a record's images as RGB PIL images (what the processor expects)."""
    return [_open_rgb(src) for src in record["images"]]


def _check_file(p: Path, where: str) -> None:
    if not p.is_file():
        raise ValueError(f"{where}: image file {str(p)!r} does not exist")
    try:
        _check_image(p)
    except (ValueError, OSError, SyntaxError) as e:  # PIL raises all three on bad data
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
    """The record's answer type from the file's columns; None when they state none we know."""
    if options or question_type == "multi_choice":
        return "multi_choice"
    return answer_type if answer_type in ANSWER_TYPES else None


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
    missing = [c for c in ("index", "question", "answer") if c not in header]
    if "image" not in header and "image_path" not in header:
        missing.append("image")
    if missing:
        raise ValueError(f"{path}: missing required column(s) {missing}")
    if not rows:
        raise ValueError(f"{path}: no rows")
    letters = [chr(65 + i) for i in range(26) if chr(65 + i) in header]

    # VLMEvalKit saves space by writing, in place of a repeated image, the index of a row that
    # holds it; a real base64 image is always longer than 64 characters.
    by_index = {(r.get("index") or "").strip(): r.get("image") or "" for r in rows}
    checked = set()  # image cells already decoded once (shared by referring rows)
    records, seen = [], set()
    for n, row in enumerate(rows, 1):
        where = f"{path}: row {n} (index {row.get('index')!r})"
        for col in ("index", "question", "answer"):
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
                except (ValueError, OSError, SyntaxError) as e:  # PIL raises all three on bad data
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
        if _present(row.get("hint")):
            question = f"Hint: {row['hint'].strip()}\n{question}"
        records.append(dict(
            id=idx, images=images, question=question, options=options,
            answer=row["answer"].strip(),
            answer_type=_answer_type(options, (row.get("answer_type") or "").strip(),
                                     (row.get("question_type") or "").strip()),
            benchmark=path.stem))
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
    if suffix == ".tsv":
        return read_tsv(path)
    if suffix == ".jsonl":
        return read_jsonl(path)
    raise ValueError(f"{path}: unknown benchmark format {suffix!r} (expected .tsv or .jsonl)")


def build_prompt(record: dict) -> str:
    """The user-turn text: question, "A. text" option lines, then the answer instruction.
    (The image placeholders are added by the chat template, not here.)"""
    lines = [record["question"].strip()]
    lines += [f"{chr(65 + i)}. {opt}" for i, opt in enumerate(record.get("options") or [])]
    instruction = ANSWER_INSTRUCTION
    if record.get("options") or record.get("answer_type") == "multi_choice":
        instruction += " " + CHOICE_INSTRUCTION
    return "\n".join(lines) + "\n" + instruction


# ---- evaluation loop ----
