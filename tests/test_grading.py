"""Answer extraction and grading (grading.py), checked against hand labels and against mathruler.

mathruler's grade_answer (the grader of EasyR1 and of AVAR's released RL code) is the independent
reference. Every case where grading.grade deliberately differs from it is listed in DISAGREEMENTS
with the reason; the test fails on any disagreement not listed there (and on listed ones that no
longer disagree), so a change in behaviour cannot pass unnoticed.
"""

import random
import re
import string
from pathlib import Path

import pytest

import evaluate
from grading import _arith, extract_answer, format_ok, grade, infer_answer_type

mathruler = pytest.importorskip("mathruler.grader")  # needs sympy and pylatexenc

ANIMALS = ["cat", "dog", "bird", "fish"]
NUMS = ["12", "15", "18", "21"]
LENGTHS = ["3 cm", "4 cm", "5 cm", "6 cm", "7 cm"]

# (prediction, gold, options, answer_type, expected grade). (prediction, gold) pairs are unique.
CASES = [
    # multiple choice: letters in their usual dresses
    ("B", "B", ANIMALS, None, True),
    ("(B)", "B", ANIMALS, None, True),
    ("B.", "B", ANIMALS, None, True),
    ("b", "B", ANIMALS, None, True),
    ("B) dog", "B", ANIMALS, None, True),
    ("(A) cat", "A", ANIMALS, None, True),
    ("C: bird", "C", ANIMALS, None, True),
    ("D. fish", "D", ANIMALS, None, True),
    ("Option A", "A", ANIMALS, None, True),
    ("(c)", "C", ANIMALS, None, True),
    ("A", "B", ANIMALS, None, False),
    ("C", "B", ANIMALS, None, False),
    ("(D)", "C", ANIMALS, None, False),
    ("D. fish", "C", ANIMALS, None, False),
    ("E", "D", ANIMALS, None, False),
    ("B", "(B)", ANIMALS, None, True),
    ("A", "A", [], None, True),
    ("A", "C", [], "multi_choice", False),
    # multiple choice: the text of an option
    ("dog", "B", ANIMALS, None, True),
    ("Dog", "A", ANIMALS, None, False),
    ("bird.", "C", ANIMALS, None, True),
    ("  FISH ", "D", ANIMALS, None, True),
    ("cow", "D", ANIMALS, None, False),
    ("15", "B", NUMS, None, True),
    ("15.0", "B", NUMS, "multi_choice", True),
    ("18", "B", NUMS, None, False),
    ("5 cm", "C", LENGTHS, None, True),
    ("5", "C", LENGTHS, None, True),
    ("6", "C", LENGTHS, None, False),
    # multiple choice: a gold given as option text (MathVista-style)
    ("B", "dog", ANIMALS, "multi_choice", True),
    ("cat", "dog", ANIMALS, "multi_choice", False),
    ("C", "dog", ANIMALS, "multi_choice", False),
    # integers
    ("5", "5", None, None, True),
    ("5.0", "5", None, None, True),
    ("05", "5", None, None, True),
    ("6", "5", None, None, False),
    ("1,000", "1000", None, None, True),
    ("1000", "1,000", None, None, True),
    ("1,000,000", "1000000", None, None, True),
    ("-3", "-3", None, None, True),
    ("- 3", "-3", None, None, True),
    ("3", "-3", None, None, False),
    ("-0", "0", None, None, True),
    ("1e3", "1000", None, None, True),
    ("3.0001", "3", None, None, False),
    ("3.0001", "3.0", None, "integer", False),
    ("12", "21", None, None, False),
    ("twelve", "12", None, None, False),
    ("5 apples", "5", None, None, False),
    ("5 cm", "5", None, None, True),
    ("5cm^2", "5", None, None, True),
    ("12 hours", "12", None, None, True),
    ("10 degrees", "10", None, None, True),
    ("3 m", "3", None, None, True),
    ("$5", "5", None, None, True),
    ("\\$1,000", "1000", None, None, True),
    ("7", "7.5", None, None, False),
    ("\\frac{6}{2}", "3", None, "integer", True),
    ("10^{3}", "1000", None, None, True),
    ("10^{100}", "1", None, None, False),
    ("\\textbf{12}", "12", None, None, True),
    ("\\text{12}", "12", None, None, True),
    # fractions, decimals, tolerance
    ("0.75", "3/4", None, None, True),
    ("\\frac{3}{4}", "0.75", None, None, True),
    ("\\dfrac{3}{4}", "3/4", None, None, True),
    ("\\tfrac{3}{4}", "\\frac{3}{4}", None, None, True),
    ("\\frac34", "0.75", None, "float", True),
    ("2.5", "5/2", None, None, True),
    ("2.50", "2.5", None, None, True),
    (".5", "0.5", None, None, True),
    ("1.5", "1\\frac{1}{2}", None, None, True),
    ("-0.5", "-\\frac{1}{2}", None, None, True),
    ("\\frac{-1}{2}", "-0.5", None, None, True),
    ("4/8", "0.5", None, None, True),
    ("2/4", "1/2", None, None, True),
    ("\\frac{6}{8}", "\\frac{3}{4}", None, None, True),
    ("0.33333", "1/3", None, None, True),
    ("0.333", "1/3", None, None, False),
    ("0.6667", "2/3", None, None, True),
    ("3.1416", "3.14159", None, None, True),
    ("3.14", "3.1416", None, None, False),
    ("1.5", "1.6", None, None, False),
    ("1.2e-3", "0.0012", None, None, True),
    ("1/0", "1", None, None, False),
    ("0.0000001", "0", None, "float", True),
    ("1000.05", "1000", None, "float", True),
    ("1001", "1000", None, "float", False),
    # surds, pi, arithmetic
    ("\\frac{\\sqrt{3}}{2}", "\\sqrt{3}/2", None, None, True),
    ("2\\sqrt{3}", "2\\sqrt3", None, None, True),
    ("\\sqrt{3}", "\\sqrt3", None, None, True),
    ("2\\sqrt{3}", "3.4641", None, None, True),
    ("\\sqrt{2}", "1.41421356", None, None, True),
    ("\\sqrt{2}", "\\sqrt{3}", None, None, False),
    ("2\\pi", "6.2832", None, None, True),
    ("\\frac{\\pi}{2}", "\\pi/2", None, None, True),
    ("4\\pi", "2\\pi", None, None, False),
    ("3 \\times 10^{2}", "300", None, None, True),
    ("2\\cdot 3", "6", None, None, True),
    ("\\sqrt{-1}", "1", None, None, False),
    # percentages
    ("50%", "50", None, None, True),
    ("50\\%", "50", None, None, True),
    ("50%", "0.5", None, None, False),
    ("12.5%", "12.5", None, None, True),
    ("0.125", "12.5%", None, None, False),
    ("50 percent", "50", None, None, True),
    # LaTeX presentation
    ("30^\\circ", "30", None, None, True),
    ("30^{\\circ}", "30", None, None, True),
    ("30°", "30", None, None, True),
    ("$\\frac{1}{2}$", "0.5", None, None, True),
    ("\\text{5 cm}", "5", None, None, True),
    ("x=5", "5", None, None, True),
    ("x = 5", "x=5", None, None, True),
    ("y=2x+1", "2x+1", None, None, True),
    ("\\left( 1, 2 \\right)", "(1,2)", None, None, True),
    ("\\text{Paris}", "Paris", None, None, True),
    ("\\mathrm{Paris}", "paris", None, None, True),
    ("\\frac{x}{2}", "x/2", None, None, False),
    ("x^2+2x+1", "(x+1)^2", None, None, False),
    # free text
    ("Paris", "paris", None, None, True),
    ("New York", "new york", None, None, True),
    ("blue", "red", None, None, False),
    ("the cat", "The cat.", None, None, True),
    ("circle", "circles", None, None, False),
    ("(1, 2)", "(1,2)", None, None, True),
    ("[1,2]", "(1,2)", None, None, False),
    ("a, b", "a,b", None, None, True),
    ("{1,2,3}", "1,2,3", None, None, True),
    ("", "5", None, None, False),
    (None, "5", None, None, False),
    # yes / no
    ("Yes", "yes", None, None, True),
    ("yes", "Yes", None, None, True),
    ("No", "no", None, None, True),
    ("YES", "yes", None, None, True),
    ("Yes.", "Yes", None, None, True),
    ("no.", "No", None, None, True),
    ("Yes, it is.", "Yes", None, None, True),
    ("No", "Yes", None, None, False),
    ("yes", "no", None, None, False),
    ("Not sure", "No", None, None, False),
    ("None", "No", None, None, False),
    ("Maybe", "Yes", None, "yes_no", False),
    ("\\text{yes}", "yes", None, None, True),
    ("\\text{No}", "no", None, None, True),
    ("\\textbf{Yes}", "No", None, None, False),
    # powers and units (differences from mathruler, documented in grade())
    ("10^2", "100", None, None, True),
    ("12", "12 cm", None, None, True),
    ("5\\text{ cm}", "5", None, None, True),
]

