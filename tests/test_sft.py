"""train_sft.py and the dataset section of data.py, on CPU with tiny models and tiny data.

Each check compares against something independent of the code under test: the same records in
other forms, hand-computed token means from the model's full logits, a one-process run for the
two-process run, an uninterrupted run for the resumed one, transformers for the saved checkpoint.
"""

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import plot
import train_sft
import training
import vas
from conftest import assert_scalars_are_metrics, make_hf_model, tensorboard_events
from data import IGNORE, IMAGE, PAD_ROLE, DataError, ImageProcessor, SFTDataset, Tokenizer, collate
from model import from_pretrained
from training import epoch_batches, micro_batches
from toy import make_byte_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def save_png(path, color, size=(56, 56)):
    arr = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    arr[...] = COLORS[color]
    arr[: size[1] // 4, : size[0] // 4] = 255  # a corner mark, so images are not uniform
    Image.fromarray(arr).save(path)


def make_model_dir(path, seed=0):
    """A complete model folder: transformers' tiny Qwen2.5-VL + the byte tokenizer + preprocessor."""
    make_hf_model(seed=seed, layers=2, vision_depth=2).save_pretrained(path)
    make_byte_tokenizer(str(path))
    ImageProcessor(max_pixels=112 * 112).save(str(path))
    return str(path)


def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A model folder and 16 flat records: 14 with an image (sizes 56, 84, 112: 4, 9, 16 image
    tokens) whose answer is the image's colour, and 2 short text-only ones."""
    root = tmp_path_factory.mktemp("world")
    model = make_model_dir(root / "model")
    os.makedirs(root / "img")
    records = []
    for i in range(14):
        color = list(COLORS)[i % 3]
        side = (56, 84, 112)[i % 3 if i < 12 else 0]
        save_png(root / "img" / f"{i}.png", color, (side, side))
        records.append({"image": f"img/{i}.png", "question": "Which color?", "response": f"<answer>{color}</answer>"})
    records += [{"question": "Hi", "response": "ok"}, {"question": "Yo", "response": "hey"}]
    data = write_jsonl(root / "sft.jsonl", records)
    return {"root": root, "model": model, "data": data}


def base_args(world, out, steps=4, **kw):
    args = ["--data", world["data"], "--model", world["model"], "--out", str(out), "--batch-size", "8",
            "--micro-batch", "8", "--max-steps", str(steps), "--lr", "2e-3", "--num-workers", "0",
            "--dtype", "fp32", "--save-every", "2", "--device", "cpu"]
    for k, v in kw.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(l) for l in f if l.strip()]


@pytest.fixture(scope="module")
def reference_run(world, tmp_path_factory):
    """One process, 4 steps (2 epochs) of one 8-record micro-batch each, checkpoints at steps 2 and
    4: the run the others are compared to."""
    out = tmp_path_factory.mktemp("ref")
    res = train_sft.main(base_args(world, out))
    return {"out": str(out), "metrics": res["metrics"]}


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def test_record_forms_give_same_ids(tmp_path, world):
    tok, proc = Tokenizer(world["model"]), ImageProcessor.from_pretrained(world["model"])
    save_png(tmp_path / "a.png", "red", (84, 56))
    q, a, s = "What is it?", "<answer>red</answer>", "Be brief."
    forms = {
        "chat": {"messages": [{"role": "system", "content": s},
                              {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]},
                              {"role": "assistant", "content": a}], "images": ["a.png"]},
        "chat_inline": {"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"},
                                                                  {"type": "text", "text": q}]},
                                     {"role": "assistant", "content": [{"type": "text", "text": a}]}], "system": s},
        "llamafactory": {"messages": [{"role": "system", "content": s}, {"role": "user", "content": "<image>" + q},
                                      {"role": "assistant", "content": a}], "images": ["a.png"]},
        "sharegpt": {"conversations": [{"from": "human", "value": "<image>" + q}, {"from": "gpt", "value": a}],
                     "system": s, "images": ["a.png"]},
        "flat": {"image": "a.png", "problem": q, "solution": a, "system": s, "answer": "red"},
        "flat_answer_only": {"images": ["a.png"], "question": q, "answer": a, "system": s},
    }
    text_forms = {
        "chat": {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]},
        "sharegpt": {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]},
        "flat": {"question": q, "response": a},
    }
    for group in (forms, text_forms):
        items = []
        for name, rec in group.items():
            ds = SFTDataset(write_jsonl(tmp_path / f"{name}.jsonl", [rec]), tok, proc)
            items.append((name, ds[0]))
        ref_name, ref = items[0]
        for name, it in items[1:]:
            for k in ("input_ids", "labels", "roles"):
                assert torch.equal(it[k], ref[k]), (name, ref_name, k)
            assert (it["pixel_values"] is None) == (ref["pixel_values"] is None)
            if ref["pixel_values"] is not None:
                assert torch.equal(it["pixel_values"], ref["pixel_values"])
    img = SFTDataset(write_jsonl(tmp_path / "x.jsonl", [forms["flat"]]), tok, proc)[0]
    assert tok.decode(img["input_ids"][img["labels"] != IGNORE]) == a  # + <|im_end|>, skipped by decode
    assert int((img["roles"] == IMAGE).sum()) == 6  # 84x56 -> grid 6x4 -> 6 merged tokens

    # collate: right padding, PAD_ROLE / IGNORE, the batch's images in row order
    txt = SFTDataset(write_jsonl(tmp_path / "t.jsonl", [text_forms["flat"]]), tok, proc)[0]
    b = collate([txt, img], tok.pad_id)
    T = max(len(txt["input_ids"]), len(img["input_ids"]))
    n = len(txt["input_ids"])
    assert b["input_ids"].shape == (2, T) and b["attention_mask"][0].sum() == n
    assert (b["roles"][0, n:] == PAD_ROLE).all() and (b["labels"][0, n:] == IGNORE).all()
    assert (b["input_ids"][0, n:] == tok.pad_id).all()
    assert torch.equal(b["pixel_values"], img["pixel_values"]) and b["image_grid_thw"].tolist() == [[1, 4, 6]]


