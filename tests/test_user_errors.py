"""A user's mistake ends every script with one message naming the file, never a traceback.

Each case runs a script as a user would (a subprocess) on one bad input (a missing, non-UTF-8,
empty or malformed data or benchmark file, a folder that is not a checkpoint, a checkpoint whose
shapes do not match its config, a truncated safetensors file, a missing tokenizer) and checks:
non-zero exit, `error: ` and the file's name on stderr, no "Traceback".
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from data import ImageProcessor
from model import Config, Qwen2_5_VL, VisionConfig, init_weights, save_pretrained
from toy import make_byte_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A good model folder, image and data, and one bad variant of each."""
    root = tmp_path_factory.mktemp("user_errors")
    cfg = Config(vocab_size=272, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, mrope_section=[2, 3, 3], max_position_embeddings=4096,
                 image_token_id=268, video_token_id=269, vision_start_token_id=265, vision_end_token_id=266,
                 bos_token_id=256, eos_token_id=258,
                 vision=VisionConfig(depth=1, hidden_size=16, num_heads=1, intermediate_size=32,
                                     fullatt_block_indexes=[0], out_hidden_size=32))
    model = root / "model"
    save_pretrained(init_weights(Qwen2_5_VL(cfg), std=0.05), str(model))
    make_byte_tokenizer(str(model))
    ImageProcessor(max_pixels=112 * 112).save(str(model))

    mismatch = root / "mismatch"  # config.json says 2 layers, the weights hold 1
    shutil.copytree(model, mismatch)
    c = json.load(open(mismatch / "config.json"))
    c["num_hidden_layers"] = 2
    json.dump(c, open(mismatch / "config.json", "w"))
    truncated = root / "truncated"  # an interrupted copy
    shutil.copytree(model, truncated)
    size = os.path.getsize(truncated / "model.safetensors")
    os.truncate(truncated / "model.safetensors", size - 1000)
    no_tok = root / "no_tokenizer"
    shutil.copytree(model, no_tok)
    os.remove(no_tok / "tokenizer.json")
    not_ckpt = root / "not_a_checkpoint"  # e.g. a run folder before its first checkpoint
    os.makedirs(not_ckpt)
    (not_ckpt / "metrics.jsonl").write_text("")

    run = root / "run"  # a run whose training state was cut short (a full disk)
    shutil.copytree(model, run / "step_1")
    (run / "latest").write_text("step_1\n")
    os.makedirs(run / "train_state")
    (run / "train_state" / "step_1.pt").write_bytes(b"PK\x03\x04" + b"\0" * 100)

    arr = np.full((56, 56, 3), 200, dtype=np.uint8)
    Image.fromarray(arr).save(root / "a.png")
    good_sft = json.dumps({"image": "a.png", "question": "Which color?", "response": "<answer>grey</answer>"})
    good_rl = json.dumps({"images": ["a.png"], "question": "Which color?", "answer": "grey"})
    (root / "sft.jsonl").write_text((good_sft + "\n") * 4)
    (root / "rl.jsonl").write_text((good_rl + "\n") * 4)
    (root / "bad_record.jsonl").write_text(good_sft + "\n" + '{"question": "no answer here"\n')
    (root / "latin1.jsonl").write_bytes((good_sft[:-2] + ' caf\xe9"}\n').encode("latin-1"))
    (root / "latin1.tsv").write_bytes("index\tquestion\tanswer\timage_path\n0\tcaf\xe9?\tA\ta.png\n".encode("latin-1"))
    (root / "empty.tsv").write_text("index\tquestion\tanswer\timage_path\n")
    (root / "empty.jsonl").write_text("\n")
    (root / "no_images.tsv").write_text("index\tquestion\tanswer\n0\tWhat is 2+3?\t5\n")
    (root / "cut_preds.jsonl").write_text('{"id": "0", "correct": true, "vas": 1.0}\nnot json\n{"id": "1"}\n')
    os.makedirs(root / "cut_run")
    (root / "cut_run" / "metrics.jsonl").write_text('{"step": 1, "lm_loss": 2.0}\n{"step": 2,\n{"step": 3}\n')
    (root / "bench.jsonl").write_text(json.dumps({"id": "0", "images": ["a.png"], "question": "Which?",
                                                  "answer": "grey"}) + "\n")
    return root


SFT = ["train_sft.py", "--out", "{root}/runs/sft", "--batch-size", "2", "--micro-batch", "2", "--max-steps", "1",
       "--num-workers", "0", "--device", "cpu"]
GRPO = ["train_grpo.py", "--out", "{root}/runs/grpo", "--prompts-per-step", "2", "--group-size", "2",
        "--max-new-tokens", "2", "--max-steps", "1", "--device", "cpu"]
EVAL = ["evaluate.py", "--out", "{root}/eval", "--device", "cpu", "--no-progress", "--max-new-tokens", "2"]
VAS = ["vas.py", "--question", "Which?", "--out", "{root}/heat.png", "--device", "cpu"]