# Whole responses: extract_answer then grade, against mathruler.extract_boxed_content then
# grade_answer. (response, gold, expected)
RESPONSE_CASES = [
    ("<think>2+3</think> The final value is \\boxed{5}.", "5", True),
    ("So \\boxed{\\frac{3}{4}}", "0.75", True),
    ("\\boxed{\\frac{\\sqrt{3}}{2}} is it", "\\frac{\\sqrt3}{2}", True),
    ("first \\boxed{1} then \\boxed{2}", "2", True),
    ("\\boxed{B}", "B", True),
    ("<think>area is 12</think><answer>12</answer>", "12", True),
    ("<think>x</think><answer>\\boxed{7}</answer>", "7", True),
    ("Therefore, the answer is 42.", "42", True),
    ("I cannot tell.", "3", False),
    # a multi-line <answer>: its box, else its "answer is X", else its last line
    ("<think>w = 6, h = 2</think>\n<answer>\nThe area is 6 * 2.\nSo the answer is 12\n</answer>", "12", True),
    ("<think>t</think><answer>\nArea = 6 * 2\n= 12\n</answer>", "12", True),
    ("<think>t</think><answer>\n$$\n\\frac{1}{2}\n$$\n</answer>", "0.5", True),
    ("<think>t</think><answer>\nfirst 3,\nthen \\boxed{4}\n</answer>", "4", True),
    # several answers: the last counts, as the last box does
    ("<answer>3</answer> no, wait: <answer>4</answer>", "4", True),
    ("<answer>3</answer> no, wait: <answer>4</answer>", "3", False),
]