def test_validation_errors_name_file_and_line(tmp_path, world):
    tok, proc = Tokenizer(world["model"]), ImageProcessor.from_pretrained(world["model"])
    save_png(tmp_path / "ok.png", "blue")
    (tmp_path / "junk.png").write_bytes(b"this is not an image")
    good = {"image": "ok.png", "question": "Q", "response": "A"}
    lines = [
        good,                                                                   # 1
        '{"question": "Q", "response": ',                                       # 2 bad JSON
        {"image": "missing.png", "question": "Q", "response": "A"},             # 3 no such image
        {"images": ["ok.png", "ok.png"], "question": "<image> Q", "response": "A"},  # 4 1 placeholder, 2 images
        {"messages": [{"role": "user", "content": "Q"}]},                       # 5 no assistant turn
        {"image": "junk.png", "question": "Q", "response": "A"},                # 6 unreadable image
        {"messages": [{"role": "tool", "content": "Q"}, {"role": "assistant", "content": "A"}]},  # 7 role
        {"text": "what form is this?"},                                         # 8 unknown form
        good,                                                                   # 9
    ]
    path = write_jsonl(tmp_path / "d.jsonl", lines)
    with open(path, "ab") as f:
        f.write(b'{"question": "\xff\xfe", "response": "A"}\n')                 # 10 not UTF-8
    with pytest.raises(DataError) as e:
        SFTDataset(path, tok, proc)
    msg = str(e.value)
    assert "8 invalid record(s)" in msg
    by_line = {l.strip().split(": ")[0]: l for l in msg.splitlines()[1:]}
    for line, what in [(2, "Expecting value"), (3, "missing.png: image file does not exist"),
                       (4, "1 image placeholders but 2 images"), (5, "no assistant turn"),
                       (6, "junk.png: cannot read image header"), (7, "role 'tool'"), (8, "unknown record form"),
                       (10, "can't decode byte 0xff")]:
        assert what in by_line[f"{path}:{line}"], (line, msg)
    assert f"{path}:1:" not in msg and f"{path}:9:" not in msg
    with pytest.raises(DataError, match=r"and 6 more"):
        SFTDataset(path, tok, proc, max_errors=2)
    ds = SFTDataset(path, tok, proc, skip_bad=True)
    assert len(ds) == 2 and ds.stats["bad"] == 8 and ds.stats["lines"] == 10
    assert [r.where for r in ds.records] == [f"{path}:1", f"{path}:9"]


