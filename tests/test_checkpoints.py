"""Checkpoints of train_sft.py and train_grpo.py as the hub has them, and atomic against a kill.

The source model is a bf16 hub folder written by transformers itself (save_pretrained of the model,
of a Qwen2 tokenizer with a chat template, of the image processor; vocab.json and merges.txt by the
tokenizers library): a checkpoint stays bf16, carries those files unchanged, keeps the training
state outside the model folder, and loads in transformers' Qwen2_5_VLForConditionalGeneration with
no missing or unexpected keys and no warning. A run killed (SIGKILL) inside a checkpoint save
leaves `latest` on the previous complete checkpoint, and resuming from it reproduces the
uninterrupted run.
"""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import hub
import train_grpo
import train_sft
import training
from conftest import make_hf_model
from hub import read_safetensors_header
from model import from_pretrained
from toy import make_byte_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CARRIED = ["chat_template.jinja", "generation_config.json", "merges.txt", "tokenizer.json",
           "tokenizer_config.json", "vocab.json"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def make_bf16_hub_folder(path):
    """A tiny random Qwen2.5-VL in bf16 with the files a hub folder has, each written by its tool."""
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import GenerationConfig, Qwen2Tokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    m = make_hf_model(layers=2, vision_depth=2).to(torch.bfloat16)
    m.generation_config = GenerationConfig(do_sample=True, temperature=0.7, top_p=0.8, eos_token_id=[258, 256],
                                           pad_token_id=256)
    m.save_pretrained(path)
    make_byte_tokenizer(str(path / "tok"))
    tok = Qwen2Tokenizer.from_pretrained(str(path / "tok"))
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok.save_pretrained(str(path))
    HFTokenizer.from_file(str(path / "tokenizer.json")).model.save(str(path))  # vocab.json, merges.txt
    shutil.rmtree(path / "tok")
    Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=112 * 112).save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    model = make_bf16_hub_folder(root / "model")
    assert json.load(open(os.path.join(model, "config.json")))["dtype"] == "bfloat16"
    assert sorted(set(CARRIED) - set(os.listdir(model))) == []
    os.makedirs(root / "img")
    sft, rl = [], []
    for i, color in enumerate(["red", "green", "blue", "red"]):
        arr = np.full((56, 56, 3), 255, dtype=np.uint8)
        arr[14:, 14:] = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}[color]
        Image.fromarray(arr).save(root / "img" / f"{i}.png")
        sft.append({"image": f"img/{i}.png", "question": "Which color?", "response": f"<answer>{color}</answer>"})
        rl.append({"images": [f"img/{i}.png"], "question": "What color?", "answer": color})
    for name, recs in (("sft.jsonl", sft), ("rl.jsonl", rl)):
        with open(root / name, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in recs)
    return {"root": root, "model": model, "sft": str(root / "sft.jsonl"), "rl": str(root / "rl.jsonl")}


def sft_args(world, out, *extra):
    return ["--data", world["sft"], "--model", world["model"], "--out", str(out), "--batch-size", "2",
            "--micro-batch", "2", "--max-steps", "4", "--lr", "2e-3", "--num-workers", "0", "--dtype", "fp32",
            "--save-every", "2", "--device", "cpu", *extra]


def grpo_args(world, out, *extra):
    return ["--data", world["rl"], "--model", world["model"], "--out", str(out), "--prompts-per-step", "2",
            "--group-size", "2", "--max-new-tokens", "4", "--micro-batch", "4", "--max-steps", "2", "--lr", "3e-3",
            "--save-every", "2", "--device", "cpu", "--dtype", "fp32", *extra]


def parity_reward(ro):
    """A reward with spread inside groups, so the update is not zero."""
    m = torch.arange(ro.completions.shape[1])[None] < ro.lengths[:, None]
    acc = ((ro.completions % 2 == 0) & m).sum(1).float() / ro.lengths.clamp(min=1)
    return acc, torch.zeros_like(acc), torch.zeros_like(acc)


