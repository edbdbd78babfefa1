"""train_sft.py --config with the release's avar_sft.yaml and LLaMA-Factory's dataset_info.json
(tests/fixtures/release), unchanged but for the model and dataset names.

The references: the settings LLaMA-Factory 0.9.3 and transformers give each key (and each absent
key), written out here by hand from their code; LLaMA-Factory's qwen2_vl template and mm plugin
rendered by hand and tokenized by transformers.
"""

import difflib
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import release
import train_sft
from conftest import make_hf_model
from data import ImageProcessor, SFTDataset, Tokenizer, UserError
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


def release_dir(root, model, records=4):
    """A working folder as the release's user has it: data/dataset_info.json (the fixture) with
    data/mllm_demo.json in LLaMA-Factory's demo form beside it, and avar_sft.yaml, a copy of the
    release's with model_name_or_path and dataset pointed at them and nothing else changed."""
    os.makedirs(root / "data" / "mllm_demo_data")
    shutil.copy(os.path.join(FIXTURES, "dataset_info.json"), root / "data")
    recs = []
    for i in range(records):
        png(root / "data" / "mllm_demo_data" / f"{i}.png", 30 * i)
        recs.append({"messages": [{"content": f"<image>Which color {i}?", "role": "user"},
                                  {"content": f"<think>dark {i}</think><answer>grey</answer>", "role": "assistant"}],
                     "images": [f"mllm_demo_data/{i}.png"]})
    (root / "data" / "mllm_demo.json").write_text(json.dumps(recs, indent=2))
    text = open(os.path.join(FIXTURES, "avar_sft.yaml")).read()
    copy = (text.replace("model_name_or_path: Qwen/Qwen2.5-VL-7B-Instruct", f"model_name_or_path: {model}")
            .replace("dataset: ## fill in your dataset name", "dataset: mllm_demo"))
    changed = [l for l in difflib.ndiff(text.splitlines(), copy.splitlines()) if l[:2] in ("- ", "+ ")]
    assert len(changed) == 4, changed  # two lines out, two in
    (root / "avar_sft.yaml").write_text(copy)
    return root / "avar_sft.yaml"


def edited(root, replace=(), drop=()):
    """A copy of the release's avar_sft.yaml with lines replaced / dropped (for the refusals)."""
    lines = open(os.path.join(FIXTURES, "avar_sft.yaml")).read().splitlines()
    lines = [dict(replace).get(l, l) for l in lines if l not in drop]
    (root / "c.yaml").write_text("\n".join(lines) + "\n")
    return str(root / "c.yaml")


# --------------------------------------------------------------------------------------------
# --config: the release's avar_sft.yaml
# --------------------------------------------------------------------------------------------


def test_release_config_runs_as_the_release_states_it(model_dir, tmp_path, monkeypatch, capsys):
    cfg = release_dir(tmp_path, model_dir)
    monkeypatch.chdir(tmp_path)  # dataset_dir and output_dir are relative to it, as in LLaMA-Factory
    res = train_sft.main(["--config", str(cfg)])
    c = res["config"]
    want = dict(model=model_dir, max_pixels=262144, max_len=8192, lr=1e-5, epochs=10.0, warmup_ratio=0.1,
                micro_batch=1, batch_size=4, save_every=100, keep_last=16, freeze_vision=False, dtype="bf16",
                agto_alpha=0.15, agto_beta=0.15, agto_eps=1e-6, new_special_tokens="<think>,</think>,<answer>,</answer>",
                resume=None, out="outputs/Qwen2.5-VL-7B-Instruct/sft/avar_sft_ckpt", seed=42, min_lr_ratio=0.0,
                grad_clip=1.0, weight_decay=0.0, grad_ckpt=True, no_group_by_length=True,
                data="data/dataset_info.json:mllm_demo")
    assert {k: c[k] for k in want} == want
    assert c["grad_accum"] == 4 and c["total_steps"] == 10 and c["warmup_steps"] == 1 and c["data_stats"]["kept"] == 4
    assert c["compute_dtype"] == "torch.bfloat16"
    assert res["checkpoint"] == "outputs/Qwen2.5-VL-7B-Instruct/sft/avar_sft_ckpt/step_10"
    assert res["metrics"][0]["enhance"] is not None  # use_avar_attn_guide: the objective is on
    tok = Tokenizer(res["checkpoint"])
    assert [tok.encode(t) for t in ("<think>", "</think>", "<answer>", "</answer>")] == [[270], [271], [272], [273]]
    out = capsys.readouterr().out
    (line,) = [l for l in out.splitlines() if "ignored" in l]  # listed once
    for key in ("deepspeed", "flash_attn", "overwrite_cache", "preprocessing_num_workers", "dataloader_num_workers",
                "logging_steps", "ddp_timeout", "trust_remote_code"):
        assert key in line


