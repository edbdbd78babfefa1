"""The toy world's base model (pretraining stage), its visual-anchored synthesis, the floor
warnings of the trainers and the experiment's statistics, on tiny settings."""

import json
import os
import random
import subprocess
import sys

import pytest
import torch

import data as sd
import synthesize as syn
import toy
from data import build_prompt
from grading import extract_answer, format_ok, grade

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("toyworld")
    summary = toy.write_toy_world(d, n_train=40, n_rl=0, n_eval=10, n_pretrain=30, seed=5)
    return d, summary


def test_pretraining_records_describe_their_drawings(world):
    d, summary = world
    pre = _jsonl(d / "pretrain.jsonl")
    assert summary["pretrain"] == len(pre) == 30
    families = list(toy.TOY_FAMILIES)
    for i, r in enumerate(pre):
        # the same problem, drawn again from its seed: the record must state its facts
        image, question, answer, options, answer_type, facts = toy.make_toy_problem(
            toy._toy_rng(5, "pretrain", i), families[i % len(families)])
        with open(d / r["images"][0], "rb") as f:
            from PIL import Image
            assert Image.open(f).convert("RGB").tobytes() == image.tobytes()
        if i % 2 == 0:  # a caption: every shape's colour and kind, or the bars and the taller one
            assert r["question"] == toy.CAPTION_QUESTION
            text = r["response"].lower()
            for s in facts.get("shapes", []):
                assert f"{s['color']} {s['kind']}" in text
            if "bars" in facts:
                assert f"the {facts['taller']} bar is taller" in text
            if facts["family"] == "side":
                assert f"on the {facts['side']}" in text
            if facts["family"] == "count" and facts["count"] > 1:
                assert text.startswith(f"{facts['count']} shapes")
        else:  # a direct answer to the question as evaluate.py renders it
            assert r["question"] == build_prompt({"question": facts["stem"], "options": options,
                                                  "answer_type": answer_type})
            assert r["response"] == f"<answer>{answer}</answer>"
            assert grade(extract_answer(r["response"]), answer, options or None, answer_type)


def test_pretraining_problems_are_not_evaluated(world):
    d, _ = world
    from PIL import Image

    def keys(name, stem_of):
        out = set()
        for r in _jsonl(d / name):
            with Image.open(d / r["images"][0]) as im:
                out.add((im.convert("RGB").tobytes(), stem_of(r)))
        return out

    pre = keys("pretrain.jsonl", lambda r: r["question"].split("\n")[0])
    ev = keys("eval.jsonl", lambda r: r["question"])
    assert not pre & ev


def test_anchored_records_come_through_synthesize_and_grade(world):
    d, summary = world
    sft = {r["id"]: r for r in _jsonl(d / "sft.jsonl")}
    anchored = _jsonl(d / "sft_anchored.jsonl")
    assert summary["sft_anchored"] == len(anchored) == len(sft) == 40  # the teacher sees exactly: none filtered
    for r in anchored:
        s = sft[r["id"]]
        assert r["question"] == s["question"] and r["images"] == s["images"] and r["answer"] == s["answer"]
        assert format_ok(r["response"]) and extract_answer(r["response"]) == s["answer"]
        assert r["response"].startswith("<think>Looking at the image") and "Let me check the image again" in r["response"]
    # a drawing two families share: the teacher answers what each question asks
    image, *_, facts = toy.make_toy_problem(random.Random(1), "side")
    teacher = toy.ToyTeacher([(image, None, None, None, None, facts)])
    desc = teacher.chat([{"role": "user", "content": syn.DESCRIBE_PROMPT.format(question="x")}], [image])
    for question, answer in (("Is the circle on the left or right?", facts["side"]), ("How many shapes are there?", "1")):
        reply = teacher.chat([{"role": "user", "content": syn.REASON_PROMPT.format(
            description=desc, question=question, answer_format="")}], [])
        assert extract_answer(reply) == answer
    with pytest.raises(syn.TeacherError, match="not given"):
        teacher.chat([{"role": "user", "content": syn.DESCRIBE_PROMPT.format(question="x")}],
                     [toy.make_toy_problem(random.Random(2), "color")[0]])