def dtypes_on_disk(ckpt):
    return {meta["dtype"] for meta in read_safetensors_header(os.path.join(ckpt, "model.safetensors"))[0].values()}


def load_in_transformers(ckpt):
    """The model, tokenizer and image processor by transformers' from_pretrained, with its logging
    and Python's warnings captured: (model, loading info, every message at WARNING or above)."""
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.utils import logging as hf_logging

    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.WARNING:
                records.append(record.getMessage())

    handler = Keep()
    hf_logging.get_logger().addHandler(handler)  # transformers' root logger: every module logs under it
    hf_logging.set_verbosity_warning()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            m, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt, output_loading_info=True)
            AutoTokenizer.from_pretrained(ckpt)
            Qwen2VLImageProcessorPil.from_pretrained(ckpt)
    finally:
        hf_logging.get_logger().removeHandler(handler)
    return m, info, records + [str(w.message) for w in caught]


def check_hub_checkpoint(world, out, name, max_pixels):
    ck = os.path.join(out, name)
    # the model folder: weights, config and the source's hub files, nothing of the training
    assert sorted(os.listdir(ck)) == sorted(CARRIED + ["config.json", "model.safetensors", "preprocessor_config.json"])
    for f in CARRIED:
        assert open(os.path.join(ck, f), "rb").read() == open(os.path.join(world["model"], f), "rb").read(), f
    cfg = json.load(open(os.path.join(ck, "config.json")))
    assert cfg["dtype"] == "bfloat16" and dtypes_on_disk(ck) == {"BF16"}
    pre = json.load(open(os.path.join(ck, "preprocessor_config.json")))
    src = json.load(open(os.path.join(world["model"], "preprocessor_config.json")))
    assert pre == dict(src, size={"shortest_edge": 3136, "longest_edge": max_pixels})  # the run's bounds
    # the training state beside it
    state = torch.load(os.path.join(out, "train_state", name + ".pt"), weights_only=True)
    assert "optimizer" in state and state["model"]["lm_head.weight"].dtype == torch.float32
    # transformers loads it: every key used, nothing missing, no warning
    m, info, messages = load_in_transformers(ck)
    assert {k: v for k, v in info.items() if v} == {}, info
    assert messages == [], messages
    assert m.dtype == torch.bfloat16
    ours = from_pretrained(ck, dtype=torch.bfloat16).state_dict()
    assert torch.equal(ours["lm_head.weight"], m.lm_head.weight)
    return state


def test_sft_checkpoint_is_a_bf16_hub_folder_and_resumes_exactly(world, tmp_path):
    a = tmp_path / "a"
    ref = train_sft.main(sft_args(world, a))["metrics"]
    state = check_hub_checkpoint(world, a, "step_4", max_pixels=262144)  # train_sft's default
    # the float32 master weights in the state differ from the bf16 copy (the reason they are kept)
    bf16 = from_pretrained(str(a / "step_4"), dtype=torch.float32).state_dict()
    assert not torch.equal(bf16["lm_head.weight"], state["model"]["lm_head.weight"])
    assert torch.equal(bf16["lm_head.weight"], state["model"]["lm_head.weight"].bfloat16().float())
    # resumed from step 2 (of the bf16 folder + master weights): the same steps 3 and 4
    b = tmp_path / "b"
    shutil.copytree(a, b, ignore=shutil.ignore_patterns("step_4*"))
    (b / "latest").write_text("step_2\n")
    got = train_sft.main(sft_args(world, b, "--resume"))["metrics"]
    assert [(m["step"], m["loss"]) for m in got] == [(m["step"], m["loss"]) for m in ref[2:]]
    # SFT started from the run folder (its `latest`): the same files and dtype carried on
    d = tmp_path / "d"
    train_sft.main(sft_args(world, d, "--model", str(a), "--max-steps", "2"))
    check_hub_checkpoint(world, d, "step_2", max_pixels=262144)
    # --save-dtype fp32: float32 on disk and in config.json, no second copy in the state
    c = tmp_path / "c"
    train_sft.main(sft_args(world, c, "--max-steps", "2", "--save-dtype", "fp32"))
    assert dtypes_on_disk(c / "step_2") == {"F32"}
    assert json.load(open(c / "step_2" / "config.json"))["dtype"] == "float32"
    assert "model" not in torch.load(c / "train_state" / "step_2.pt", weights_only=True)