def test_flags_override_the_file_and_world_size_scales_the_batch(model_dir, tmp_path, monkeypatch):
    cfg = release_dir(tmp_path, model_dir)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert release.sft_settings(str(cfg))[0]["batch_size"] == 8  # 1 per device x 4 accumulation x 2 processes
    monkeypatch.delenv("WORLD_SIZE")
    res = train_sft.main(["--config", str(cfg), "--lr", "3e-4", "--max-steps", "2", "--out", "o",
                          "--agto-alpha", "0.5", "--dtype", "fp32"])
    c = res["config"]
    assert (c["lr"], c["max_steps"], c["out"], c["agto_alpha"], c["agto_beta"], c["dtype"]) == (3e-4, 2, "o", 0.5, 0.15,
                                                                                                "fp32")
    assert c["total_steps"] == 2 and c["epochs"] == 10.0 and c["max_pixels"] == 262144
    # --data on the command line replaces the file's dataset
    (tmp_path / "flat.jsonl").write_text("".join(json.dumps({"question": f"q{i}", "response": "a"}) + "\n"
                                                 for i in range(4)))
    res = train_sft.main(["--config", str(cfg), "--data", "flat.jsonl", "--max-steps", "1", "--out", "o2"])
    assert res["config"]["data"] == "flat.jsonl" and res["config"]["data_stats"]["text_only"] == 4


def test_absent_keys_take_llamafactory_and_transformers_defaults(model_dir, tmp_path):
    (tmp_path / "m.yaml").write_text(f"model_name_or_path: {model_dir}\ndataset: a, b\nlr_scheduler_type: cosine\n"
                                     "learning_rate: 2e-5\n")  # 2e-5 (no dot) is a string to YAML
    s, ignored = release.sft_settings(str(tmp_path / "m.yaml"), world_size=1)
    assert ignored == []
    assert s["lr"] == 2e-5 and isinstance(s["lr"], float)
    assert (s["epochs"], s["micro_batch"], s["batch_size"], s["max_len"], s["max_pixels"]) == (3.0, 8, 8, 2048, 589824)
    assert (s["warmup_ratio"], s["weight_decay"], s["betas"], s["grad_clip"], s["seed"]) == (0.0, 0.0, (0.9, 0.999), 1.0, 42)
    assert (s["save_every"], s["keep_last"], s["dtype"], s["grad_ckpt"]) == (500, 0, "fp32", True)
    assert s["freeze_vision"] is True  # freeze_vision_tower and freeze_multi_modal_projector default to true
    assert s["agto_alpha"] == s["agto_beta"] == 0.0  # use_avar_attn_guide defaults to false: plain SFT
    assert s["resume"] == "auto"  # overwrite_output_dir false: LLaMA-Factory resumes from output_dir's newest
    assert s["data"] == os.path.join("data", "dataset_info.json") + ":a,b" and "new_special_tokens" not in s
    # transformers' cosine_with_min_lr decays to lr * min_lr_rate: this trainer's --min-lr-ratio
    (tmp_path / "m.yaml").write_text(f"model_name_or_path: {model_dir}\nlr_scheduler_type: cosine_with_min_lr\n"
                                     "lr_scheduler_kwargs:\n  min_lr_rate: 0.1\nadd_special_tokens: <think>,</think>\n")
    s, _ = release.sft_settings(str(tmp_path / "m.yaml"), world_size=1)
    assert s["min_lr_ratio"] == 0.1 and s["new_special_tokens"] == "<think>,</think>" and s["data"] is None


