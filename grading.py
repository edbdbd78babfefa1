"""Grading: is a model's response right? Used by evaluation, the GRPO rewards and data synthesis.

  extract_answer(response)    the final answer of a response: the last <answer>...</answer>
                              (its box, or for a multi-line one its "answer is X" or last line),
                              else the last \\boxed{...}, else a trailing "the answer is X".
  grade(pred, gold, ...)      is the extracted answer right? (rules below)
  format_ok(response)         <think>...</think> then <answer>...</answer>, nothing else.
  infer_answer_type(gold)     one of ANSWER_TYPES, for records that do not state it.
  same_value(a, b)            equal as numbers when both read as numbers, else as normalised text.

Grading rules (grade). Model output is never evaluated as code: numbers and small arithmetic
expressions (+ - * / ^, parentheses, \\frac, \\sqrt, \\pi) are read by a hand-written parser.
  multi_choice  the gold is a letter (or an option's text); the prediction may be "B", "(B)",
                "B.", "B) text", "Option B", or the text of an option (case/space-insensitive).
  integer       the values must be equal (within 1e-6): "1,000" = "1000" = "1000.0".
  float         relative tolerance 1e-4 (absolute 1e-6): "3/4" = "\\frac{3}{4}" = "0.75"; with a
                record's precision (MathVista), equality after rounding to that many decimals.
  yes_no        the first word, case-insensitive: "Yes." = "yes" = "Yes, it is." = "\\text{yes}"
  text          string equality after normalisation (LaTeX wrappers, case, spaces removed),
                or numeric equality when both sides read as numbers.
  None          inferred from the gold answer (infer_answer_type).
  Normalisation drops $...$, \\text{} / \\mathrm{} wrappers, \\left / \\right, degree marks
  (^\\circ, °), a short "x =" prefix, and a trailing unit word ("5 cm" = "5"). Percentages: the
  % sign is dropped, so "50%" = "50" but not "0.5" (mathruler's choice: benchmark answers state
  percentages in the unit the question asks for). A record's unit (MathVista) is removed from the
  prediction first.

Where this differs from mathruler's grade_answer (the reward of EasyR1 and of the paper's released
RL code), on purpose (tests/test_grading.py lists every case):
  - values, not spellings: 2/4 = 1/2, \\frac{6}{2} = 3, 10^2 = 100, 3 \\times 10^{2} = 300
    (mathruler keeps unreduced fractions and integers verbatim, and refuses "^{" to keep its
    algebra fast); and a tolerance, 0.33333 = 1/3, where mathruler wants exact equality.
  - units: any trailing unit word it knows is dropped ("3 m" = "3", "30°" = "30"), mathruler
    drops only the few words on its list.
  - multiple choice: "B.", "B) dog", "Option B" and an option's text name option B; mathruler
    sees no options and compares strings.
  - yes/no from the first word ("Yes, it is." = "Yes").
  - no computer algebra: x^2+2x+1 != (x+1)^2, both compare as text (mathruler expands them).
"""

import math
import operator
import re

ANSWER_TYPES = ("multi_choice", "integer", "float", "text", "yes_no")
REL_TOL = 1e-4  # float answers: relative tolerance ...
ABS_TOL = 1e-6  # ... and absolute tolerance (also the only one for integers)


# ---- answer extraction ----

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.S)
_ANSWER_PHRASE = re.compile(r"\banswer\s*(?:is\b\s*:?|:)[ \t]*([^\n]*)", re.I)
# Inside <think> or <answer> no other tag may appear, so a response cannot hide a second answer.
_NO_TAG = r"(?:(?!</?think>|</?answer>).)*"
_FORMAT = re.compile(rf"\s*<think>{_NO_TAG}</think>\s*<answer>({_NO_TAG})</answer>\s*", re.S)