def test_grpo_checkpoint_is_a_bf16_hub_folder(world, tmp_path):
    out = tmp_path / "g"
    train_grpo.main(grpo_args(world, out), reward_fn=parity_reward)
    check_hub_checkpoint(world, out, "step_2", max_pixels=112 * 112)  # the folder's own
    assert (out / "latest").read_text().strip() == "step_2"


# --------------------------------------------------------------------------------------------
# A kill inside a checkpoint save
# --------------------------------------------------------------------------------------------

# Run train_sft in a child process that SIGKILLs itself at one point of the step-4 save (the
# step-2 save completes): after the model folder is written, halfway through writing the train
# state file, or just before `latest` is updated.
KILLER = r"""
import os, signal, sys
import torch
import train_sft
import training
where, args = sys.argv[1], sys.argv[2:]
calls = {"n": 0}

def die():
    os.kill(os.getpid(), signal.SIGKILL)

real_save_pretrained, real_torch_save, real_write_latest = training.save_pretrained, torch.save, training.write_latest

def save_pretrained(*a, **k):
    real_save_pretrained(*a, **k)
    calls["n"] += 1
    if where == "model" and calls["n"] == 2:
        die()

def torch_save(obj, path, *a, **k):
    real_torch_save(obj, path, *a, **k)
    if where == "train_state" and calls["n"] == 2:
        os.truncate(path, os.path.getsize(path) // 2)  # the process dies mid-write
        die()

def write_latest(out, name):
    if where == "latest" and name == "step_4":
        die()
    real_write_latest(out, name)

training.save_pretrained, torch.save, training.write_latest = save_pretrained, torch_save, write_latest
torch.set_num_threads(1)
train_sft.main(args)
"""