def test_toy_cli_pretrains_a_base_model_and_caches_it(tmp_path):
    """`experiments/toy.py` writes the random model to OUT/model.init and the pretrained base to OUT/model;
    a second call with the same settings keeps it."""
    from model import from_pretrained

    d = tmp_path / "toy"
    cmd = [sys.executable, os.path.join(ROOT, "experiments", "toy.py"), "--out", str(d), "--n-train", "16", "--n-rl", "0",
           "--n-eval", "4", "--n-pretrain", "32", "--pretrain-epochs", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    info = json.loads((d / "model" / "pretrain.json").read_text())
    assert info["steps"] == 2 and info["settings"]["epochs"] == 1 and info["settings"]["world"]["pretrain"] == 32
    assert not (d / "model" / "train_state.pt").exists()
    base = from_pretrained(str(d / "model"), dtype=torch.float32)
    init = from_pretrained(str(d / "model.init"), dtype=torch.float32)
    assert sd.Tokenizer(str(d / "model")).image_pad_id == base.cfg.image_token_id
    moved = [n for (n, p), (_, q) in zip(base.named_parameters(), init.named_parameters()) if not torch.equal(p, q)]
    assert len(moved) == len(list(base.parameters()))  # every weight was trained
    stamp = os.path.getmtime(d / "model" / "model.safetensors")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0 and "cached" in r.stderr
    assert os.path.getmtime(d / "model" / "model.safetensors") == stamp
    r = subprocess.run(cmd[:-1] + ["2"], capture_output=True, text=True, timeout=300, env=env)  # other settings
    assert r.returncode == 0 and json.loads((d / "model" / "pretrain.json").read_text())["steps"] == 4


@pytest.fixture(scope="module")
def tiny_sft(tmp_path_factory):
    d = tmp_path_factory.mktemp("tinysft")
    toy.write_toy_world(d, n_train=16, n_rl=0, n_eval=2, n_pretrain=0, anchored=False)
    toy.make_toy_model(str(d / "model"), corpus=toy.toy_corpus(str(d)))
    return d


@pytest.mark.parametrize("flags,expect", [
    (["--agto-sys-floor", "0.99"], "--agto-sys-floor 0.99"),  # every cell below the floor
    (["--agto-eps", "0.5"], "the eps floor"),  # 10 |S| eps above every share: the paper's formula at its floor
])
def test_sft_warns_when_the_system_mass_sits_at_its_floor(tiny_sft, tmp_path, capsys, flags, expect):
    import train_sft

    out = tmp_path / "run"
    train_sft.main(["--data", str(tiny_sft / "sft.jsonl"), "--model", str(tiny_sft / "model"), "--out", str(out),
                    "--max-steps", "1", "--batch-size", "16", "--micro-batch", "8", "--num-workers", "0",
                    "--save-every", "0", *flags])
    text = capsys.readouterr()
    assert "warning: step 1:" in text.out + text.err and expect in text.out + text.err
    row = _jsonl(out / "metrics.jsonl")[0]
    assert row["at_floor"] == 1.0 and 0 < row["sys_share"] < 1


def test_t_interval_matches_the_t_table():
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    import common

    # two-sided 95% quantiles of Student's t (any statistics table)
    for df, t in ((1, 12.7062), (2, 4.3027), (4, 2.7764), (10, 2.2281), (30, 2.0423)):
        assert common.t_quantile(df) == pytest.approx(t, abs=1e-4)
    s = common.mean_ci([60.0, 70.0, 80.0])  # sd 10, n 3: half width 4.3027 * 10 / sqrt(3)
    assert s["mean"] == 70.0 and s["ci_high"] - 70.0 == pytest.approx(4.302653 * 10 / 3 ** 0.5, rel=1e-5)
    assert common.mean_ci([5.0])["ci_low"] is None and common.mean_ci([])["mean"] is None


def test_an_evaluation_of_other_weights_is_not_reused(tiny_sft, tmp_path):
    """The experiment reuses an arm's evaluation only while it names the weights the arm's folder
    holds now: after the arm is trained again (here: one weight changed) it is redone."""
    import shutil

    import evaluate
    from safetensors.torch import load_file, save_file
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    import common

    model, folder = tmp_path / "arm", tmp_path / "eval"
    shutil.copytree(tiny_sft / "model", model)
    assert common.eval_state(str(folder), str(model), 1) is None
    evaluate.main(["--model", str(model), "--bench", str(tiny_sft / "eval.jsonl"), "--out", str(folder),
                   "--limit", "1", "--max-new-tokens", "2", "--no-vas", "--no-progress", "--device", "cpu"])
    assert common.eval_state(str(folder), str(model), 1) == "done"
    assert common.eval_state(str(folder), str(model), 2) is None  # a sweep not finished
    sd = load_file(str(model / "model.safetensors"))
    name = sorted(sd)[0]
    sd[name].view(-1)[0] += 1.0
    save_file(sd, str(model / "model.safetensors"), metadata={"format": "pt"})
    assert common.eval_state(str(folder), str(model), 1) == "other"