@pytest.mark.parametrize("case, replace, drop, message", [
    ("lora", {"finetuning_type: full": "finetuning_type: lora"}, (), ":10: finetuning_type: 'lora' is not implemented"),
    ("val split", {"# val_size: 0.1": "val_size: 0.1"}, (), ":57: val_size: 0.1 is not implemented"),
    ("unknown key", {"optim: adamw_torch": "use_galore: true"}, (), ":15: use_galore: not implemented here"),
    ("linear default", {}, ("lr_scheduler_type: cosine",), "lr_scheduler_type: absent: transformers' default, linear"),
    ("half frozen", {"freeze_vision_tower: false": "freeze_vision_tower: true"}, (),
     ":11: freeze_vision_tower: True with freeze_multi_modal_projector False"),
    ("string batch", {"per_device_train_batch_size: 1": "per_device_train_batch_size: one"}, (),
     "per_device_train_batch_size: 'one' is not an int"),
])
def test_unimplemented_keys_are_refused_with_their_line(tmp_path, case, replace, drop, message):
    with pytest.raises(UserError, match=re.escape(message)):
        release.sft_settings(edited(tmp_path, replace, drop))


def test_config_errors_are_one_message(tmp_path):
    cfg = edited(tmp_path, {"finetuning_type: full": "finetuning_type: lora"})
    p = subprocess.run([sys.executable, "train_sft.py", "--config", cfg], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1] == f"error: {cfg}:10: finetuning_type: 'lora' is not implemented here " \
                                                "(this trainer does 'full')"
    # the release's file as shipped names no dataset
    (tmp_path / "r.yaml").write_text(open(os.path.join(FIXTURES, "avar_sft.yaml")).read().replace(
        "model_name_or_path: Qwen/Qwen2.5-VL-7B-Instruct", "model_name_or_path: /nonexistent"))
    with pytest.raises(UserError, match="`dataset` names no dataset"):
        train_sft.main(["--config", str(tmp_path / "r.yaml")])


# --------------------------------------------------------------------------------------------
# dataset_info.json
# --------------------------------------------------------------------------------------------


def llamafactory_ids(tok_dir, system, turns, n_image_tokens):
    """LLaMA-Factory's qwen2_vl template (format_system / format_user / format_assistant slots) and
    its Qwen2-VL mm plugin (<image> -> <|vision_start|><|image_pad|>*n<|vision_end|>), tokenized
    by transformers: the ids and, for each, whether LLaMA-Factory trains on it."""
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(tok_dir)
    image = "<|vision_start|>" + "<|image_pad|>" * n_image_tokens + "<|vision_end|>"
    enc = lambda s: t.encode(s, add_special_tokens=False)  # noqa: E731
    ids, trained = enc(f"<|im_start|>system\n{system}<|im_end|>\n"), []
    trained += [False] * len(ids)
    for user, answer in turns:
        src = enc(f"<|im_start|>user\n{user.replace('<image>', image)}<|im_end|>\n<|im_start|>assistant\n")
        tgt = enc(f"{answer}<|im_end|>\n")
        ids += src + tgt
        trained += [False] * len(src) + [True] * len(tgt)
    return ids, trained


def test_sharegpt_entry_reads_as_llamafactory_renders_it(model_dir, tmp_path):
    info = tmp_path / "data"
    os.makedirs(info / "mllm_demo_data")
    png(info / "mllm_demo_data" / "1.png", 100)
    rec = {"messages": [{"content": "<image>Who are they?", "role": "user"},
                        {"content": "<think>look</think><answer>Kane</answer>", "role": "assistant"},
                        {"content": "What are they doing?<image>", "role": "user"},
                        {"content": "Celebrating.", "role": "assistant"}],
           "images": ["mllm_demo_data/1.png", "mllm_demo_data/1.png"]}
    (info / "mllm_demo.json").write_text(json.dumps([rec]))
    shutil.copy(os.path.join(FIXTURES, "dataset_info.json"), info)
    spec = str(info / "dataset_info.json") + ":mllm_demo"
    tok, proc = Tokenizer(model_dir), ImageProcessor.from_pretrained(model_dir)
    ds = SFTDataset(spec, tok, proc, records=release.dataset_records(spec))
    got = ds[0]
    want, trained = llamafactory_ids(model_dir, "You are a helpful assistant.",
                                     [(m["content"], a["content"]) for m, a in zip(rec["messages"][::2],
                                                                                  rec["messages"][1::2])], 4)
    assert got["input_ids"].tolist() == want
    ours = (got["labels"] != -100).tolist()
    nl = tok.encode("\n")[0]
    # LLaMA-Factory also trains the "\n" after each reply's <|im_end|>; everything else is the same
    assert [a or (b and i > 0 and want[i - 1] == tok.im_end_id and want[i] == nl) for i, (a, b) in
            enumerate(zip(ours, trained))] == trained
    assert sum(b and not a for a, b in zip(ours, trained)) == 2