def test_too_long_record_is_dropped_never_cut(tmp_path, world):
    tok, proc = Tokenizer(world["model"]), ImageProcessor.from_pretrained(world["model"])
    save_png(tmp_path / "big.png", "green", (112, 112))  # 16 image tokens
    recs = [{"question": "Q", "response": "A"},
            {"images": ["big.png"], "question": "Now look at this picture: <image>", "response": "A"},
            {"question": "Q", "response": "B"}]
    path = write_jsonl(tmp_path / "d.jsonl", recs)
    full = SFTDataset(path, tok, proc)
    ids = full[1]["input_ids"]
    first_img = int((full[1]["roles"] == IMAGE).nonzero()[0])
    max_len = first_img + 8  # a cut here would fall in the middle of the image's 16 tokens
    assert len(full[0]["input_ids"]) <= max_len < len(ids)
    ds = SFTDataset(path, tok, proc, max_len=max_len)
    assert len(ds) == 2 and ds.stats["too_long"] == 1
    assert all(len(ds[i]["input_ids"]) <= max_len and ds[i]["pixel_values"] is None for i in range(2))
    with pytest.raises(DataError, match=rf"{path}:2: {len(ids)} tokens \(with 16 image tokens\) is over --max-len"):
        SFTDataset(path, tok, proc, max_len=max_len, on_long="error")


def test_length_grouped_batches_pad_less():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(20, 2000, (512,), generator=g).tolist()

    def padding(batches, micro=4):
        return sum(len(mb) * max(lengths[i] for i in mb) - sum(lengths[i] for i in mb)
                   for b in batches for mb in micro_batches(b, micro))

    grouped = epoch_batches(lengths, 32, seed=1, epoch=0)
    plain = epoch_batches(lengths, 32, seed=1, epoch=0, group_by_length=False)
    assert padding(grouped) < 0.25 * padding(plain)
    for batches in (grouped, plain):  # a partition of the records (the last partial batch dropped)
        flat = [i for b in batches for i in b]
        assert len(batches) == 16 and all(len(b) == 32 for b in batches) and len(set(flat)) == 512
    assert grouped == epoch_batches(lengths, 32, seed=1, epoch=0)  # same on every process
    assert grouped != epoch_batches(lengths, 32, seed=1, epoch=1)
    # micro-batches: the processes' shares partition the batch; one process sees them all, in order
    b = grouped[0]
    shares = [micro_batches(b, 4, r, 2) for r in range(2)]
    assert sorted(i for s in shares for mb in s for i in mb) == sorted(b)
    assert micro_batches(b, 4) == [mb for pair in zip(*shares) for mb in pair]


# --------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------


def test_lm_loss_is_the_step_token_mean_across_micro_batches(world, tmp_path):
    """Two micro-batches with very different numbers of response tokens: the step's loss and
    gradient equal those of the token mean over the whole batch (computed here from full logits),
    not the mean of the two micro-batch means. The attention terms: the mean over image samples."""
    tok, proc = Tokenizer(world["model"]), ImageProcessor.from_pretrained(world["model"])
    save_png(tmp_path / "a.png", "red")
    recs = [{"image": "a.png", "question": "Q", "response": "a much longer answer " * 4},
            {"question": "Q", "response": "x"},
            {"image": "a.png", "question": "Q?", "response": "yz"},
            {"image": "a.png", "question": "Q!", "response": "w"}]
    ds = SFTDataset(write_jsonl(tmp_path / "d.jsonl", recs), tok, proc)
    model = from_pretrained(world["model"], dtype=torch.float32)

    full = collate([ds[i] for i in range(4)], tok.pad_id)
    logits = model(full["input_ids"], full["attention_mask"], full["pixel_values"], full["image_grid_thw"])
    y = full["labels"][:, 1:]
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), y.clamp(min=0), reduction="none")  # (B, T-1)
    mask = (y != IGNORE).float()
    ref = (nll * mask).sum() / mask.sum()  # the hand formula: sum over all response tokens / their count
    per_mb = [(nll[r] * mask[r]).sum().detach() / mask[r].sum() for r in ([0, 1], [2, 3])]
    assert abs(float(sum(per_mb) / 2 - ref.detach())) > 0.01  # the check below could not pass by accident
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    mbs = [collate([ds[0], ds[1]], tok.pad_id), collate([ds[2], ds[3]], tok.pad_id)]
    assert (mbs[0]["labels"] != IGNORE).sum() > 4 * (mbs[1]["labels"] != IGNORE).sum()
    r = train_sft.forward_backward(model, mbs, 0.0, 0.0, None, ce_chunk=5, device=torch.device("cpu"))
    assert r["n_tok"] == int(mask.sum()) and r["n_img"] == 3
    assert abs(r["lm_loss"] - ref.item()) < 1e-5 * ref.item()
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, ref_grads[n], rtol=1e-4, atol=1e-7), n
    model.zero_grad(set_to_none=True)

    # attention terms: micro-batch sums / image samples of the step == the one-batch mean
    ctl = vas.AttentionGuidedLoss(full["roles"])
    with torch.no_grad():
        model(full["input_ids"], full["attention_mask"], full["pixel_values"], full["image_grid_thw"], attn_ctl=ctl)
    t = ctl.terms()
    factory = vas.AttentionGuidedLoss
    r = train_sft.forward_backward(model, mbs, 0.15, 0.15, factory, ce_chunk=5, device=torch.device("cpu"))
    assert t.n_image == 3
    assert abs(r["enhance"] - float(t.enhance_sum) / 3) < 1e-5 and abs(r["suppress"] - float(t.suppress_sum) / 3) < 1e-5
    assert abs(r["loss"] - (r["lm_loss"] + 0.15 * r["enhance"] + 0.15 * r["suppress"])) < 1e-9