CASES = {  # name: (command, the file the message must name)
    "sft missing data": (SFT + ["--data", "{root}/nope.jsonl", "--model", "{root}/model"], "nope.jsonl"),
    "sft bad record": (SFT + ["--data", "{root}/bad_record.jsonl", "--model", "{root}/model"], "bad_record.jsonl:2"),
    "sft non-utf8 data": (SFT + ["--data", "{root}/latin1.jsonl", "--model", "{root}/model"], "latin1.jsonl"),
    "sft missing model": (SFT + ["--data", "{root}/sft.jsonl", "--model", "{root}/nope"], "nope"),
    "sft not a checkpoint": (SFT + ["--data", "{root}/sft.jsonl", "--model", "{root}/not_a_checkpoint"],
                             "not_a_checkpoint"),
    "sft shape mismatch": (SFT + ["--data", "{root}/sft.jsonl", "--model", "{root}/mismatch"], "mismatch"),
    "sft truncated safetensors": (SFT + ["--data", "{root}/sft.jsonl", "--model", "{root}/truncated"],
                                  "truncated/model.safetensors"),
    "sft missing tokenizer": (SFT + ["--data", "{root}/sft.jsonl", "--model", "{root}/no_tokenizer"], "tokenizer.json"),
    "sft resume not a run": (SFT + ["--data", "{root}/sft.jsonl", "--model", "{root}/model",
                                    "--resume", "{root}/not_a_checkpoint"], "not_a_checkpoint"),
    "sft resume truncated state": (SFT + ["--data", "{root}/sft.jsonl", "--model", "{root}/model", "--out",
                                          "{root}/run", "--resume"], "train_state/step_1.pt"),
    "grpo missing data": (GRPO + ["--data", "{root}/nope.jsonl", "--model", "{root}/model"], "nope.jsonl"),
    "grpo bad record": (GRPO + ["--data", "{root}/bad_record.jsonl", "--model", "{root}/model"], "bad_record.jsonl:2"),
    "grpo non-utf8 data": (GRPO + ["--data", "{root}/latin1.jsonl", "--model", "{root}/model"], "latin1.jsonl"),
    "grpo not a checkpoint": (GRPO + ["--data", "{root}/rl.jsonl", "--model", "{root}/not_a_checkpoint"],
                              "not_a_checkpoint"),
    "grpo truncated safetensors": (GRPO + ["--data", "{root}/rl.jsonl", "--model", "{root}/truncated"],
                                   "truncated/model.safetensors"),
    "eval missing benchmark": (EVAL + ["--model", "{root}/model", "--bench", "{root}/nope.tsv"], "nope.tsv"),
    "eval non-utf8 benchmark": (EVAL + ["--model", "{root}/model", "--bench", "{root}/latin1.tsv"], "latin1.tsv"),
    "eval empty tsv": (EVAL + ["--model", "{root}/model", "--bench", "{root}/empty.tsv"], "empty.tsv"),
    "eval empty jsonl": (EVAL + ["--model", "{root}/model", "--bench", "{root}/empty.jsonl"], "empty.jsonl"),
    "eval benchmark without images": (EVAL + ["--model", "{root}/model", "--bench", "{root}/no_images.tsv"],
                                      "no_images.tsv"),
    "eval not a checkpoint": (EVAL + ["--model", "{root}/not_a_checkpoint", "--bench", "{root}/bench.jsonl"],
                              "not_a_checkpoint"),
    "eval shape mismatch": (EVAL + ["--model", "{root}/mismatch", "--bench", "{root}/bench.jsonl"], "mismatch"),
    "correlate missing predictions": (["evaluate.py", "--correlate", "{root}/nope_preds.jsonl"], "nope_preds.jsonl"),
    "correlate bad predictions line": (["evaluate.py", "--correlate", "{root}/cut_preds.jsonl"], "cut_preds.jsonl"),
    "vas missing image": (VAS + ["--model", "{root}/model", "--image", "{root}/nope.png"], "nope.png"),
    "vas missing tokenizer": (VAS + ["--model", "{root}/no_tokenizer", "--image", "{root}/a.png"], "tokenizer.json"),
    "vas truncated safetensors": (VAS + ["--model", "{root}/truncated", "--image", "{root}/a.png"],
                                  "truncated/model.safetensors"),
    "plot bad metrics line": (["plot.py", "{root}/cut_run", "--out", "{root}/curves.png"], "cut_run/metrics.jsonl: line 2"),
    "synthesize missing input": (["synthesize.py", "--input", "{root}/nope.jsonl", "--output", "{root}/o.jsonl",
                                  "--model", "teacher", "--base-url", "http://127.0.0.1:9/v1"], "nope.jsonl"),
    "synthesize non-utf8 input": (["synthesize.py", "--input", "{root}/latin1.jsonl", "--output",
                                   "{root}/o2.jsonl", "--model", "teacher", "--base-url", "http://127.0.0.1:9/v1"],
                                  "latin1.jsonl"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_user_error_is_one_message(files, case):
    cmd, named = CASES[case]
    cmd = [a.format(root=files) for a in cmd]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode != 0, (case, p.stdout[-1000:])
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, p.stderr[-3000:]
    message = p.stderr[p.stderr.index("error: "):]  # its first line, and the records it lists
    assert named in message, message


@pytest.mark.parametrize("script, kind, hidden", [("train_sft.py", "wandb", ["wandb"]),
                                                  ("train_grpo.py", "tensorboard", ["tensorboard", "torch.utils.tensorboard"])])
def test_report_to_without_its_package_is_one_message(files, script, kind, hidden):
    """--report-to with its package missing (hidden from import in the script's process): one
    `error:` line that says what to install, before any data or model is read."""
    base = SFT if script == "train_sft.py" else GRPO
    argv = [a.format(root=files) for a in base + ["--data", "{root}/nope.jsonl", "--model", "{root}/model",
                                                  "--report-to", kind]]
    code = (f"import runpy, sys; sys.modules.update(dict.fromkeys({hidden!r})); sys.argv = {argv!r}; "
            f"runpy.run_path({script!r}, run_name='__main__')")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: --report-to {kind}: ") and \
        errors[0].endswith(f"pip install {kind}"), p.stderr[-3000:]