# Deliberate disagreements with mathruler: (prediction, gold) -> reason.
DISAGREEMENTS = {
    ("B.", "B"): "letter with period: mathruler cannot know it names an option",
    ("B) dog", "B"): "letter followed by option text",
    ("(A) cat", "A"): "letter followed by option text",
    ("C: bird", "C"): "letter followed by option text",
    ("D. fish", "D"): "letter followed by option text",
    ("Option A", "A"): "'Option A' names option A",
    ("dog", "B"): "option text mapped to its letter (mathruler sees no options)",
    ("bird.", "C"): "option text mapped to its letter",
    ("  FISH ", "D"): "option text mapped to its letter",
    ("15", "B"): "option text mapped to its letter",
    ("15.0", "B"): "option value mapped to its letter",
    ("5 cm", "C"): "option text mapped to its letter",
    ("5", "C"): "option value (unit dropped) mapped to its letter",
    ("B", "dog"): "gold given as option text, prediction as letter",
    ("\\frac{6}{2}", "3"): "value equality: 6/2 is the integer 3 (mathruler wants integer answers verbatim)",
    ("2\\cdot 3", "6"): "value equality: 2*3 is the integer 6 (mathruler wants integer answers verbatim)",
    ("2/4", "1/2"): "value equality: unreduced fractions accepted (mathruler rejects them)",
    ("\\frac{6}{8}", "\\frac{3}{4}"): "value equality: unreduced fractions accepted",
    ("0.33333", "1/3"): "numeric tolerance 1e-4 relative (mathruler wants exact equality)",
    ("0.6667", "2/3"): "numeric tolerance",
    ("3.1416", "3.14159"): "numeric tolerance",
    ("2\\sqrt{3}", "3.4641"): "numeric tolerance on an evaluated surd",
    ("\\sqrt{2}", "1.41421356"): "numeric tolerance on an evaluated surd",
    ("2\\pi", "6.2832"): "numeric tolerance on an evaluated multiple of pi",
    ("1000.05", "1000"): "numeric tolerance (float answer type)",
    ("10^{3}", "1000"): "10^{3} evaluated (mathruler refuses '^{' to avoid slow sympy)",
    ("3 \\times 10^{2}", "300"): "scientific notation evaluated (mathruler refuses '^{')",
    ("50 percent", "50"): "the word 'percent' read as the % sign",
    ("3 m", "3"): "unit 'm' dropped (mathruler drops only the unit words it lists)",
    ("30°", "30"): "degree sign dropped (mathruler drops only ^\\circ)",
    ("\\frac{x}{2}", "x/2"): "no computer algebra: expressions with variables compare as text",
    ("x^2+2x+1", "(x+1)^2"): "no computer algebra: expressions with variables compare as text",
    ("the cat", "The cat."): "trailing period of a text answer ignored",
    ("Yes.", "Yes"): "yes/no read from the first word",
    ("no.", "No"): "yes/no read from the first word",
    ("Yes, it is.", "Yes"): "yes/no read from the first word",
    ("<think>area is 12</think><answer>12</answer>", "12"): "answer tag (mathruler reads \\boxed only)",
    ("Therefore, the answer is 42.", "42"): "'the answer is' phrase (mathruler reads \\boxed only)",
    ("10^2", "100"): "powers evaluated: 10^2 is 100",
    ("<think>w = 6, h = 2</think>\n<answer>\nThe area is 6 * 2.\nSo the answer is 12\n</answer>", "12"):
        "answer tag (mathruler reads \\boxed only)",
    ("<think>t</think><answer>\nArea = 6 * 2\n= 12\n</answer>", "12"): "answer tag",
    ("<think>t</think><answer>\n$$\n\\frac{1}{2}\n$$\n</answer>", "0.5"): "answer tag",
    ("<answer>3</answer> no, wait: <answer>4</answer>", "4"): "answer tag",
}
AGREEMENT_THRESHOLD = 0.70  # stated floor; the measured figure is printed by the test