def test_lr_schedule():
    m = [train_sft.lr_multiplier(s, 20, 2) for s in range(20)]
    assert m[:3] == [0.5, 1.0, 1.0] and all(a >= b for a, b in zip(m[1:], m[2:])) and 0 < m[-1] < 0.01


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------


def test_two_processes_match_one_process(world, reference_run, tmp_path):
    """torchrun with 2 processes (gloo, FSDP2, float32), each accumulating 2 micro-batches of 2
    records, against one process with one micro-batch of 8 over the same global batches: the same
    per-step losses. The data includes a micro-batch where one process has only text-only records
    and the other has images (the blank-image path that keeps FSDP's collectives in step). With
    --report-to tensorboard only the main process writes events."""
    ds_len = [json.loads(l) for l in open(world["data"])]
    text_only = {i for i, r in enumerate(ds_len) if "image" not in r}
    mixed = False
    for epoch in range(2):
        for b in epoch_batches(SFTDataset(world["data"], Tokenizer(world["model"]),
                                          ImageProcessor.from_pretrained(world["model"])).lengths, 8, 0, epoch):
            shares = [micro_batches(b, 2, r, 2) for r in range(2)]
            for mb0, mb1 in zip(*shares):
                mixed |= (set(mb0) <= text_only) != (set(mb1) <= text_only)
    assert mixed
    out = tmp_path / "dist"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "train_sft.py")] + base_args(world, out, micro_batch=2) + ["--report-to", "tensorboard"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-4000:]
    got, ref = read_metrics(out), reference_run["metrics"]
    assert [m["step"] for m in got] == [1, 2, 3, 4]
    for a, b in zip(got, ref):
        for k in ("loss", "lm_loss", "enhance", "suppress"):
            assert abs(a[k] - b[k]) <= 1e-5 * abs(b[k]), (a["step"], k, a[k], b[k])
        assert a["n_tokens"] == b["n_tokens"] and a["n_image_samples"] == b["n_image_samples"]
    cfg = json.load(open(out / "run_config.json"))
    assert cfg["world_size"] == 2 and cfg["fsdp"] and cfg["grad_accum"] == 2
    # --report-to: the main process alone writes, the rows of metrics.jsonl
    assert len(os.listdir(out / "tensorboard")) == 1
    assert_scalars_are_metrics(tensorboard_events(out / "tensorboard")[0], got)