def extract_answer(response: str) -> str | None:
    """The final answer of a response, or None when it states none.

    With several <answer> tags the last one counts, as the last \\boxed{} does for mathruler's
    extract_boxed_content (and so for EasyR1's math reward). The reward of the paper's released code
    (Qwen-AVAR, EasyR1/examples/reward_function/avar.py) instead takes the first tag, and only one
    on a single line (re.search without re.DOTALL); such responses fail our format_ok anyway, so
    the choice changes accuracy only, never the format reward."""
    if not isinstance(response, str) or not response.strip():
        return None
    tags = _ANSWER_TAG.findall(response)
    if tags:
        return _from_tag(tags[-1])
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


def _from_tag(content: str) -> str | None:
    """The answer inside one <answer>...</answer>: the box in it ("<answer>\\boxed{5}</answer>" is
    common), else the whole content when it is one line, else (a multi-line answer that works its
    way to the result) a trailing "the answer is X", else its last line that is not a bare math
    delimiter ($$, \\[, \\])."""
    boxed = _last_boxed(content)
    if boxed is not None:
        return _clean(boxed)
    lines = [ln for ln in content.strip().splitlines() if ln.strip() not in ("", "$$", "$", "\\[", "\\]")]
    if len(lines) <= 1:
        return _clean(lines[0] if lines else None)
    phrases = [p for p in _ANSWER_PHRASE.findall(content) if p.strip()]
    return _clean(phrases[-1] if phrases else re.sub(r"^\s*=\s*", "", lines[-1]))  # "= 12" -> "12"


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


# ---- grading ----

def grade(pred: str | None, gold: str, options: list[str] | None = None,
          answer_type: str | None = None, *, precision: int | None = None, unit: str | None = None) -> bool:
    """Whether the predicted answer matches the gold one (rules in the module docstring).

    precision  (MathVista's column) float answers: the prediction rounded to that many decimals
               must equal the gold, as MathVista's own scorer does ("1.449" = "1.45" at 2);
               without it the relative tolerance REL_TOL applies.
    unit       (MathVista's column) the question's unit, removed from the prediction first: the
               gold answers never carry it ("12 cm^2" = "12" with unit "cm^2").
    """
    if pred is None or gold is None or not str(pred).strip():
        return False
    pred, gold, options = str(pred).strip(), str(gold).strip(), list(options or [])
    if unit and str(unit).strip():
        pred = _strip_unit(pred, str(unit))
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
        return same_value(pred, gold)
    if answer_type == "yes_no":
        return _yes_no(gold) is not None and _yes_no(pred) == _yes_no(gold)
    if answer_type == "float" and precision is not None:
        p, g = _to_number(pred), _to_number(gold)
        if p is not None and g is not None:
            return round(p, int(precision)) == round(g, int(precision))
    return same_value(pred, gold, integer=answer_type == "integer")


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


def same_value(pred: str, gold: str, integer: bool = False) -> bool:
    """Numeric equality when both read as numbers, else equality of the text keys."""
    p, g = _to_number(pred), _to_number(gold)
    if p is not None and g is not None:
        if integer:
            return abs(p - g) <= ABS_TOL
        return math.isclose(p, g, rel_tol=REL_TOL, abs_tol=ABS_TOL)
    return _text_key(pred) == _text_key(gold)


def _strip_unit(pred: str, unit: str) -> str:
    """The prediction without the question's unit ("12 cm^2" -> "12" when unit is "cm^2"), as
    before or after the number ("$5" with unit "$")."""
    u = re.escape(unit.strip())
    return re.sub(rf"^\s*(?:{u})\s*|\s*(?:{u})\s*$", "", pred, flags=re.I) or pred


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
    hits = [chr(65 + i) for i, opt in enumerate(options) if same_value(s, opt)]
    return hits[0] if len(hits) == 1 else None  # two equal options: ambiguous


def _yes_no(s: str) -> str | None:
    m = re.match(r"\s*(yes|no)\b", _normalize(s), re.I)  # "\\text{Yes}" = "Yes"
    return m.group(1).lower() if m else None


# ---- normalisation ----

_UNIT = re.compile(r"(?<=[\d\s)}])\s*(?:square\s+)?(?:units?|cm|mm|km|m|kg|mg|g|ml|l|liters?|litres?|"
                   r"s|sec|seconds?|min|minutes?|h|hours?|days?|weeks?|months?|years?|degrees?|deg|"
                   r"inch(?:es)?|in|ft|feet|foot|yards?|miles?|mph|meters?|metres?|centimeters?|"
                   r"dollars?|cents?|points?|pounds?|lbs?|percent)(?:\^?\(?[23]\)?|[²³])?$", re.I)


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