def _ours(case):
    pred, gold, options, answer_type, _ = case
    return grade(pred, gold, options, answer_type)


def test_grade_matches_hand_labels():
    wrong = [c for c in CASES if _ours(c) != c[4]]
    assert not wrong, wrong


def test_extract_then_grade_matches_hand_labels():
    wrong = [c for c in RESPONSE_CASES if grade(extract_answer(c[0]), c[1]) != c[2]]
    assert not wrong, wrong


def test_agreement_with_mathruler_is_the_documented_one():
    assert len(CASES) + len(RESPONSE_CASES) >= 120
    pairs = [(c[0], c[1]) for c in CASES] + [(r, g) for r, g, _ in RESPONSE_CASES]
    assert len(set(pairs)) == len(pairs), "case keys must be unique"

    disagreements = set()
    for case in CASES:
        pred, gold = case[0], case[1]
        if _ours(case) != mathruler.grade_answer(pred, gold):
            disagreements.add((pred, gold))
    for response, gold, _ in RESPONSE_CASES:
        ours = grade(extract_answer(response), gold)
        theirs = mathruler.grade_answer(mathruler.extract_boxed_content(response), gold)
        if ours != theirs:
            disagreements.add((response, gold))

    n = len(pairs)
    agreement = 1 - len(disagreements) / n
    print(f"\nagreement with mathruler: {n - len(disagreements)}/{n} = {agreement:.1%} "
          f"({len(disagreements)} documented disagreements)")
    undocumented = disagreements - DISAGREEMENTS.keys()
    stale = DISAGREEMENTS.keys() - disagreements
    assert not undocumented, f"undocumented disagreements with mathruler: {sorted(undocumented)}"
    assert not stale, f"documented disagreements that no longer disagree: {sorted(stale)}"
    assert agreement >= AGREEMENT_THRESHOLD