def test_resume_after_crash_mid_save(world, reference_run, tmp_path, monkeypatch):
    """Crash while writing the step-4 checkpoint: `latest` still names step_2, which is complete.
    Resuming from it gives the uninterrupted run's losses for steps 3 and 4. TensorBoard shows each
    step once: the resumed run hides the crashed run's steps 3 and 4, which it redoes."""
    out = tmp_path / "crash"
    calls = {"n": 0}
    real = training.write_train_state

    def crashing(path, state):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full (simulated)")
        real(path, state)

    monkeypatch.setattr(training, "write_train_state", crashing)
    with pytest.raises(OSError, match="simulated"):
        train_sft.main(base_args(world, out) + ["--report-to", "tensorboard"])
    monkeypatch.setattr(training, "write_train_state", real)
    assert (out / "latest").read_text().strip() == "step_2"
    assert not (out / "step_4").exists() and (out / "train_state" / "step_2.pt").exists()
    from_pretrained(str(out / "step_2"), dtype=torch.float32)  # complete and loadable

    crashed, _ = tensorboard_events(out / "tensorboard")
    assert [s for s, _ in crashed["loss"]] == [1, 2, 3, 4]  # step 4 was logged before its save failed
    res = train_sft.main(base_args(world, out) + ["--resume", "--report-to", "tensorboard"])
    assert [m["step"] for m in res["metrics"]] == [3, 4]
    scalars, _ = tensorboard_events(out / "tensorboard")
    assert_scalars_are_metrics(scalars, read_metrics(out))
    ref = reference_run["metrics"]
    for a, b in zip(res["metrics"], ref[2:]):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 * abs(b["loss"]), (a, b)
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3, 4]
    assert (out / "latest").read_text().strip() == "step_4"
    # resuming a finished run does nothing more
    assert train_sft.main(base_args(world, out) + ["--resume"])["metrics"] == []


def test_nan_loss_stops_with_step_and_keeps_checkpoint(world, tmp_path, monkeypatch):
    out = tmp_path / "nan"
    real = train_sft.chunked_cross_entropy
    calls = {"n": 0}

    def poisoned(*a, **k):  # one micro-batch per step: call 3 is step 3
        calls["n"] += 1
        loss = real(*a, **k)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(train_sft, "chunked_cross_entropy", poisoned)
    with pytest.raises(training.NonFiniteLoss, match=r"step 3: non-finite loss") as e:
        train_sft.main(base_args(world, out))
    assert str(out / "step_2") in str(e.value)
    assert (out / "latest").read_text().strip() == "step_2" and not (out / "step_3").exists()
    assert [m["step"] for m in read_metrics(out)] == [1, 2]


def test_checkpoint_loads_in_model_and_transformers(world, reference_run):
    from transformers import Qwen2_5_VLForConditionalGeneration

    ck = os.path.join(reference_run["out"], "step_4")
    assert sorted(os.listdir(ck)) == ["config.json", "generation_config.json", "model.safetensors",
                                      "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json"]
    state = torch.load(training.train_state_path(ck), weights_only=True)
    assert "model" not in state  # a float32 source: step_4 holds the master weights themselves
    assert state["step"] == 4 and state["epoch"] == 2 and len(state["rng"]) == 1
    ours = from_pretrained(ck, dtype=torch.float32).eval()
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(ck, dtype=torch.float32, attn_implementation="sdpa").eval()
    tok, proc = Tokenizer(ck), ImageProcessor.from_pretrained(ck)
    ds = SFTDataset(world["data"], tok, proc)
    b = collate([ds[0], ds[1], ds[15]], tok.pad_id)
    with torch.no_grad():
        a = ours(b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_grid_thw"])
        r = hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"],
               image_grid_thw=b["image_grid_thw"], mm_token_type_ids=(b["roles"] == IMAGE).int()).logits
    m = b["attention_mask"].bool()
    assert (a[m] - r[m]).abs().max() < 1e-4
    # and the weights changed from the starting model
    start = from_pretrained(world["model"], dtype=torch.float32)
    assert not torch.equal(start.lm_head.weight, ours.lm_head.weight)


def test_sft_lowers_loss_and_agto_raises_vas(world, tmp_path):
    """Plain SFT lowers the LM loss; with --agto-alpha 1 the VAS (vas.measure_vas on the training
    images, after training) ends above that of the same run without the objective."""
    common = dict(steps=12, batch_size=4, micro_batch=4, lr=3e-3, save_every=0, warmup_ratio=0)
    plain = train_sft.main(base_args(world, tmp_path / "plain", **common) + ["--agto-alpha", "0", "--agto-beta", "0"])
    guided = train_sft.main(base_args(world, tmp_path / "guided", **common) + ["--agto-alpha", "1", "--agto-beta", "0"])
    lm = [m["lm_loss"] for m in plain["metrics"]]
    assert sum(lm[-3:]) / 3 < 0.7 * sum(lm[:3]) / 3, lm
    assert plain["metrics"][0]["vas"] is None and guided["metrics"][0]["vas"] is not None

    tok, proc = Tokenizer(world["model"]), ImageProcessor.from_pretrained(world["model"])
    ds = SFTDataset(world["data"], tok, proc)
    batch = collate([ds[i] for i in range(14)], tok.pad_id)

    def measure(path):
        return vas.measure_vas(from_pretrained(path, dtype=torch.float32).eval(), batch).vas

    v0, v_plain, v_guided = measure(world["model"]), measure(plain["checkpoint"]), measure(guided["checkpoint"])
    assert v_guided > 1.5 * v_plain and v_guided > 1.5 * v0, (v0, v_plain, v_guided)