def test_alpaca_entry_reads_only_its_mapped_columns(model_dir, tmp_path):
    """alpaca_en_demo maps no columns: instruction + "\\n" + input, output; a `history` or `system`
    field is not read unless `columns` names it, as in LLaMA-Factory."""
    shutil.copy(os.path.join(FIXTURES, "dataset_info.json"), tmp_path)
    (tmp_path / "alpaca_en_demo.json").write_text(json.dumps([
        {"instruction": "Add.", "input": "2 and 3", "output": "5", "system": "Be brief.",
         "history": [["hi", "hello"]]}]))
    spec = str(tmp_path / "dataset_info.json") + ":alpaca_en_demo"
    ((where, obj, err),) = list(release.dataset_records(spec))
    assert err is None and where.endswith("alpaca_en_demo.json:1 (record 0)")
    assert obj == {"messages": [{"role": "user", "content": "Add.\n2 and 3"}, {"role": "assistant", "content": "5"}],
                   "images": []}
    info = json.load(open(tmp_path / "dataset_info.json"))
    info["mine"] = {"file_name": "alpaca_en_demo.json", "columns": {"history": "history", "system": "system"}}
    json.dump(info, open(tmp_path / "dataset_info.json", "w"))
    ((_, obj, _),) = list(release.dataset_records(str(tmp_path / "dataset_info.json") + ":mine"))
    assert obj["system"] == "Be brief." and [m["content"] for m in obj["messages"]] == ["hi", "hello", "Add.\n2 and 3", "5"]


@pytest.mark.parametrize("name, message", [
    ("glaive_toolcall_en_demo", "columns.tools: tool use and preference data are not SFT records here"),
    ("dpo_en_demo", "ranking True is not implemented here"),
    ("alpaca_en", "hf_hub_url (a download) is not read here"),
    ("nope", "no dataset 'nope'"),
    ("identity", "identity.json not found"),
])
def test_entries_that_are_not_local_sft_data_are_refused(tmp_path, name, message):
    shutil.copy(os.path.join(FIXTURES, "dataset_info.json"), tmp_path)
    with pytest.raises(UserError, match=re.escape(message)):
        list(release.dataset_records(str(tmp_path / "dataset_info.json") + ":" + name))


def test_records_llamafactory_drops_or_fails_on_are_named(model_dir, tmp_path):
    shutil.copy(os.path.join(FIXTURES, "dataset_info.json"), tmp_path)
    png(tmp_path / "a.png", 10)
    recs = [{"messages": [{"role": "user", "content": "<image>Q"}, {"role": "assistant", "content": "A"}],
             "images": ["a.png"]},
            {"messages": [{"role": "assistant", "content": "A"}, {"role": "user", "content": "Q"}]},
            {"messages": [{"role": "user", "content": "Q"}]},
            {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
             "images": ["a.png"]}]
    (tmp_path / "mllm_demo.json").write_text("[\n" + ",\n".join(json.dumps(r) for r in recs) + "\n]\n")
    (tmp_path / "mllm_video_demo.json").write_text(json.dumps([{"messages": recs[0]["messages"], "videos": ["v.mp4"]}]))
    spec = str(tmp_path / "dataset_info.json") + ":mllm_demo,mllm_video_demo"
    tok, proc = Tokenizer(model_dir), ImageProcessor.from_pretrained(model_dir)
    with pytest.raises(UserError) as e:
        SFTDataset(spec, tok, proc, records=release.dataset_records(spec))
    msg = str(e.value)
    assert "4 invalid record(s)" in msg
    assert "mllm_demo.json:3 (record 1): message 0: role 'assistant' where 'user' is due" in msg
    assert "mllm_demo.json:4 (record 2): 1 turns: a record ends on an assistant turn" in msg
    assert "mllm_demo.json:5 (record 3): 1 images but no <image> placeholder" in msg
    assert "mllm_video_demo.json:1 (record 0): `videos` are not supported" in msg
    ds = SFTDataset(spec, tok, proc, skip_bad=True, records=release.dataset_records(spec))
    assert len(ds) == 1 and ds.stats["bad"] == 4