def _released_accuracy_reward(response: str, gold: str) -> float:
    """accuracy_reward of the paper's released RL code (Qwen-AVAR,
    EasyR1/examples/reward_function/avar.py), restated: the first <answer> on one line (re.search
    without re.DOTALL), else the whole response, graded by mathruler."""
    m = re.search(r"<answer>(.*?)</answer>", response)
    return float(mathruler.grade_answer(m.group(1).strip() if m else response.strip(), gold.strip()))


def test_which_answer_counts_against_the_released_reward():
    """Where the stated choices (last tag; multi-line tags read) part from the released reward."""
    several = "<think>t</think><answer>3</answer> no, wait: <answer>4</answer>"
    assert extract_answer(several) == "4" and _released_accuracy_reward(several, "3") == 1.0
    assert not format_ok(several)  # so a GRPO rollout like this earns no format reward either way
    multi = "<think>t</think><answer>\n12\n</answer>"
    assert extract_answer(multi) == "12" and grade(extract_answer(multi), "12")
    assert _released_accuracy_reward(multi, "12") == 0.0  # no match without re.DOTALL
    single = "<think>t</think><answer>12</answer>"  # the common case: both agree
    assert grade(extract_answer(single), "12") and _released_accuracy_reward(single, "12") == 1.0


def test_infer_answer_type():
    assert infer_answer_type("B") == "multi_choice"
    assert infer_answer_type("dog", ANIMALS) == "multi_choice"
    assert infer_answer_type("Yes") == "yes_no"
    assert infer_answer_type("1,000") == "integer"
    assert infer_answer_type("2.5") == "float"
    assert infer_answer_type("\\frac{1}{3}") == "float"
    assert infer_answer_type("Paris") == "text"


def test_grade_rejects_unknown_answer_type():
    with pytest.raises(ValueError):
        grade("1", "1", answer_type="number")


# ---- extract_answer ----

@pytest.mark.parametrize("response, expected", [
    ("<think>hmm</think><answer>42</answer>", "42"),
    ("<answer> 7. </answer>", "7"),
    ("<answer>1</answer> oops <answer>2</answer>", "2"),
    ("<answer>\\boxed{\\frac{1}{2}}</answer>", "\\frac{1}{2}"),
    ("<answer>The answer is \\boxed{B}.</answer>", "B"),
    ("<answer>(B) dog</answer>", "(B) dog"),
    ("<answer></answer>", None),
    ("\\boxed{3}", "3"),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}"),
    ("\\boxed{a{b{c}d}e}", "a{b{c}d}e"),
    ("\\boxed{1} and finally \\boxed{2}", "2"),
    ("\\boxed{1} and an unclosed \\boxed{2", "1"),
    ("\\boxed{unclosed", None),
    ("\\boxed{}", None),
    ("So the answer is 12.", "12"),
    ("The final answer is: (C)", "(C)"),
    ("Answer: B", "B"),
    ("**Answer:** 5", "5"),
    ("answer is 3\nthen more text, and the answer is 4.", "4"),
    ("The answers vary.", None),
    ("<answer>5", None),
    ("", None),
    ("   \n ", None),
    (None, None),
    (42, None),
    ("}{}{\\boxed{{{", None),
    ("</answer><answer>", None),
])
def test_extract_answer(response, expected):
    assert extract_answer(response) == expected