# --------------------------------------------------------------------------------------------
# Watching a run: the curves at every save, --report-to
# --------------------------------------------------------------------------------------------


def test_curves_at_every_save_and_tensorboard_holds_the_metrics(world, tmp_path, monkeypatch):
    """3 steps, checkpoints at steps 2 and 3: OUT/training_curves.png is drawn at each save from the
    rows written so far, every panel with its curve; --report-to tensorboard holds every number of
    metrics.jsonl at its step (read by TensorBoard's EventAccumulator) and the run config as
    HParams, the trainer's panels as their metrics."""
    out = tmp_path / "watch"
    drawn, real = [], plot.save_run_curves

    def spy(folder, kind, *a):
        path = real(folder, kind, *a)
        drawn.append((kind, len(plot.read_metrics(folder)), path))
        return path

    monkeypatch.setattr(plot, "save_run_curves", spy)
    train_sft.main(base_args(world, out, steps=3) + ["--report-to", "tensorboard"])
    png = str(out / plot.CURVES_PNG)
    assert drawn == [("sft", 2, png), ("sft", 3, png)]
    rows = read_metrics(out)
    img = Image.open(png).convert("RGB")
    _, axes = plot.draw_curves([(str(out), rows)], plot.SFT_PANELS)  # where the boxes are
    for key, ax in axes.items():
        assert plot.PALETTE[0] in {c for _, c in img.crop(ax.box).getcolors(1 << 24)}, key

    scalars, hparams = tensorboard_events(out / "tensorboard")
    assert_scalars_are_metrics(scalars, rows)
    assert [s for s, _ in scalars["lm_loss"]] == [1, 2, 3]
    cfg = json.load(open(out / "run_config.json"))
    hp = hparams["_hparams_/session_start_info"].session_start_info.hparams
    assert hp["lr"].number_value == cfg["lr"] == 2e-3 and hp["data"].string_value == world["data"]
    assert hp["data_stats.kept"].number_value == cfg["data_stats"]["kept"] == 16
    assert json.loads(hp["betas"].string_value) == [0.9, 0.999] and hp["resume"].string_value == "null"
    experiment = hparams["_hparams_/experiment"].experiment
    assert [m.name.tag for m in experiment.metric_infos] == [k for k, _, _ in plot.SFT_PANELS]
    assert sorted(h.name for h in experiment.hparam_infos) == sorted(hp)
    assert "_hparams_/session_end_info" in hparams  # the run ended well


def test_wandb_offline_run_holds_the_metrics_and_config(world, tmp_path, monkeypatch):
    """--report-to wandb with WANDB_MODE=offline and no account: the run folder wandb writes
    (OUT/wandb/offline-run-*), read back by wandb's own reader of its transaction log (`wandb leet
    inspect --json`), holds the run config as wandb.config, every number of each metrics.jsonl row
    at its step, and a clean exit."""
    for k in ("WANDB_DIR", "WANDB_NAME", "WANDB_PROJECT", "WANDB_API_KEY", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(k, raising=False)
    for k in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(k, str(tmp_path / k.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "wb"
    train_sft.main(base_args(world, out, steps=2, save_every=0) + ["--report-to", "wandb"])
    (run_dir,) = glob.glob(str(out / "wandb" / "offline-run-*"))
    p = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", run_dir], capture_output=True,
                       text=True, timeout=120, env=dict(os.environ))
    assert p.returncode == 0, p.stderr[-2000:]
    records = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    (run,) = [r["run"] for r in records if r["type"] == "run"]
    assert run["display_name"] == str(out) and run["project"] == "avar"
    assert {k: v for k, v in run["config"]["update"].items() if k != "_wandb"} == json.load(open(out / "run_config.json"))
    history = [(r["history"]["step"]["num"], {k: v for k, v in r["history"]["item"].items() if not k.startswith("_")})
               for r in records if r["type"] == "history"]
    rows = read_metrics(out)
    assert [s for s, _ in history] == [1, 2]
    for (_, logged), row in zip(history, rows):
        assert logged == {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
    assert [r["exit"]["exit_code"] for r in records if r["type"] == "exit"] == [0]
