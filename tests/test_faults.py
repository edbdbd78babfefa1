"""Faults a long run meets: images that pass validation but do not decode, SIGKILL, a diverging loss.

train_sft.py and train_grpo.py on CPU with tiny models and a few records; evaluate.py on the same
model. The damaged images are real pillow-written PNG and JPEG files cut short: their headers read
(so the default `--check-images header` validation passes them) but their pixels do not decode.
Each resumed or skipping run is compared with an uninterrupted run of the same seed, record by
record (the batch indices and the sampled completions are logged by the test, not by the code).
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate as E
import hub
import train_grpo as tg
import train_sft
import training
from data import DataError, ImageProcessor, SFTDataset, Tokenizer
from training import epoch_batches, micro_batches
from model import from_pretrained
from test_grpo import make_model_dir, token_parity_reward

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLORS = ["red", "green", "blue"]
TIMING = ("tokens_per_s", "time_rollout", "time_reward", "step_time", "gen_tokens_per_s", "train_tokens_per_s")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def save_image(path, seed, fmt):
    """A 56x56 noisy image (4 image tokens), so that a cut file still has its header but not its pixels."""
    arr = np.random.default_rng(seed).integers(0, 256, (56, 56, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, format=fmt)


def truncate(path, keep=0.6):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:int(len(data) * keep)])


def read_metrics(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def strip(row):
    return {k: v for k, v in row.items() if k not in TIMING}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("faults_model") / "model")


@pytest.fixture(scope="module")
def sft_world(model, tmp_path_factory):
    """8 SFT records with one image each. Step 2 (batch 4, micro-batches of 2) starts with a
    micro-batch whose two images are a cut PNG and a cut JPEG: a micro-batch with no record left."""
    root = tmp_path_factory.mktemp("sft_faults")
    os.makedirs(root / "img")
    records = [{"image": f"img/{i}.png", "question": "Which color?", "response": f"<answer>{COLORS[i % 3]}</answer>"}
               for i in range(8)]
    for i in range(8):
        save_image(root / "img" / f"{i}.png", i, "PNG")
    data = root / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    # the order does not depend on the image format (lengths only): choose the records, then damage them
    ds = SFTDataset(str(data), Tokenizer(model), ImageProcessor.from_pretrained(model))
    step2 = epoch_batches(ds.lengths, 4, 0, 0)[1]
    bad_png, bad_jpg = micro_batches(step2, 2)[0]
    records[bad_jpg]["image"] = f"img/{bad_jpg}.jpg"
    save_image(root / "img" / f"{bad_jpg}.jpg", bad_jpg, "JPEG")
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    truncate(root / "img" / f"{bad_png}.png")
    truncate(root / "img" / f"{bad_jpg}.jpg")
    bad = {bad_png: str(root / "img" / f"{bad_png}.png"), bad_jpg: str(root / "img" / f"{bad_jpg}.jpg")}
    return {"root": root, "model": model, "data": str(data), "bad": bad}


def sft_args(w, out, *extra, workers=0):
    return ["--data", w["data"], "--model", w["model"], "--out", str(out), "--batch-size", "4", "--micro-batch", "2",
            "--max-steps", "4", "--lr", "2e-3", "--num-workers", str(workers), "--dtype", "fp32",
            "--save-every", "2", "--device", "cpu", *extra]


def log_batches(monkeypatch, log):
    """Record the dataset indices of every micro-batch each optimizer step trains on."""
    real = train_sft.forward_backward

    def logged(model, mbs, *a, **k):
        log.append([mb["index"] for mb in mbs])
        return real(model, mbs, *a, **k)

    monkeypatch.setattr(train_sft, "forward_backward", logged)


@pytest.fixture(scope="module")
def sft_reference(sft_world, tmp_path_factory):
    """The uninterrupted --skip-bad run (2 data-loader workers), with the batches it trained on."""
    mp = pytest.MonkeyPatch()
    log = []
    log_batches(mp, log)
    out = tmp_path_factory.mktemp("sft_ref")
    try:
        res = train_sft.main(sft_args(sft_world, out, "--skip-bad", workers=2))
    finally:
        mp.undo()
    return {"out": str(out), "metrics": [strip(r) for r in res["metrics"]], "batches": log}


# --------------------------------------------------------------------------------------------
# images that pass validation but do not decode
# --------------------------------------------------------------------------------------------


def test_sft_skip_bad_skips_undecodable_images_and_counts_them(sft_world, sft_reference):
    """Every step trains on exactly the records of its batch whose images decode, and counts the
    others in metrics.jsonl (step 2's first micro-batch keeps none); the run with data-loader
    workers equals the one without."""
    m = sft_reference["metrics"]
    bad = set(sft_world["bad"])
    lengths = SFTDataset(sft_world["data"], Tokenizer(sft_world["model"]),
                         ImageProcessor.from_pretrained(sft_world["model"])).lengths
    batches = [b for e in range(2) for b in epoch_batches(lengths, 4, 0, e)]
    assert [r["step"] for r in m] == [1, 2, 3, 4]
    assert [r["skipped"] for r in m] == [len(set(b) & bad) for b in batches]
    assert m[1]["skipped"] == 2 and sum(r["skipped"] for r in m) == 4
    trained = [sorted(i for mb in step for i in mb) for step in sft_reference["batches"]]
    assert trained == [sorted(set(b) - bad) for b in batches]
    assert [r["n_image_samples"] for r in m] == [len(t) for t in trained]
    assert all(np.isfinite(r["loss"]) for r in m)
    no_workers = train_sft.main(sft_args(sft_world, sft_world["root"] / "w0", "--skip-bad", workers=0))
    assert [strip(r) for r in no_workers["metrics"]] == m


def test_sft_undecodable_image_saves_checkpoint_and_stops(sft_world, sft_reference, tmp_path):
    """Without --skip-bad: step 2 stops before its update with one DataError naming the file, after
    saving step_1 (not a save step); resuming with --skip-bad gives the uninterrupted run's steps."""
    out = tmp_path / "stop"
    with pytest.raises(DataError, match=r"step 2: .*cannot decode image") as e:
        train_sft.main(sft_args(sft_world, out, workers=2))
    assert any(p in str(e.value) for p in sft_world["bad"].values()) and "step_1" in str(e.value)
    assert (out / "latest").read_text().strip() == "step_1"
    assert [r["step"] for r in read_metrics(out)] == [1]
    res = train_sft.main(sft_args(sft_world, out, "--skip-bad", "--resume", workers=2))
    assert [strip(r) for r in res["metrics"]] == sft_reference["metrics"][1:]


def test_sft_two_processes_skip_like_one(sft_world, sft_reference, tmp_path):
    """torchrun, 2 processes (FSDP2, gloo): in step 2 process 0's only micro-batch has no record
    left (both images cut) while process 1's has two; process 0 runs its one-token stand-in, the
    collectives stay in step, and the losses equal the one-process run's."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "train_sft.py")] + sft_args(sft_world, tmp_path / "dist", "--skip-bad")
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-4000:]
    got, ref = read_metrics(tmp_path / "dist"), sft_reference["metrics"]
    assert [r["skipped"] for r in got] == [r["skipped"] for r in ref]
    for a, b in zip(got, ref):
        assert a["n_tokens"] == b["n_tokens"] and a["n_image_samples"] == b["n_image_samples"]
        for k in ("loss", "lm_loss", "enhance", "suppress"):
            assert abs(a[k] - b[k]) <= 1e-5 * abs(b[k]), (a["step"], k, a[k], b[k])


def test_cli_stops_with_one_message(sft_world, tmp_path):
    """The command line: the undecodable image, and a diverging run (--lr 1e30), each end with one
    `error:` line, no traceback, a non-zero status, and `latest` on the last good checkpoint."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, os.path.join(ROOT, "train_sft.py")]
    p = subprocess.run(cmd + sft_args(sft_world, tmp_path / "a", workers=1), env=env, capture_output=True,
                       text=True, timeout=300, cwd=ROOT)
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert last.startswith("error: step 2: ") and any(f in last for f in sft_world["bad"].values()), last
    assert (tmp_path / "a" / "latest").read_text().strip() == "step_1"

    p = subprocess.run(cmd + sft_args(sft_world, tmp_path / "b", "--skip-bad", "--lr", "1e30", "--save-every", "1",
                                      "--max-steps", "8"),
                       env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    step = int(last.split("error: step ")[1].split(":")[0])
    assert "non-finite loss" in last and step >= 2, last
    assert (tmp_path / "b" / "latest").read_text().strip() == f"step_{step - 1}"
    assert f"step_{step - 1}" in last


# ---- GRPO and evaluation ----


@pytest.fixture(scope="module")
def rl_world(model, tmp_path_factory):
    """8 RL prompts with one image each; prompt 5's image is a cut JPEG."""
    root = tmp_path_factory.mktemp("rl_faults")
    os.makedirs(root / "img")
    records = []
    for i in range(8):
        fmt = "JPEG" if i == 5 else "PNG"
        name = f"img/{i}.{fmt.lower()}"
        save_image(root / name, 100 + i, fmt)
        records.append({"id": f"r{i}", "images": [name], "question": "What color?", "answer": COLORS[i % 3]})
    truncate(root / "img" / "5.jpeg")
    data = root / "rl.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    return {"root": root, "model": model, "data": str(data), "bad": str(root / "img" / "5.jpeg")}


def grpo_args(w, out, steps, *extra):
    return ["--data", w["data"], "--model", w["model"], "--out", str(out), "--prompts-per-step", "2",
            "--group-size", "3", "--max-new-tokens", "5", "--micro-batch", "3", "--max-steps", str(steps),
            "--lr", "3e-3", "--save-every", "2", "--device", "cpu", "--dtype", "fp32", "--kl-coef", "0.05", *extra]


def logging_reward(log):
    """token_parity_reward, and a log of each step's prompts and sampled completions."""
    def reward(ro):
        log.append({"ids": [r["id"] for r in ro.records], "completions": ro.completions.tolist(),
                    "lengths": ro.lengths.tolist()})
        return token_parity_reward(ro)
    return reward


def bad_grpo_step(w):
    """The steps (1-based, two epochs) whose prompts include the one with the cut image."""
    lengths = tg.PromptDataset(w["data"], Tokenizer(w["model"]), ImageProcessor.from_pretrained(w["model"])).lengths
    steps = [b for e in range(2) for b in epoch_batches(lengths, 2, 0, e, group_by_length=False)]
    return [s + 1 for s, b in enumerate(steps) if 5 in b]


def test_grpo_undecodable_prompt_image(rl_world, tmp_path):
    """--skip-bad: the prompt is left out of its step and counted; without it the run saves a
    checkpoint and stops naming the file; resuming with --skip-bad equals the uninterrupted run."""
    n = 5
    bad_steps = [s for s in bad_grpo_step(rl_world) if s <= n]
    assert bad_steps and bad_steps[0] > 1
    log = []
    ref = tg.main(grpo_args(rl_world, tmp_path / "ref", n, "--skip-bad"), reward_fn=logging_reward(log))
    assert [r["skipped"] for r in ref["metrics"]] == [int(s + 1 in bad_steps) for s in range(n)]
    assert all("r5" not in step["ids"] for step in log)
    assert [len(step["ids"]) for step in log] == [3 * (2 - int(s + 1 in bad_steps)) for s in range(n)]

    out = tmp_path / "stop"
    with pytest.raises(DataError, match=rf"step {bad_steps[0]}: .*{rl_world['bad']}"):
        tg.main(grpo_args(rl_world, out, n), reward_fn=token_parity_reward)
    assert (out / "latest").read_text().strip() == f"step_{bad_steps[0] - 1}"
    res = tg.main(grpo_args(rl_world, out, n, "--skip-bad", "--resume"), reward_fn=token_parity_reward)
    assert [strip(r) for r in res["metrics"]] == [strip(r) for r in ref["metrics"][bad_steps[0] - 1:]]


def test_grpo_and_evaluate_cli_stop_with_one_message(rl_world, tmp_path):
    """The command lines of GRPO and evaluation on the prompt whose image does not decode: one
    `error:` line naming it, no traceback, status 1; GRPO saved the steps done, evaluation kept the
    batches answered before."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first_bad = bad_grpo_step(rl_world)[0]
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train_grpo.py")] + grpo_args(rl_world, tmp_path / "g", 5),
                       env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert last.startswith(f"error: step {first_bad}: ") and rl_world["bad"] in last, last
    assert (tmp_path / "g" / "latest").read_text().strip() == f"step_{first_bad - 1}"

    p = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), "--model", rl_world["model"], "--bench",
                        rl_world["data"], "--out", str(tmp_path / "e"), "--batch-size", "2", "--max-new-tokens", "2",
                        "--no-vas", "--no-progress", "--device", "cpu"],
                       env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert last.startswith("error: rl: id 'r5'") and rl_world["bad"] in last, last
    preds = E.read_predictions(tmp_path / "e" / "predictions" / "rl__base.jsonl")
    assert [r["id"] for r in preds] == ["r0", "r1", "r2", "r3"]


def test_grpo_nonfinite_loss_stops_on_last_good_checkpoint(rl_world, tmp_path, monkeypatch):
    """Step 3's policy loss is NaN: the run stops before that update with NonFiniteLoss naming
    step_2, which `latest` names; metrics.jsonl holds steps 1 and 2."""
    real, real_step, step_of = tg.policy_loss, tg.grpo_step, {"now": 0}

    def poisoned(*a, **k):
        loss, m = real(*a, **k)
        return (loss * float("nan"), m) if step_of["now"] == 3 else (loss, m)

    def counting(*a, **k):
        step_of["now"] += 1
        return real_step(*a, **k)

    monkeypatch.setattr(tg, "policy_loss", poisoned)
    monkeypatch.setattr(tg, "grpo_step", counting)
    out = tmp_path / "nan"
    with pytest.raises(training.NonFiniteLoss, match=r"step 3: non-finite") as e:
        tg.main(grpo_args(rl_world, out, 4, "--skip-bad"), reward_fn=token_parity_reward)
    assert str(out / "step_2") in str(e.value)
    assert (out / "latest").read_text().strip() == "step_2" and not (out / "step_3").exists()
    assert [r["step"] for r in read_metrics(out)] == [1, 2]


def test_evaluate_undecodable_image(rl_world, tmp_path):
    """A benchmark row whose image passes the reader's check (a cut JPEG: PIL's verify reads only its
    headers) but does not decode: without skip_bad the run stops naming it and keeps the batches
    already written; with it the row is counted as skipped and the others are answered."""
    model = from_pretrained(rl_world["model"], dtype=torch.float32).eval()
    tok, proc = Tokenizer(rl_world["model"]), ImageProcessor.from_pretrained(rl_world["model"])
    records = E.read_benchmark(rl_world["data"])  # the cut JPEG passes the reader
    assert [r["id"] for r in records] == [f"r{i}" for i in range(8)]
    out = tmp_path / "preds.jsonl"
    kw = dict(batch_size=2, max_new_tokens=3, progress=False, vas=False,
              weights=hub.model_identity(rl_world["model"]))
    with pytest.raises(DataError, match=r"id 'r5'.*5\.jpeg"):
        E.evaluate_benchmark(model, tok, proc, records, out, **kw)
    assert [p["id"] for p in E.read_predictions(out)] == ["r0", "r1", "r2", "r3"]  # batches before r5's
    row = E.evaluate_benchmark(model, tok, proc, records, out, skip_bad=True, **kw)
    assert row["n"] == 7 and row["skipped"] == 1
    assert sorted(p["id"] for p in E.read_predictions(out)) == [f"r{i}" for i in range(8) if i != 5]


# --------------------------------------------------------------------------------------------
# SIGKILL and exact resume
# --------------------------------------------------------------------------------------------

RUNNER = """
import json, os, sys, time
sys.path.insert(0, {root!r})
sys.path.insert(0, os.path.join({root!r}, "tests"))
sys.path.insert(0, os.path.join({root!r}, "experiments"))
import {module} as m
# hang (to be killed) when step {hang} starts, after step {hang_prev} was logged and written
real, calls = m.{func}, [0]
def hanging(*a, **k):
    calls[0] += 1
    if calls[0] == {hang}:
        open(os.environ["HANG_FILE"], "w").close()
        time.sleep(600)
    return real(*a, **k)
m.{func} = hanging
{extra}
"""


def kill_at(tmp_path, module, func, hang, argv, extra=""):
    """Run `module`.main(argv) in a subprocess, SIGKILL it when its `func` is called the `hang`-th time."""
    script = tmp_path / "runner.py"
    script.write_text(RUNNER.format(root=ROOT, module=module, func=func, hang=hang, hang_prev=hang - 1, extra=extra))
    hang_file = tmp_path / "hanging"
    env = dict(os.environ, OMP_NUM_THREADS="1", HANG_FILE=str(hang_file), ARGV=json.dumps(argv))
    p = subprocess.Popen([sys.executable, str(script)], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not hang_file.exists():
        assert p.poll() is None, p.stderr.read()[-3000:]
        assert time.time() < deadline, "the run never reached the kill point"
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=60)
    p.stderr.close()
    assert p.returncode == -signal.SIGKILL


# Kill-and-resume settings: the default (a save every 2 steps, killed as step 4 starts, resumed
# from step_2); and a save every step under --keep-last 1 with a --save-dtype, killed as step 3
# starts: the resumed run's first save removes step_2, the checkpoint it loaded, and its next
# saves still need that folder's dtype and hub files.
KILLS = {"default": ([], 4), "keep-last": (["--save-every", "1", "--keep-last", "1"], 3)}
HUB_CARRIED = ["config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json",
               "tokenizer_config.json"]


def check_kept_last(out, step, save_dtype):
    """Only step_N is left, a complete model folder with its hub files and weights in `save_dtype`."""
    assert sorted(f for f in os.listdir(out) if f.startswith("step_")) == [f"step_{step}"]
    assert os.listdir(out / "train_state") == [f"step_{step}.pt"]
    assert sorted(os.listdir(out / f"step_{step}")) == HUB_CARRIED
    header = hub.read_safetensors_header(str(out / f"step_{step}" / "model.safetensors"))[0]
    assert {m["dtype"] for m in header.values()} == {save_dtype}


@pytest.mark.parametrize("kill", KILLS)
def test_sft_sigkill_then_resume_equals_uninterrupted_run(sft_world, sft_reference, tmp_path, monkeypatch, kill):
    """Killed with SIGKILL as a step starts (the last checkpoint step_2 written, the step after it
    logged in metrics.jsonl when it was not a save step), then resumed: the metrics and the records
    of every step equal the uninterrupted run's, with two data-loader workers and the undecodable
    images skipped in both. Under --keep-last 1 --save-dtype bf16 the run ends with step_4 alone,
    in bf16 with the source's hub files."""
    extra, hang = KILLS[kill]
    out = tmp_path / "run"
    argv = sft_args(sft_world, out, "--skip-bad", *extra, *(["--save-dtype", "bf16"] if extra else []), workers=2)
    kill_at(tmp_path, "train_sft", "forward_backward", hang, argv, "m.main(json.loads(os.environ['ARGV']))")
    assert (out / "latest").read_text().strip() == "step_2"
    assert [r["step"] for r in read_metrics(out)] == list(range(1, hang))
    log = []
    log_batches(monkeypatch, log)
    res = train_sft.main(argv + ["--resume"])
    assert [r["step"] for r in res["metrics"]] == [3, 4]
    assert [strip(r) for r in read_metrics(out)] == sft_reference["metrics"]
    assert log == sft_reference["batches"][2:]
    if extra:
        check_kept_last(out, 4, "BF16")


GRPO_EXTRA = """
from test_grpo import token_parity_reward
log = open(os.environ["ROLLOUT_LOG"], "a")
def reward(ro):
    log.write(json.dumps({"ids": [r["id"] for r in ro.records], "completions": ro.completions.tolist(),
                          "lengths": ro.lengths.tolist()}) + "\\n")
    log.flush()
    return token_parity_reward(ro)
m.main(json.loads(os.environ["ARGV"]), reward_fn=reward)
"""


@pytest.mark.parametrize("kill", KILLS)
def test_grpo_sigkill_then_resume_equals_uninterrupted_run(rl_world, tmp_path, monkeypatch, kill):
    """Killed with SIGKILL as a step starts (step_2 written, the step after it logged when it was
    not a save step), then resumed: metrics, prompts and sampled completions of every step equal
    those of the uninterrupted run. Under --keep-last 1 (--save-dtype auto: the float32 of the
    source's config.json) the run ends with step_5 alone, with the source's hub files."""
    extra, hang = KILLS[kill]
    n = 5
    ref_log = []
    ref = tg.main(grpo_args(rl_world, tmp_path / "ref", n, "--skip-bad"), reward_fn=logging_reward(ref_log))
    out = tmp_path / "run"
    argv = grpo_args(rl_world, out, n, "--skip-bad", *extra)
    monkeypatch.setenv("ROLLOUT_LOG", str(tmp_path / "rollouts.jsonl"))
    kill_at(tmp_path, "train_grpo", "grpo_step", hang, argv, GRPO_EXTRA)
    assert (out / "latest").read_text().strip() == "step_2"
    assert [r["step"] for r in read_metrics(out)] == list(range(1, hang))
    killed = [json.loads(line) for line in open(tmp_path / "rollouts.jsonl")]
    assert killed == ref_log[:hang - 1]
    log = []
    tg.main(argv + ["--resume"], reward_fn=logging_reward(log))
    assert log == ref_log[2:]
    assert [strip(r) for r in read_metrics(out)] == [strip(r) for r in ref["metrics"]]
    if extra:
        check_kept_last(out, n, "F32")


def test_resume_drops_a_metrics_line_cut_by_the_kill(tmp_path):
    """A kill while metrics.jsonl was being appended leaves a cut last line: a resume from step 1
    keeps the steps up to it and drops the rest; a bad line elsewhere is an error naming it."""
    rows = [json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text(rows[0] + rows[1] + rows[2][:9])
    training.start_run_files(str(tmp_path), {"seed": 0}, 1)
    assert (tmp_path / "metrics.jsonl").read_text() == rows[0]
    (tmp_path / "metrics.jsonl").write_text(rows[0] + rows[1][:9] + "\n" + rows[2])
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 2 is not JSON"):
        training.start_run_files(str(tmp_path), {"seed": 0}, 1)
