"""The evaluation loop of evaluate.py on a tiny random checkpoint: records, resume, batching, sweeps,
summaries, grading with controlled responses, and Pearson r against hand-computed values."""

import base64
import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate as E
import grading
import hub
import vas as V
from data import ImageProcessor, Tokenizer, UserError
from model import Qwen2_5_VL, from_pretrained
from toy import make_byte_tokenizer

MAX_NEW = 6
# the checkpoint the library tests name (evaluate_benchmark records what its caller says; main() and
# the tests of the command line below fingerprint the real folder)
TINY = {"folder": "tiny-random", "sha256": "0" * 64}
FIELDS = {"id", "benchmark", "weights", "setting", "config", "answer", "answer_type", "response", "extracted", "correct",
          "stopped", "new_tokens", "prompt_tokens", "vas", "vas_per_layer", "vas_layers"}


# ------------------------------------------------------------------------------------ inputs

def png(color, size=(12, 9)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def write_tsv(path: Path) -> Path:
    b = lambda c, size=(12, 9): base64.b64encode(png(c, size)).decode()  # noqa: E731
    rows = [("1", "Which colour is shown?", "red", "blue", "", "A", b((255, 0, 0))),
            ("2", "How many squares?", "", "", "", "3", b((0, 255, 0), (30, 20))),
            ("3", "Is it dark?", "", "", "", "no", b((250, 250, 250))),
            ("4", "Pick the shape.", "circle", "square", "star", "C", b((0, 0, 255), (40, 40))),
            ("5", "What is x?", "", "", "", "2.5", b((9, 9, 9)))]
    lines = ["index\tquestion\tA\tB\tC\tanswer\timage"] + ["\t".join(r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_jsonl(path: Path) -> Path:
    (path.parent / "img").mkdir(exist_ok=True)
    objs = []
    for i, (color, answer) in enumerate([((200, 10, 10), "B"), ((10, 200, 10), "7"), ((10, 10, 200), "yes")]):
        Image.new("RGB", (20 + 8 * i, 16), color).save(path.parent / "img" / f"{i}.png")
        objs.append({"id": f"q{i}", "images": [f"img/{i}.png"], "question": f"Question {i}?", "answer": answer,
                     **({"options": ["one", "two"]} if answer == "B" else {})})
    path.write_text("".join(json.dumps(o) + "\n" for o in objs))
    return path


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def model_dir(hf_untied, tmp_path_factory):
    """The tiny random transformers checkpoint plus the byte tokenizer: a complete model folder."""
    d = tmp_path_factory.mktemp("evalmodel")
    shutil.copytree(hf_untied[1], d, dirs_exist_ok=True)
    make_byte_tokenizer(str(d))
    return d


@pytest.fixture(scope="module")
def parts(model_dir):
    model = from_pretrained(str(model_dir), dtype=torch.float32).eval()
    return model, Tokenizer(str(model_dir)), ImageProcessor.from_pretrained(str(model_dir))


@pytest.fixture(scope="module")
def benches(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    return write_tsv(d / "Tiny_MINI.tsv"), write_jsonl(d / "tiny_geo.jsonl")


def lines(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


def count_prompts(monkeypatch, model):
    """Wrap model.generate to record how many prompts each call got."""
    calls, real = [], model.generate

    def wrapped(prompts, *a, **kw):
        calls.append(len(prompts))
        return real(prompts, *a, **kw)

    monkeypatch.setattr(model, "generate", wrapped)
    return calls


def run(parts, records, path, **kw):
    model, tok, proc = parts
    kw.setdefault("max_new_tokens", MAX_NEW)
    kw.setdefault("weights", TINY)
    return E.evaluate_benchmark(model, tok, proc, records, path, progress=False, **kw)


# ------------------------------------------------------------------------------------ end to end

def test_cli_end_to_end_records_and_summary(model_dir, benches, tmp_path):
    tsv, jsonl = benches
    out = tmp_path / "out"
    ident = hub.model_identity(str(model_dir))
    E.main(["--model", str(model_dir), "--bench", str(tsv), str(jsonl), "--out", str(out), "--batch-size", "2",
            "--max-new-tokens", str(MAX_NEW), "--no-progress", "--a-img", "0", "0.15", "--a-sys", "0"])
    for path in (tsv, jsonl):
        bench, questions = path.stem, E.read_benchmark(path)
        for tag, a_img in (("base", 0.0), ("aimg0.15_asys0", 0.15)):
            recs = lines(out / "predictions" / f"{bench}__{tag}.jsonl")
            assert [r["id"] for r in recs] == [q["id"] for q in questions]
            for r, q in zip(recs, questions):
                assert set(r) == FIELDS
                assert r["weights"] == {"folder": str(model_dir), "sha256": ident["sha256"]}
                assert r["benchmark"] == bench and r["setting"] == {"a_img": a_img, "a_sys": 0.0, "layers": None}
                assert r["config"]["max_new_tokens"] == MAX_NEW and r["config"]["temperature"] == 0.0
                assert isinstance(r["response"], str) and isinstance(r["correct"], bool)
                assert 1 <= r["new_tokens"] <= MAX_NEW and r["prompt_tokens"] > 100
                assert isinstance(r["vas"], float) and math.isfinite(r["vas"]) and r["vas"] > 0
                assert r["vas_layers"] == [0, 1, 2] and len(r["vas_per_layer"]) == 3
                # the record's VAS is the mean of its layers' VAS (equal head and query counts per layer)
                assert r["vas"] == pytest.approx(sum(r["vas_per_layer"]) / 3, rel=1e-5)
                assert r["extracted"] == E.extract_answer(r["response"])
                assert r["correct"] == E.grade(r["extracted"], q["answer"], q["options"], q["answer_type"])

    # summary.md parses as a markdown table: header, separator, 2 benchmarks x 2 settings + 2 mean rows
    md = (out / "summary.md").read_text().strip().splitlines()
    cells = [[c.strip() for c in row.strip().strip("|").split("|")] for row in md]
    assert all(row.startswith("|") and row.endswith("|") for row in md)
    assert cells[0] == ["benchmark", "setting", "n", "accuracy", "mean VAS", "band", "checkpoint"]
    assert all(set(c) <= set("-") for c in cells[1])
    body = cells[2:]
    assert len(body) == 6 and all(len(c) == 7 for c in body)
    assert all(c[6] == f"{model_dir} (sha256 {ident['sha256'][:12]})" for c in body)
    assert [(c[0], c[1]) for c in body] == [("Tiny_MINI", "base"), ("tiny_geo", "base"), ("mean", "base"),
                                            ("Tiny_MINI", "aimg0.15_asys0"), ("tiny_geo", "aimg0.15_asys0"),
                                            ("mean", "aimg0.15_asys0")]
    assert [int(c[2]) for c in body] == [5, 3, 8, 5, 3, 8]
    for c in body:
        assert 0 <= float(c[3]) <= 100 and float(c[4]) > 0 and c[5] in ("narrow", "wide", "panoramic")

    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["max_new_tokens"] == MAX_NEW and len(summary["rows"]) == 4
    assert summary["provenance"]["model"] == ident
    assert all(row["weights"] == {"folder": str(model_dir), "sha256": ident["sha256"]} for row in summary["rows"])
    for row in summary["rows"]:  # the rows agree with the predictions files
        recs = lines(row["predictions"])
        assert row["n"] == len(recs)
        assert row["accuracy"] == pytest.approx(100 * sum(r["correct"] for r in recs) / len(recs))
        assert row["mean_vas"] == pytest.approx(sum(r["vas"] for r in recs) / len(recs))


def test_resume_after_interrupt_and_cut_line(parts, benches, tmp_path, monkeypatch):
    records = E.read_benchmark(benches[0])  # 5 questions
    ref = tmp_path / "ref.jsonl"
    run(parts, records, ref, batch_size=2)
    want = lines(ref)

    class Stop(Exception):
        pass

    def stop(preds):
        raise Stop

    path = tmp_path / "run.jsonl"
    with pytest.raises(Stop):
        run(parts, records, path, batch_size=2, on_batch=stop)
    assert [r["id"] for r in lines(path)] == ["1", "2"]  # the first batch was written before the stop
    calls = count_prompts(monkeypatch, parts[0])
    run(parts, records, path, batch_size=2)
    assert calls == [2, 1]  # only ids 3, 4, 5 were generated
    assert lines(path) == want  # same batches as the uninterrupted run: identical records

    # a crash in the middle of writing line 4: the cut line is dropped and only ids 4, 5 are redone
    text = path.read_text()
    cut = text.index('"id": "4"') + 20
    path.write_text(text[:cut])
    calls.clear()
    run(parts, records, path, batch_size=2)
    assert calls == [2]
    got = lines(path)
    assert [r["id"] for r in got] == ["1", "2", "3", "4", "5"]
    assert got[:3] == want[:3]
    for g, w in zip(got[3:], want[3:]):  # new batch composition: same greedy text, VAS to round-off
        assert g["response"] == w["response"] and g["vas"] == pytest.approx(w["vas"], rel=1e-4)

    # nothing left: no generation at all; another config on the same file is refused
    calls.clear()
    row = run(parts, records, path, batch_size=2)
    assert calls == [] and row["n"] == 5
    with pytest.raises(ValueError, match="max_new_tokens"):
        run(parts, records, path, batch_size=2, max_new_tokens=MAX_NEW + 1)


def test_read_predictions_tolerates_only_a_cut_last_line(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "c", "resp')
    assert [r["id"] for r in E.read_predictions(p)] == ["a", "b"]
    assert p.read_text().endswith('"resp')  # reading alone does not change the file
    assert [r["id"] for r in E.read_predictions(p, repair=True)] == ["a", "b"]
    assert p.read_text() == '{"id": "a"}\n{"id": "b"}\n'
    p.write_text('{"id": "a"}\n{"id": "b"\n{"id": "c"}\n')
    with pytest.raises(ValueError, match="line 2"):
        E.read_predictions(p)


def test_batch_size_does_not_change_greedy_responses(parts, benches, tmp_path):
    records = E.read_benchmark(benches[0]) + E.read_benchmark(benches[1])
    one, four = tmp_path / "b1.jsonl", tmp_path / "b4.jsonl"
    run(parts, records, one, batch_size=1, max_new_tokens=10)
    run(parts, records, four, batch_size=4, max_new_tokens=10)
    a, b = lines(one), lines(four)
    assert [r["response"] for r in a] == [r["response"] for r in b]
    assert [r["new_tokens"] for r in a] == [r["new_tokens"] for r in b]
    assert [r["vas"] for r in a] == pytest.approx([r["vas"] for r in b], rel=1e-4)


def test_sweep_rows_per_setting(parts, benches, tmp_path, monkeypatch):
    model, tok, proc = parts
    factories = []
    real = model.generate

    def spy(prompts, *a, attn_ctl_factory=None, **kw):
        factories.append(attn_ctl_factory)
        return real(prompts, *a, attn_ctl_factory=attn_ctl_factory, **kw)

    monkeypatch.setattr(model, "generate", spy)
    settings = [E.Setting(), E.Setting(0.15, 0.0), E.Setting(0.15, 0.4), E.Setting(0.15, 0.05, (0, 1))]
    rows = E.evaluate(model, tok, proc, [benches[1]], tmp_path, settings, batch_size=3, max_new_tokens=3,
                      progress=False, weights=TINY)
    assert [r["setting"] for r in rows] == ["base", "aimg0.15_asys0", "aimg0.15_asys0.4", "aimg0.15_asys0.05_L0-1"]
    assert [f is None for f in factories] == [True, False, False, False]  # the intervention reaches generate
    for s, r in zip(settings, rows):
        recs = lines(tmp_path / "predictions" / f"tiny_geo__{s.tag}.jsonl")
        assert r["n"] == 3 and all(x["setting"] == s.to_dict() for x in recs)
        assert r["mean_vas"] == pytest.approx(sum(x["vas"] for x in recs) / 3)
    vas = [r["mean_vas"] for r in rows]
    assert len(set(vas)) == 4  # each setting measured under its own intervention
    md = (tmp_path / "summary.md").read_text().splitlines()
    assert len(md) == 2 + 4 and json.loads((tmp_path / "summary.json").read_text())["rows"] == rows


# ------------------------------------------------------------------------------------ grading

RESPONSES = {  # question -> (response the fake model gives, correct?)
    "Which colour is shown?": ("<think>It is red.</think><answer>A</answer>", True),
    "How many squares?": ("<think>count</think><answer>5</answer>", False),
    "Is it dark?": ("", False),  # empty: only the stop token
    "Pick the shape.": ("<answer>", False),  # malformed
    "What is x?": ("so the answer is 5/2", True),
}


def test_grading_with_controlled_responses(parts, benches, tmp_path, monkeypatch):
    model, tok, proc = parts

    def fake_generate(prompts, pixel_values=None, image_grid_thw=None, *, max_new_tokens, pad_id, **kw):
        assert kw["vocab_limit"] == tok.vocab_size and kw["temperature"] == 0.0
        out = torch.full((len(prompts), max_new_tokens), pad_id)
        lengths = torch.zeros(len(prompts), dtype=torch.long)
        for b, p in enumerate(prompts):
            text = tok.decode(p)
            (response,) = [r for q, (r, _) in RESPONSES.items() if q in text]
            ids = (tok.encode(response) + [tok.im_end_id])[:max_new_tokens]
            out[b, :len(ids)] = torch.tensor(ids)
            lengths[b] = len(ids)
        return out, lengths

    monkeypatch.setattr(model, "generate", fake_generate)
    records = E.read_benchmark(benches[0])
    path = tmp_path / "graded.jsonl"
    row = run(parts, records, path, batch_size=2, max_new_tokens=64, vas=False)
    recs = lines(path)
    want = [RESPONSES[r["question"]] for r in records]
    assert [r["response"] for r in recs] == [w[0] for w in want]
    assert [r["correct"] for r in recs] == [w[1] for w in want]
    assert [r["extracted"] for r in recs] == ["A", "5", None, None, "5/2"]
    assert all(r["stopped"] for r in recs) and recs[2]["new_tokens"] == 1
    assert all(r["vas"] is None for r in recs)
    assert row["accuracy"] == pytest.approx(40.0) and row["n"] == 5 and row["no_answer"] == 2
    assert row["mean_vas"] is None and row["band"] == "-"


def test_bad_benchmark_stops_before_generation(parts, tmp_path, monkeypatch):
    model, tok, proc = parts
    calls = count_prompts(monkeypatch, model)
    bad = tmp_path / "Bad.tsv"
    good = base64.b64encode(png((1, 2, 3))).decode()
    bad.write_text("index\tquestion\tanswer\timage\n1\tq\t1\t" + good + "\n2\tq\t2\tnot-base64!!\n")
    with pytest.raises(ValueError, match=r"Bad.tsv: row 2"):
        E.evaluate(model, tok, proc, [bad], tmp_path / "out", progress=False, weights=TINY)
    assert calls == []


# ------------------------------------------------------------------------------------ Pearson r

def test_pearson_hand_computed():
    # x = 1..4, y = 2, 4, 5, 9: sum dx dy = 11, sum dx^2 = 5, sum dy^2 = 26 -> r = 11 / sqrt(130)
    res = E.pearson([1, 2, 3, 4], [2, 4, 5, 9])
    assert res["n"] == 4 and res["r"] == pytest.approx(11 / math.sqrt(130), abs=1e-12)
    # with 2 degrees of freedom the t distribution gives p = 1 - |r| exactly
    assert res["p"] == pytest.approx(1 - 11 / math.sqrt(130), abs=1e-12)
    # 1 degree of freedom (Cauchy): p = 1 - (2 / pi) atan(|t|), t = r sqrt(1 / (1 - r^2))
    r = 0.8
    assert V.pearson_p(r, 3) == pytest.approx(1 - 2 / math.pi * math.atan(r / math.sqrt(1 - r * r)), abs=1e-12)
    # the t table: two-sided 5% critical value at 10 degrees of freedom is 2.228139
    t = 2.228139
    assert V.pearson_p(t / math.sqrt(t * t + 10), 12) == pytest.approx(0.05, abs=1e-6)
    # the paper: r = 0.9616 over 10 models gives p = 9.0e-6
    assert V.pearson_p(0.9616, 10) == pytest.approx(9.0e-6, rel=0.02)
    rng = np.random.default_rng(0)
    x = rng.normal(size=20)
    y = 0.5 * x + rng.normal(size=20)
    assert E.pearson(x, y)["r"] == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
    assert E.pearson([1, 2, 3], [5, 5, 5])["r"] is None and E.pearson([1], [2])["r"] is None
    assert E.pearson([1, 2, 3], [3, 2, 1]) == {"r": -1.0, "p": 0.0, "n": 3}


def test_correlate_cli(tmp_path, capsys):
    # three "checkpoints": accuracy 25/50/100 %, mean VAS 7.5/10/20
    specs = [([1, 0, 0, 0], [7, 8, 7, 8]), ([1, 1, 0, 0], [9, 11, 9, 11]), ([1, 1, 1, 1], [20, 19, 21, 20])]
    paths = []
    for i, (correct, vas) in enumerate(specs):
        p = tmp_path / f"ckpt{i}.jsonl"
        p.write_text("".join(json.dumps({"id": str(j), "correct": bool(c), "vas": v, "extracted": "x"}) + "\n"
                             for j, (c, v) in enumerate(zip(correct, vas))))
        paths.append(str(p))
    res = E.main(["--correlate", *paths, "--out", str(tmp_path / "corr")])
    acc, mv = [25.0, 50.0, 100.0], [7.5, 10.0, 20.0]
    assert [f["accuracy"] for f in res["files"]] == acc and [f["mean_vas"] for f in res["files"]] == mv
    assert res["r"] == pytest.approx(np.corrcoef(mv, acc)[0, 1], abs=1e-12) and res["n"] == 3
    assert "Pearson r" in capsys.readouterr().out
    saved = json.loads((tmp_path / "corr" / "correlation.json").read_text())
    assert saved["r"] == pytest.approx(res["r"])


# ------------------------------------------------------------------------------------ the weights a number belongs to

def nudged_copy(src, dst):
    """A copy of model folder `src` in which one weight differs, by 1e-3."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    sd = load_file(str(dst / "model.safetensors"))
    sd["lm_head.weight"][0, 0] += 1e-3
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def cli_args(model, out, bench):
    return ["--model", str(model), "--bench", str(bench), "--out", str(out), "--limit", "2", "--max-new-tokens", "2",
            "--no-vas", "--no-progress", "--device", "cpu"]


def test_two_models_into_one_folder(model_dir, benches, tmp_path, monkeypatch):
    """Model B (one weight differs from A's by 1e-3) evaluated into A's folder is refused, naming
    both checkpoints, before anything is generated or written (so is A with another config: a
    UserError, one line at the command line); into its own folder it gets its own
    rows. A's folder copied elsewhere (the same bytes) reuses A's answers; --correlate names the
    checkpoint of each file."""
    a, b = model_dir, nudged_copy(model_dir, tmp_path / "b")
    out, bench = tmp_path / "r", benches[1]
    E.main(cli_args(a, out, bench))
    preds = out / "predictions" / "tiny_geo__base.jsonl"
    written = {p: p.read_bytes() for p in (preds, out / "summary.json", out / "summary.md")}
    sha_a, sha_b = hub.model_identity(str(a))["sha256"], hub.model_identity(str(b))["sha256"]
    assert sha_a != sha_b
    with pytest.raises(UserError) as e:
        E.main(cli_args(b, out, bench))
    assert str(e.value) == (f"{preds}: id 'q0' was made by the weights of {a} (sha256 {sha_a[:12]}); this run "
                            f"evaluates {b} (sha256 {sha_b[:12]}): choose another --out folder, or delete {preds} "
                            "to start afresh")
    assert {p: p.read_bytes() for p in written} == written  # not a byte written
    with pytest.raises(UserError, match="was made with config"):  # the same weights, another config
        E.main(cli_args(a, out, bench) + ["--max-new-tokens", "3"])
    assert {p: p.read_bytes() for p in written} == written
    (row,) = E.main(cli_args(b, tmp_path / "r_b", bench))
    assert row["weights"] == {"folder": str(b), "sha256": sha_b}

    def no_generation(*a, **k):
        raise AssertionError("generated")

    monkeypatch.setattr(Qwen2_5_VL, "generate", no_generation)
    shutil.copytree(a, tmp_path / "a_copy")
    (row,) = E.main(cli_args(tmp_path / "a_copy", out, bench))
    assert row["weights"] == {"folder": str(tmp_path / "a_copy"), "sha256": sha_a} and row["n"] == 2
    assert preds.read_bytes() == written[preds]

    res = E.correlate([preds, tmp_path / "r_b" / "predictions" / "tiny_geo__base.jsonl"])
    assert [f["weights"] for f in res["files"]] == [{"folder": str(a), "sha256": sha_a},
                                                    {"folder": str(b), "sha256": sha_b}]
    table = E.correlation_table(res)
    assert f"| {a} (sha256 {sha_a[:12]}) |" in table and f"| {b} (sha256 {sha_b[:12]}) |" in table
    mixed = tmp_path / "mixed.jsonl"  # put together by hand: refused, not averaged
    mixed.write_bytes(preds.read_bytes() + (tmp_path / "r_b" / "predictions" / "tiny_geo__base.jsonl").read_bytes())
    with pytest.raises(UserError, match="made by 2 different checkpoints"):
        E.correlate([mixed])


def test_latest_moved_on_is_refused(model_dir, parts, benches, tmp_path):
    """`evaluate.py --model runs/x` again after `latest` moved to a newer step: the command ends
    with one `error:` line naming both steps, status 1, no traceback. A predictions file from an
    older evaluate.py (no "weights") is refused too."""
    run_dir, out, bench = tmp_path / "runs" / "x", tmp_path / "r", benches[1]
    shutil.copytree(model_dir, run_dir / "step_1")
    (run_dir / "latest").write_text("step_1\n")
    (row,) = E.main(cli_args(run_dir, out, bench))
    assert row["weights"]["folder"] == str(run_dir / "step_1")
    nudged_copy(model_dir, run_dir / "step_2")
    (run_dir / "latest").write_text("step_2\n")
    p = subprocess.run([sys.executable, str(Path(E.__file__)), *cli_args(run_dir, out, bench)], capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    err = p.stderr.strip().splitlines()
    assert p.returncode == 1 and "Traceback" not in p.stderr and len(err) == 1, p.stderr
    assert err[0].startswith(f"error: {out / 'predictions' / 'tiny_geo__base.jsonl'}: id 'q0' was made by the "
                             f"weights of {run_dir / 'step_1'} (sha256 ") and f"evaluates {run_dir / 'step_2'}" in err[0]

    old = tmp_path / "old.jsonl"
    old.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "weights"}) + "\n"
                           for r in lines(out / "predictions" / "tiny_geo__base.jsonl")))
    with pytest.raises(UserError, match="was made by weights it does not name"):
        run(parts, E.read_benchmark(bench)[:2], old, vas=False, max_new_tokens=2,
            weights=hub.model_identity(str(run_dir)))


def test_sampling_is_reproducible_from_the_seed(parts, benches, tmp_path):
    records = E.read_benchmark(benches[1])
    kw = dict(batch_size=2, temperature=1.0, top_p=0.9, vas=False, max_new_tokens=8)
    run(parts, records, tmp_path / "a.jsonl", seed=3, **kw)
    run(parts, records, tmp_path / "b.jsonl", seed=3, **kw)
    run(parts, records, tmp_path / "c.jsonl", seed=4, **kw)
    a, b, c = ([r["response"] for r in lines(tmp_path / f"{x}.jsonl")] for x in "abc")
    assert a == b and a != c


# ------------------------------------------------------------------------------------ reasoning tags as special tokens

TAGS = ("<think>", "</think>", "<answer>", "</answer>")


@pytest.fixture(scope="module")
def tagged_dir(model_dir, tmp_path_factory):
    """The model folder with the four reasoning tags added as special tokens, written by the
    tokenizers library as the paper's released tokenizer has them (added_tokens, "special": true)."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTokenizer

    d = tmp_path_factory.mktemp("tagged")
    shutil.copytree(model_dir, d, dirs_exist_ok=True)
    hf = HFTokenizer.from_file(str(d / "tokenizer.json"))
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in TAGS])
    hf.save(str(d / "tokenizer.json"))
    added = {t["content"]: t for t in json.loads((d / "tokenizer.json").read_text())["added_tokens"]}
    assert all(added[t]["special"] is True for t in TAGS)
    return d


def fake_generate_for(tok, responses):
    """A model.generate stand-in: for each prompt, the ids of the response whose key occurs in the
    prompt text, then <|im_end|>, right-padded."""
    def generate(prompts, pixel_values=None, image_grid_thw=None, *, max_new_tokens, pad_id, num_samples=1, **kw):
        rows = []
        for p in prompts:
            text = tok.decode(p)
            (response,) = [r for key, r in responses.items() if key in text]
            rows += [(tok.encode(response) + [tok.im_end_id])[:max_new_tokens]] * num_samples
        out = torch.full((len(rows), max_new_tokens), pad_id)
        for b, ids in enumerate(rows):
            out[b, :len(ids)] = torch.tensor(ids)
        return out, torch.tensor([len(ids) for ids in rows])
    return generate


def test_decode_response_keeps_special_reasoning_tags(tagged_dir):
    tok = Tokenizer(str(tagged_dir))
    assert all(len(tok.encode(t)) == 1 for t in TAGS)  # each tag is one added token
    response = "<think>The square is red.</think><answer>A</answer>"
    ids = tok.encode(response) + [tok.im_end_id, tok.pad_id, tok.pad_id]
    assert tok.decode_response(ids) == response
    assert tok.decode_response(torch.tensor([tok.im_start_id] + ids)) == response
    # what skip_special_tokens=True gives: no tags, so no answer and no format reward
    stripped = tok.decode(ids, skip_special_tokens=True)
    assert stripped == "The square is red.A" and E.extract_answer(stripped) is None
    assert not grading.format_ok(stripped) and grading.format_ok(tok.decode_response(ids))


def test_evaluation_scores_tagged_responses(parts, tagged_dir, benches, tmp_path, monkeypatch):
    model, _, proc = parts
    tok = Tokenizer(str(tagged_dir))
    records = E.read_benchmark(benches[0])
    responses = {r["question"]: f"<think>looked</think><answer>{r['answer']}</answer>" for r in records}
    monkeypatch.setattr(model, "generate", fake_generate_for(tok, responses))
    row = E.evaluate_benchmark(model, tok, proc, records, tmp_path / "p.jsonl", max_new_tokens=32, vas=False,
                               progress=False, weights=TINY)
    recs = lines(tmp_path / "p.jsonl")
    assert row["accuracy"] == 100.0 and all(r["correct"] for r in recs)
    assert [r["response"] for r in recs] == [responses[q["question"]] for q in records]
    # the decode the loop used before: every answer lost
    old = [tok.decode(tok.encode(responses[q["question"]]), skip_special_tokens=True) for q in records]
    assert not any(E.grade(E.extract_answer(t), q["answer"], q["options"], q["answer_type"])
                   for t, q in zip(old, records))


def test_grpo_rewards_of_tagged_responses(tagged_dir):
    import train_grpo as tg

    tok = Tokenizer(str(tagged_dir))
    model = torch.nn.Linear(1, 1)  # generate_rollouts reads only its device
    model.generate = fake_generate_for(tok, {"Q": "<think>2+3</think><answer>5</answer>"})
    ids = torch.tensor(tok.encode("Q"))
    encs = [{"input_ids": ids, "roles": torch.zeros_like(ids), "pixel_values": None, "image_grid_thw": None,
             "record": {"answer": "5", "options": [], "answer_type": "integer"}}]
    ro = tg.generate_rollouts(model, tok, encs, [0], 2, max_new_tokens=24, temperature=1.0, top_p=1.0, seed=0)
    assert ro.texts == ["<think>2+3</think><answer>5</answer>"] * 2
    acc, fmt = tg.accuracy_and_format(ro.texts, ro.records)
    assert acc.tolist() == [1.0, 1.0] and fmt.tolist() == [1.0, 1.0]
    assert tg.total_reward(acc, torch.zeros(2), fmt).tolist() == pytest.approx([1.1, 1.1])


# ------------------------------------------------------------------------------------ MathVista, test splits

def read_table(path):
    import csv
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def test_mathvista_groups_and_prediction_table(parts, tmp_path, monkeypatch):
    from test_benchmarks_io import MATHVISTA_HEADER, mathvista_rows, write_tsv as write_rows

    model, tok, proc = parts
    path = write_rows(tmp_path / "MathVista_MINI.tsv", mathvista_rows(), MATHVISTA_HEADER)
    responses = {"fraction of the shape": "<think>8 of 11</think><answer>(B) 8/11</answer>",
                 "Luca": "<think>sum</think><answer>\n$1.449\n</answer>",  # precision 2, unit $
                 "perimeter": "<think>2(3+4)</think><answer>15 cm</answer>",
                 "taller": "<think>\t\"twin\"</think><answer>B</answer>"}
    monkeypatch.setattr(model, "generate", fake_generate_for(tok, responses))
    (row,) = E.evaluate(model, tok, proc, [path], tmp_path / "out", progress=False, vas=False, max_new_tokens=64,
                        weights=TINY)
    assert row["accuracy"] == 75.0 and row["unscored"] == 0
    groups = row["groups"]
    assert groups["task"] == {"figure question answering": {"n": 1, "accuracy": 100.0},
                              "geometry problem solving": {"n": 1, "accuracy": 0.0},
                              "math word problem": {"n": 2, "accuracy": 100.0}}
    # a question counts in each of its skills
    assert groups["skills"]["arithmetic reasoning"] == {"n": 2, "accuracy": 100.0}
    assert groups["skills"]["geometry reasoning"] == {"n": 1, "accuracy": 0.0}
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "| MathVista_MINI | base | skills | numeric commonsense | 1 | 100.00 |" in md
    # the VLMEvalKit-style table beside the jsonl, read back as a TSV (quoted tabs, newlines, quotes)
    table = read_table(tmp_path / "out" / "predictions" / "MathVista_MINI__base.tsv")
    assert [t["index"] for t in table] == ["1", "2", "3", "4"]
    assert [t["hit"] for t in table] == ["1", "1", "0", "1"] and table[0]["answer"] == "B"
    assert [t["prediction"] for t in table] == list(responses.values())
    assert table[0]["question"] == E.read_benchmark(path)[0]["question"] and table[1]["extracted"] == "$1.449"


def test_answerless_split_is_predicted_not_scored(parts, tmp_path, monkeypatch):
    model, tok, proc = parts
    img = base64.b64encode(png((5, 5, 5))).decode()
    path = tmp_path / "MMBench_TEST_EN.tsv"
    path.write_text("index\tquestion\tA\tB\tcategory\timage\n" + "".join(
        f"{i}\tQuestion {i}?\tx\ty\t{'ocr' if i else 'scene'}\t{img if i == 0 else '0'}\n" for i in range(3)))
    monkeypatch.setattr(model, "generate", fake_generate_for(tok, {"Question": "<think>t</think><answer>A</answer>"}))
    (row,) = E.evaluate(model, tok, proc, [path], tmp_path / "out", progress=False, vas=False, max_new_tokens=64,
                        weights=TINY)
    recs = lines(tmp_path / "out" / "predictions" / "MMBench_TEST_EN__base.jsonl")
    assert [r["id"] for r in recs] == ["0", "1", "2"] and all(r["extracted"] == "A" for r in recs)
    assert all(r["answer"] is None and r["correct"] is None for r in recs)
    assert row["n"] == 3 and row["unscored"] == 3 and row["accuracy"] is None
    assert row["groups"]["category"] == {"ocr": {"n": 2, "accuracy": None}, "scene": {"n": 1, "accuracy": None}}
    assert "| MMBench_TEST_EN | base | 3 | - |" in (tmp_path / "out" / "summary.md").read_text()
    table = read_table(tmp_path / "out" / "predictions" / "MMBench_TEST_EN__base.tsv")
    assert [(t["answer"], t["hit"]) for t in table] == [("", "")] * 3


def test_summary_bands_are_the_papers():
    """The band of a mean VAS, at the paper's edges: "narrow view" < 10, "wide view" 10-15,
    "panoramic" > 15; "-" where no prediction has a finite VAS."""
    def band(*vas):
        return E.summarize([{"vas": v, "correct": True, "extracted": "A"} for v in vas])["band"]

    assert [band(9.99), band(10.0), band(15.0), band(15.01)] == ["narrow", "wide", "wide", "panoramic"]
    assert band(8.0, 12.0) == "wide" and band(None) == "-" and band(float("inf")) == "-"
    row = {"benchmark": "b", "setting": "base", "n": 1, "accuracy": 100.0, "mean_vas": 16.0, "band": "panoramic"}
    assert E.summary_table([row, dict(row, benchmark="c", mean_vas=4.0, band="narrow")]).splitlines()[-1] == \
        "| mean | base | 2 | 100.00 | 10.00 | wide | - |"
