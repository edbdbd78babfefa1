"""EasyR1's format prompt for train_grpo.py and evaluate.py --format-prompt, with the release's
math.jinja and r1v.jinja (tests/fixtures/release), unchanged.

The reference: EasyR1's _build_messages (render the stripped file with content=the prompt, cut
the result at <image>) done by hand with jinja2, in Qwen2.5-VL's chat layout with its default
system turn, tokenized by transformers.
"""

import json
import os

import numpy as np
import pytest
from PIL import Image

import evaluate as E
import release
import train_grpo as tg
from conftest import make_hf_model
from data import IMAGE, SYSTEM, USER, ImageProcessor, Tokenizer, UserError
from toy import make_byte_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "release")
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def png(path, value, size=(56, 56)):
    Image.fromarray(np.full((size[1], size[0], 3), value, dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    make_hf_model(layers=2, vision_depth=2, vocab=300).save_pretrained(d)
    make_byte_tokenizer(str(d))
    ImageProcessor(max_pixels=112 * 112).save(str(d))
    return str(d)


# --------------------------------------------------------------------------------------------
# --format-prompt: EasyR1's math.jinja and r1v.jinja
# --------------------------------------------------------------------------------------------

MATH = (" You FIRST think about the reasoning process as an internal monologue and then provide the final answer. "
        "The reasoning process MUST BE enclosed within <think> </think> tags. The final answer MUST BE put in "
        "\\boxed{}.")


def easyr1_prompt_ids(tok_dir, rendered, n_image_tokens):
    """EasyR1's _build_messages on a rendered prompt (cut at <image>: image parts and the non-empty
    text between them), laid out by Qwen2.5-VL's chat template with its default system turn, and
    tokenized by transformers."""
    from transformers import AutoTokenizer

    parts = []
    for i, piece in enumerate(rendered.split("<image>")):
        if i:
            parts.append("<|vision_start|>" + "<|image_pad|>" * n_image_tokens + "<|vision_end|>")
        parts.append(piece)
    text = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n" + "".join(parts)
            + "<|im_end|>\n<|im_start|>assistant\n")
    return AutoTokenizer.from_pretrained(tok_dir).encode(text, add_special_tokens=False)


def test_math_jinja_renders_as_easyr1_and_grpo_prompts_match(model_dir, tmp_path):
    import jinja2

    fp = release.read_format_prompt(os.path.join(FIXTURES, "math.jinja"))
    assert fp("  What is 2+3?\n") == "What is 2+3?" + MATH  # {{ content | trim }}, the file stripped
    src = open(os.path.join(FIXTURES, "math.jinja")).read()
    assert fp("x") == jinja2.Template(src.strip()).render(content="x")
    png(tmp_path / "a.png", 50)
    rows = [{"images": ["a.png"], "problem": "<image>\nFind x.", "answer": "3"},  # EasyR1's geometry3k form
            {"problem": "What is 2+3?", "answer": 5}]
    (tmp_path / "rl.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok, proc = Tokenizer(model_dir), ImageProcessor.from_pretrained(model_dir)
    ds = tg.PromptDataset(str(tmp_path / "rl.jsonl"), tok, proc, format_prompt=fp)
    for i, row in enumerate(rows):
        enc = ds[i]
        want = easyr1_prompt_ids(model_dir, fp(row["problem"]), 4)
        assert enc["input_ids"].tolist() == want
        roles = enc["roles"].tolist()
        n_sys = len(tok.encode("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"))
        assert roles[:n_sys] == [SYSTEM] * n_sys and roles.count(IMAGE) == (4 if i == 0 else 0)
        assert set(roles[n_sys:]) <= {USER, IMAGE}
    # without the flag the prompt stays this project's
    plain = tg.PromptDataset(str(tmp_path / "rl.jsonl"), tok, proc)[1]["input_ids"].tolist()
    assert plain != ds[1]["input_ids"].tolist() and "Reason inside <think>" in tok.decode(plain)


def test_r1v_jinja_in_evaluation(model_dir, tmp_path):
    fp = release.read_format_prompt(os.path.join(FIXTURES, "r1v.jinja"))
    assert fp("Q?").startswith("Q? A conversation between User and Assistant.")
    assert fp("Q?").endswith("<think> reasoning process here </think><answer> answer here </answer>")
    png(tmp_path / "a.png", 70)
    bench = tmp_path / "b.jsonl"
    bench.write_text(json.dumps({"id": "0", "images": ["a.png"], "question": "Which one?", "options": ["cat", "dog"],
                                 "answer": "B"}) + "\n")
    tok, proc = Tokenizer(model_dir), ImageProcessor.from_pretrained(model_dir)
    (rec,) = E.read_benchmark(str(bench))
    enc = E.encode_record(tok, proc, rec, fp)
    # the benchmark's images open the turn, then the rendering of the question and its options
    assert enc["input_ids"].tolist() == easyr1_prompt_ids(model_dir, "<image>" + fp("Which one?\nA. cat\nB. dog"), 4)
    out = tmp_path / "eval"
    args = ["--model", model_dir, "--bench", str(bench), "--out", str(out), "--max-new-tokens", "2", "--no-progress",
            "--device", "cpu", "--no-vas", "--format-prompt", os.path.join(FIXTURES, "r1v.jinja")]
    E.main(args)
    (pred,) = [json.loads(l) for l in open(out / "predictions" / "b__base.jsonl")]
    assert pred["config"]["format_prompt"] == fp.source and pred["prompt_tokens"] == len(enc["input_ids"])
    with pytest.raises(ValueError, match="format_prompt"):  # a rerun with another prompt is not mixed in
        E.main(args[:-1] + [os.path.join(FIXTURES, "math.jinja")])


@pytest.mark.parametrize("text, message", [
    ("{{ content | trim }} {% if %}", ":1: jinja syntax error"),
    ("Answer {{ question }}.", "uses \\['question'\\]"),
    ("Just answer.", "uses no variable"),
])
def test_bad_format_prompt_is_one_message(tmp_path, text, message):
    (tmp_path / "f.jinja").write_text(text)
    with pytest.raises(UserError, match=message):
        release.read_format_prompt(str(tmp_path / "f.jinja"))
    with pytest.raises(UserError, match="does not exist"):
        release.read_format_prompt(str(tmp_path / "nope.jinja"))