@pytest.fixture(scope="module")
def sft_reference(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    return train_sft.main(sft_args(world, out))["metrics"]


@pytest.mark.parametrize("where", ["model", "train_state", "latest"])
def test_kill_inside_a_save_keeps_latest_on_a_complete_checkpoint(world, sft_reference, tmp_path, where):
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "-c", KILLER, where, *sft_args(world, out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert (out / "latest").read_text().strip() == "step_2"
    # whatever the kill left of step 4 is under a temporary name, never the checkpoint's own
    if where != "latest":
        assert not (out / "step_4").exists() and not (out / "train_state" / "step_4.pt").exists()
    from_pretrained(str(out / "step_2"), dtype=torch.float32)  # complete and loadable
    got = train_sft.main(sft_args(world, out, "--resume"))["metrics"]
    assert [(m["step"], m["loss"]) for m in got] == [(m["step"], m["loss"]) for m in sft_reference[2:]]
    assert (out / "latest").read_text().strip() == "step_4"
    assert not [f for f in os.listdir(out) if f.startswith(".")]  # the save after resume leaves no temporaries


def test_fsdp_resume_restores_the_float32_master_weights(world, tmp_path):
    """Two FSDP processes (torchrun, gloo): 4 steps with bf16 checkpoints at 2 and 4; the run
    resumed from step_2 (its float32 master weights sharded from train_state/step_2.pt) repeats
    steps 3 and 4. The state was gathered from the shards (full float32 master weights). A run
    resumes across modes too: FSDP -> one process, and one process -> FSDP."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)

    def torchrun(out, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               os.path.join(ROOT, "train_sft.py"), *sft_args(world, out, "--micro-batch", "1", *extra)]
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert p.returncode == 0, p.stderr[-4000:]
        return [json.loads(line) for line in open(out / "metrics.jsonl")]

    a = tmp_path / "a"
    ref = torchrun(a)
    state = torch.load(a / "train_state" / "step_2.pt", weights_only=True)
    disk = from_pretrained(str(a / "step_2"), dtype=torch.float32).state_dict()
    assert sorted(state["model"]) == sorted(disk) and state["model"]["lm_head.weight"].dtype == torch.float32
    assert dtypes_on_disk(a / "step_2") == {"BF16"}
    shutil.rmtree(a / "step_4")
    os.remove(a / "train_state" / "step_4.pt")
    (a / "latest").write_text("step_2\n")
    b = tmp_path / "b"  # a copy of the run as it stood at step 2, for the cross-mode resume below
    shutil.copytree(a, b)
    got = torchrun(a, "--resume")
    assert [m["step"] for m in got] == [1, 2, 3, 4]
    for m, r in zip(got[2:], ref[2:]):
        assert abs(m["loss"] - r["loss"]) <= 1e-6 * abs(r["loss"]), (m, r)

    # Across modes (the optimizer state is keyed by parameter name in both): the FSDP run's step 2
    # resumed in one process, and a one-process run's step 2 resumed under FSDP. The same steps
    # follow; only the order of the sums differs.
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train_sft.py"),
                        *sft_args(world, b, "--micro-batch", "1", "--resume")],
                       env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-4000:]
    one = [json.loads(line) for line in open(b / "metrics.jsonl")]
    assert [m["step"] for m in one] == [1, 2, 3, 4]
    for m, r in zip(one[2:], ref[2:]):
        assert abs(m["loss"] - r["loss"]) <= 1e-5 * abs(r["loss"]), (m, r)
    c = tmp_path / "c"  # a one-process run, cut back to step 2 and resumed under FSDP
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train_sft.py"),
                        *sft_args(world, c, "--micro-batch", "1")],
                       env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-4000:]
    shutil.rmtree(c / "step_4")
    os.remove(c / "train_state" / "step_4.pt")
    (c / "latest").write_text("step_2\n")
    fsdp = torchrun(c, "--resume")
    assert [m["step"] for m in fsdp] == [1, 2, 3, 4]
    for m, r in zip(fsdp[2:], ref[2:]):
        assert abs(m["loss"] - r["loss"]) <= 1e-5 * abs(r["loss"]), (m, r)


# --------------------------------------------------------------------------------------------
# A resumed run under --keep-last; `latest` while a resumed run replaces steps; provenance
# --------------------------------------------------------------------------------------------


def git_head():
    return subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.mark.parametrize("trainer", ["sft", "grpo"])
def test_resume_under_keep_last_depends_on_no_removed_file(world, tmp_path, trainer, monkeypatch):
    """A run resumed from step_1 with --keep-last 1 --save-every 1: saving step_2 removes step_1,
    the folder the run loaded; steps 3 and 4 are still saved as bf16 hub folders carrying the
    source's files (their dtype and files were read when the run started), the steps equal the
    uninterrupted run's, and only step_4 is left. run_config.json records the command, the
    checkpoint resumed from with its fingerprint, the code version and the machine, and keeps the
    first run's provenance under "earlier"."""
    if trainer == "sft":
        def main(out, *extra):
            return train_sft.main(sft_args(world, out, "--save-every", "1", *extra))["metrics"]
        max_pixels = 262144
    else:
        def main(out, *extra):
            return train_grpo.main(grpo_args(world, out, "--max-steps", "4", "--save-every", "1", *extra),
                                   reward_fn=parity_reward)["metrics"]
        max_pixels = 112 * 112
    a, b = tmp_path / "a", tmp_path / "b"
    monkeypatch.setattr(sys, "argv", [f"train_{trainer}.py", "--out", str(a)])
    ref = main(a)
    shutil.copytree(a, b, ignore=shutil.ignore_patterns("step_[234]*"))
    (b / "latest").write_text("step_1\n")
    monkeypatch.setattr(sys, "argv", [f"train_{trainer}.py", "--out", str(b), "--resume", "--keep-last", "1"])
    got = main(b, "--resume", "--keep-last", "1")
    key = "loss" if trainer == "sft" else "reward"
    assert [(m["step"], m[key]) for m in got] == [(m["step"], m[key]) for m in ref[1:]]
    assert sorted(f for f in os.listdir(b) if f.startswith("step_")) == ["step_4"]
    assert os.listdir(b / "train_state") == ["step_4.pt"]
    check_hub_checkpoint(world, b, "step_4", max_pixels=max_pixels)

    config = json.load(open(b / "run_config.json"))
    prov = config["provenance"]
    assert prov["command"] == f"train_{trainer}.py --out {b} --resume --keep-last 1"
    assert prov["model"] == dict(hub.model_identity(str(a / "step_1")), folder=str(b / "step_1"))  # a copy
    assert prov["code"]["commit"] == git_head() and isinstance(prov["code"]["dirty"], bool)
    assert (prov["torch"], prov["device"], prov["dtype"], prov["threads"]) == (torch.__version__, "cpu", "float32", 1)
    assert config["start_step"] == 1 and config["save_dtype_resolved"] == "torch.bfloat16"
    (first,) = config["earlier"]
    assert first["start_step"] == 0 and first["provenance"]["model"] == hub.model_identity(world["model"])
    assert first["provenance"]["command"] == f"train_{trainer}.py --out {a}"


@pytest.fixture(scope="module")
def four_steps(world, tmp_path_factory):
    """An SFT run of 4 steps saved at 2 and 4: `latest` names step_4."""
    out = tmp_path_factory.mktemp("four_steps") / "run"
    train_sft.main(sft_args(world, out))
    assert (out / "latest").read_text() == "step_4\n"
    return out


@pytest.mark.parametrize("extra", [["--save-every", "2"], ["--save-every", "1", "--keep-last", "1"],
                                   ["--save-every", "2"]], ids=["replaces-latest", "keep-last", "fresh-run"])
def test_latest_always_names_a_complete_checkpoint(world, four_steps, tmp_path, monkeypatch, extra, request):
    """A run resumed from step_2 while `latest` names the earlier run's step_4, with another weight
    of L_enhance (so its steps differ), saving every 2 steps (it replaces step_4, which `latest`
    names) or every step under --keep-last 1 (step_4 of the earlier run is newer than the step it
    saves): before and after every rename, replace and removal, `latest` names a checkpoint folder
    that exists, whose train state belongs to it (the bf16 weights on disk are the train state's
    float32 master weights rounded). A fresh run (no --resume) in a folder whose `latest` names
    step_2 has no checkpoint of its own to fall back on while it replaces that step_2: there
    `latest` may be absent, never wrong."""
    fresh = request.node.callspec.id == "fresh-run"
    out = tmp_path / "run"
    shutil.copytree(four_steps, out)
    if fresh:
        (out / "latest").write_text("step_2\n")
    old4 = (out / "step_4" / "model.safetensors").read_bytes()
    seen = []

    def check():
        if fresh and not (out / "latest").exists():
            return
        name = (out / "latest").read_text().strip()
        seen.append(name)
        ckpt = out / name
        assert (ckpt / "config.json").exists() and (ckpt / "model.safetensors").exists(), f"latest names {name}"
        state = torch.load(out / "train_state" / f"{name}.pt", weights_only=True)
        disk = from_pretrained(str(ckpt), dtype=torch.float32).state_dict()["lm_head.weight"]
        assert state["step"] == int(name[5:]) and torch.equal(disk, state["model"]["lm_head.weight"].bfloat16().float())

    with monkeypatch.context() as m:
        for mod, fn in ((os, "rename"), (os, "replace"), (os, "remove"), (shutil, "rmtree")):
            def checked(*a, real=getattr(mod, fn), **k):
                check()
                real(*a, **k)
                check()
            m.setattr(mod, fn, checked)
        resume = [] if fresh else ["--resume", str(out / "step_2")]
        train_sft.main(sft_args(world, out, *resume, "--agto-alpha", "1", *extra))
    assert len(seen) >= 8 and (out / "latest").read_text() == "step_4\n"
    assert (out / "step_4" / "model.safetensors").read_bytes() != old4  # replaced by this run's step 4
    check()