# ---- reading numbers without eval ----

_TOKEN = re.compile(r"\d+\.?\d*(?:[eE][-+]?\d+)?|\.\d+|frac|sqrt|pi|[-+*/^()]")
_SYMBOLS = [("\\dfrac", "frac"), ("\\tfrac", "frac"), ("\\frac", "frac"), ("\\sqrt", "sqrt"),
            ("\\pi", "pi"), ("\\cdot", "*"), ("\\times", "*"), ("\\div", "/"), ("×", "*"),
            ("·", "*"), ("÷", "/"), ("√", "sqrt"), ("π", "pi"), ("−", "-"), ("{", "("), ("}", ")")]
_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2, "^": 3}
_IMPLICIT = ("(", "sqrt", "pi", "frac")  # a product without "*": "2\\sqrt{3}", "3\\pi", "2(1+3)"
_APPLY = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv, "^": operator.pow}


def _arith(s: str) -> float | None:
    """Value of a small arithmetic expression, or None if it is anything else.

    Precedence climbing, loosest first: + -; * / and the implicit product (which never joins two
    bare numbers, so "7 3" is not 21); a leading sign; ^, right-associative (2^3^2 = 2^9,
    -2^2 = -4, 2^-1 = 0.5). An operand is a number, pi, (expr), sqrt operand or frac operand operand.
    """
    if len(s) > 200:  # answers are short; this also bounds the recursion depth
        return None
    s = re.sub(r"\\[dt]?frac(\d)(\d)", r"\\frac{\1}{\2}", s)  # \frac12 -> \frac{1}{2}
    # a whole number just before a fraction of whole numbers is a mixed number: 1\frac{1}{2} = 1.5
    s = re.sub(r"(?<![\d.])(\d+)\s*\\[dt]?frac\{(\d+)\}\{(\d+)\}", r"(\1+\2/\3)", s)
    for latex, plain in _SYMBOLS:
        s = s.replace(latex, plain)
    tokens = _TOKEN.findall(s)
    if "".join(tokens) != re.sub(r"\s+", "", s):  # a character that is no token
        return None
    tokens.reverse()  # tokens[-1] is the next token, tokens.pop() takes it

    def operand():
        t = tokens.pop()  # IndexError: the expression ends early
        if t == "(":
            v = climb(0)
            if tokens.pop() != ")":
                raise ValueError("unbalanced parenthesis")
            return v
        if t == "sqrt":
            return math.sqrt(operand())  # ValueError below zero
        if t == "frac":
            return operand() / operand()
        return math.pi if t == "pi" else float(t)  # ValueError for an operator

    def climb(min_precedence):
        """The expression from the next token on, up to the first operator that binds looser."""
        if tokens[-1] in ("+", "-"):  # a sign binds looser than ^, tighter than * and /
            sign = tokens.pop()
            v = climb(_PRECEDENCE["^"])
            v = -v if sign == "-" else v
        else:
            v = operand()
        while tokens:
            implicit = tokens[-1] in _IMPLICIT
            op = "*" if implicit else tokens[-1]
            if op not in _PRECEDENCE or _PRECEDENCE[op] < min_precedence:
                break
            if not implicit:  # an implicit product consumes no token
                tokens.pop()
            p = _PRECEDENCE[op]
            right = climb(p if op == "^" else p + 1)  # ^ groups to the right, the rest to the left
            if op == "^" and (abs(right) > 64 or abs(v) > 1e6):  # no 10^10^10
                raise ValueError("power too large")
            v = _APPLY[op](v, right)  # a complex power (negative base, fractional exponent): see below
        return v

    try:
        v = climb(0)
    except (ValueError, TypeError, ZeroDivisionError, OverflowError, RecursionError, IndexError):
        return None
    if tokens or isinstance(v, complex) or not math.isfinite(v):
        return None
    return float(v)