def test_extract_answer_on_random_text_is_fast_and_safe():
    rng = random.Random(0)
    alphabet = string.printable + "{}\\<>/αβ√π"
    junk = "".join(rng.choice(alphabet) for _ in range(10_000))
    out = extract_answer(junk)
    assert out is None or isinstance(out, str)
    # adversarial: thousands of unclosed boxes must stay linear
    assert extract_answer("\\boxed{" * 3000) is None
    assert extract_answer("<answer>" * 3000) is None
    assert not format_ok(junk)
    assert grade(junk, "5") is False


# ---- format_ok ----

@pytest.mark.parametrize("response, ok", [
    ("<think>reasoning</think><answer>5</answer>", True),
    ("  <think>\nmulti\nline\n</think>\n\n<answer> B </answer>\n", True),
    ("<think></think><answer>5</answer>", True),
    ("<answer>5</answer>", False),
    ("<think>r</think>", False),
    ("<think>r</think><answer>  </answer>", False),
    ("<think>r</think> text <answer>5</answer>", False),
    ("<think>r</think><answer>5</answer> trailing", False),
    ("<answer>5</answer><think>r</think>", False),
    ("<think>a</think><answer>1</answer><answer>2</answer>", False),
    ("<think>a<answer>1</answer></think><answer>2</answer>", False),
    ("<think><think>a</think></think><answer>2</answer>", False),
    ("", False),
    (None, False),
])
def test_format_ok(response, ok):
    assert format_ok(response) is ok


def test_model_output_is_never_run_as_code():
    for name in ("grading.py", "evaluate.py"):
        source = (Path(__file__).resolve().parents[1] / name).read_text()
        assert not re.search(r"(?<![\w.])(eval|exec|compile|__import__)\(|sympy", source)
    # the arithmetic reader accepts numbers and a few operators, nothing else (evaluate.grade is
    # the grader the evaluation loop calls)
    for payload in ["__import__('os').system('true')", "1+1; import os", "2**1000000", "9^9^9^9",
                    "(" * 500 + "1" + ")" * 500, "lambda: 1"]:
        assert evaluate.grade(payload, "2") is False


# ---- the arithmetic reader: precedence and associativity, values worked out by hand ----

@pytest.mark.parametrize("expression, value", [
    ("2^3^2", 512),  # ^ is right-associative: 2^(3^2) = 2^9, not (2^3)^2 = 64
    ("-2^2", -4),  # the sign applies to the power: -(2^2)
    ("2^-1", 0.5),
    ("2^{-2}", 0.25),
    ("1/2/2", 0.25),  # / is left-associative: (1/2)/2
    ("2-3-4", -5),
    ("2*-3", -6),
    ("1+2*3", 7),
    ("6/2(3)", 9),  # an implicit product binds like *, left to right: (6/2)*3
    ("2(1+3)", 8),
    ("\\sqrt{4}^2", 4),  # \sqrt takes one operand, then the power applies
    ("\\frac{1}{2}^2", 0.25),
    ("1\\frac{1}{2}", 1.5),  # a mixed number
    ("1e3", 1000),
])
def test_arithmetic_values(expression, value):
    assert _arith(expression) == value


@pytest.mark.parametrize("expression", [
    "", "7 3", "(2)3", "(1+2", "1+2)", "1+", "2^", "2**3", "1/0", "\\sqrt{-4}", "(-8)^(1/3)", "10^{100}", "x+1",
])
def test_arithmetic_rejects(expression):
    assert _arith(expression) is None
