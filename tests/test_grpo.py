"""The GRPO loop of train_grpo.py (below its marker) on CPU, with tiny random models and tiny data.

Each check compares against something independent of the code under test: the logits the sampler
actually drew from (captured inside model.generate), hand-written reward strings graded by
evaluate.py, the policy before the update, an uninterrupted run for the resumed one, and the
checkpoint on disk for the weights every process reports.
"""

import copy
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import model as model_module
import plot
import train_grpo as tg
import vas
from conftest import assert_scalars_are_metrics, tensorboard_events
from data import RESPONSE, DataError, ImageProcessor, Tokenizer
from model import Config, Qwen2_5_VL, VisionConfig, from_pretrained, init_weights, save_pretrained
from rollouts import Rollout
from toy import make_byte_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
TIMING = ("time_rollout", "time_reward", "step_time", "gen_tokens_per_s", "train_tokens_per_s")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def save_png(path, color, size=(56, 56)):
    arr = np.full((size[1], size[0], 3), 255, dtype=np.uint8)
    arr[size[1] // 4:, size[0] // 4:] = COLORS[color]  # a coloured block on white
    Image.fromarray(arr).save(path)


def make_model_dir(path, seed=0):
    """Our tiny Qwen2.5-VL (2 layers, 1 vision block, vocabulary 272 > the tokenizer's 270, as Qwen
    pads its embedding) + the byte tokenizer + a preprocessor capped at 112x112 pixels."""
    cfg = Config(vocab_size=272, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, mrope_section=[2, 3, 3], max_position_embeddings=4096,
                 image_token_id=268, video_token_id=269, vision_start_token_id=265, vision_end_token_id=266,
                 bos_token_id=256, eos_token_id=258,
                 vision=VisionConfig(depth=1, hidden_size=16, num_heads=1, intermediate_size=32,
                                     fullatt_block_indexes=[0], out_hidden_size=32))
    m = init_weights(Qwen2_5_VL(cfg), std=0.05, seed=seed)
    save_pretrained(m, str(path))
    make_byte_tokenizer(str(path))
    ImageProcessor(max_pixels=112 * 112).save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A model folder and 8 RL records in the flat form: 6 with an image (56x56 or 84x56: 4 or 6
    image tokens), one multiple choice with options, one text-only."""
    root = tmp_path_factory.mktemp("grpo_world")
    model_dir = make_model_dir(root / "model")
    os.makedirs(root / "img")
    records = []
    for i in range(6):
        color = list(COLORS)[i % 3]
        save_png(root / "img" / f"{i}.png", color, (56, 56) if i % 2 == 0 else (84, 56))
        records.append({"id": f"c{i}", "images": [f"img/{i}.png"], "question": "What color?", "answer": color,
                        "answer_type": "text"})
    records.append({"id": "mc", "image": "img/0.png", "question": "Which colour?", "options": ["blue", "red"],
                    "answer": "B"})
    records.append({"id": "txt", "images": [], "question": "What is 2 + 3?", "answer": "5"})
    data = root / "rl.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    return {"root": root, "model": model_dir, "data": str(data)}


def load(world):
    tok = Tokenizer(world["model"])
    improc = ImageProcessor.from_pretrained(world["model"])
    model = from_pretrained(world["model"], dtype=torch.float32)
    ds = tg.PromptDataset(world["data"], tok, improc)
    return model, tok, improc, ds


def parse(*extra):
    return tg.build_parser().parse_args(list(extra))


def rollout_from_texts(tok, enc, texts):
    """A Rollout of hand-written completions of one encoded prompt (each ends with <|im_end|>)."""
    rows = [tok.encode(t) + [tok.im_end_id] for t in texts]
    n = len(rows)
    comp = torch.full((n, max(map(len, rows))), tok.pad_id)
    for i, r in enumerate(rows):
        comp[i, :len(r)] = torch.tensor(r)
    return Rollout([enc["input_ids"]] * n, [enc["roles"]] * n, [enc["pixel_values"]] * n,
                      [enc["image_grid_thw"]] * n, [enc["record"]] * n, comp,
                      torch.tensor([len(r) for r in rows]), torch.zeros(n, dtype=torch.long), list(texts),
                      torch.ones(n, dtype=torch.bool))


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


def test_prompts_match_evaluation_and_bad_records_name_the_line(world, tmp_path):
    import benchmarks
    import evaluate
    _, tok, improc, ds = load(world)
    assert len(ds) == 8 and ds.stats["text_only"] == 1
    mc = ds.records[6]
    assert mc["options"] == ["blue", "red"] and mc["answer_type"] == "multi_choice"
    # the prompt is evaluate.py's, on the same record read by benchmarks.read_jsonl
    ref = {r["id"]: r for r in benchmarks.read_jsonl(world["data"])}
    for i in (0, 6):
        want = evaluate.encode_record(tok, improc, ref[ds.records[i]["id"]])
        assert torch.equal(ds[i]["input_ids"], want["input_ids"]) and torch.equal(ds[i]["roles"], want["roles"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n" + json.dumps({"question": "q"}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2"):
        tg.PromptDataset(str(bad), tok, improc)


# --------------------------------------------------------------------------------------------
# rewards
# --------------------------------------------------------------------------------------------


def test_reward_visual_only_for_correct_and_format_only_scores_lambda_f(world, monkeypatch):
    """Real strings through the real reward (evaluate.py graders, vas.visual_reward): r_visual is
    computed for the correct rows only (the spy sees them, and nothing else) and 0 for wrong ones;
    a well-formatted wrong answer scores exactly lambda_f."""
    model, tok, _, ds = load(world)
    enc = ds[0]  # gold "red", one image
    texts = ["<think>I see red.</think><answer>red</answer>",  # correct, formatted
             "<think>I see blue.</think><answer>blue</answer>",  # wrong, formatted: lambda_f only
             "The answer is red",  # correct, not formatted
             "<answer>blue</answer>"]  # wrong, not formatted: 0
    ro = rollout_from_texts(tok, enc, texts)
    seen = []
    real = vas.visual_reward

    def spy(m, input_ids, attention_mask, roles, *a, **k):
        seen.append((input_ids.clone(), roles.clone()))
        return real(m, input_ids, attention_mask, roles, *a, **k)

    monkeypatch.setattr(vas, "visual_reward", spy)
    args = parse()  # lambda_v 0.3, lambda_f 0.1
    acc, fmt, vis, total = tg.compute_rewards(model, ro, args, tg.Dist(), tok.pad_id)
    assert acc.tolist() == [1, 0, 1, 0] and fmt.tolist() == [1, 1, 0, 0]
    assert vis[1] == 0 and vis[3] == 0 and vis[0] > 0 and vis[2] > 0
    assert sum(ids.shape[0] for ids, _ in seen) == 2  # only the two correct rows were measured
    ids, roles = seen[0]
    n0 = int(ro.lengths[0])
    assert (roles[0] == RESPONSE).sum() == n0 and (roles == RESPONSE).sum() == ro.lengths[[0, 2]].sum()
    assert torch.equal(roles[0][roles[0] != RESPONSE][-len(enc["roles"]):], enc["roles"])
    assert total[1].item() == pytest.approx(0.1, abs=1e-7)
    assert total[3].item() == 0.0
    assert total[0].item() == pytest.approx(1 + 0.3 * vis[0].item() + 0.1, abs=1e-6)
    assert total[2].item() == pytest.approx(1 + 0.3 * vis[2].item(), abs=1e-6)
    # an independent call on row 0 alone (no padding) gives the same r_visual
    b = tg.pack_sequences(ro, [0], tok.pad_id, torch.device("cpu"))
    alone = real(model, b["input_ids"], b["attention_mask"], b["roles"], b["pixel_values"], b["image_grid_thw"],
                 layers=range(8))
    assert vis[0].item() == pytest.approx(alone.item(), rel=1e-5)
    # lambda_v = 0 disables the attention pass altogether
    seen.clear()
    _, _, vis0, _ = tg.compute_rewards(model, ro, parse("--lambda-v", "0"), tg.Dist(), tok.pad_id)
    assert not seen and not vis0.any()


# --------------------------------------------------------------------------------------------
# log-probs: the training forward against the sampler
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_training_logprobs_equal_generation_logits(world, monkeypatch, temperature):
    """Ragged prompts (two image sizes, text-only) x 2 samples, ragged completions (many stop ids):
    the log-probs of the sampled tokens from one forward over left-padded prompt + right-padded
    completion (regrouped, so the padding differs from generation's) equal log_softmax(logits / T)
    of the logits the sampler drew from, over the tokenizer's ids, within 1e-5."""
    model, tok, _, ds = load(world)
    captured = []
    real = model_module.sample_next

    def spy(logits, *a, **k):
        captured.append(logits.detach().clone())
        return real(logits, *a, **k)

    monkeypatch.setattr(model_module, "sample_next", spy)
    monkeypatch.setattr(tok, "stop_ids", tuple(tok.stop_ids) + tuple(range(0, 256, 6)))  # ~1 in 6: ragged
    encs = [ds[0], ds[1], ds[7]]  # 4 image tokens, 6 image tokens, no image
    ro = tg.generate_rollouts(model, tok, encs, [0, 1, 2], 2, max_new_tokens=12, temperature=temperature,
                              top_p=1.0, seed=3)
    assert len(set(ro.lengths.tolist())) > 2 and len(set(len(p) for p in ro.prompts)) == 3
    ref = torch.stack(captured, 1)[..., :tok.vocab_size].float()  # (N, steps, V_tok)
    ref = torch.log_softmax(ref / temperature, -1)
    with torch.no_grad():
        for idx in ([5, 0, 3], [1, 4, 2]):
            b = tg.pack_sequences(ro, idx, tok.pad_id, torch.device("cpu"))
            lp = tg.completion_logprobs(model, b, temperature, tok.vocab_size)
            for r, i in enumerate(idx):
                n = int(ro.lengths[i])
                want = ref[i, torch.arange(n), ro.completions[i, :n]]
                assert torch.allclose(lp[r, :n], want, atol=1e-5, rtol=0), (i, (lp[r, :n] - want).abs().max())
            assert not b["mask"][torch.arange(len(idx)), :].logical_and(
                torch.arange(b["Lc"])[None] >= ro.lengths[idx][:, None]).any()


# --------------------------------------------------------------------------------------------
# one update
# --------------------------------------------------------------------------------------------


def _seq_logprob(model, ro, tok, temperature=1.0):
    with torch.no_grad():
        b = tg.pack_sequences(ro, list(range(len(ro.prompts))), tok.pad_id, torch.device("cpu"))
        lp = tg.completion_logprobs(model, b, temperature, tok.vocab_size)
    return lp, b["mask"]


def test_one_step_raises_logprob_of_rewarded_completions(world):
    """One rollout-and-update step with a reward for completions whose first token is even: their
    log-probability rises relative to the others (measured on the same samples before/after)."""
    model, tok, _, ds = load(world)
    before = copy.deepcopy(model)
    args = parse("--group-size", "8", "--max-new-tokens", "4", "--micro-batch", "4", "--lr", "3e-3",
                 "--weight-decay", "0", "--grad-clip", "0")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)

    def reward_fn(ro):
        acc = (ro.completions[:, 0] % 2 == 0).float()
        return acc, torch.zeros_like(acc), torch.zeros_like(acc)

    m, ro = tg.grpo_step(model, opt, tok, [ds[0], ds[3]], [10, 11], args, tg.Dist(), step=0, reward_fn=reward_fn)
    won = ro.completions[:, 0] % 2 == 0
    assert 0 < int(won.sum()) < len(won) and m["zero_spread_frac"] < 1
    assert m["n_trained_sequences"] == 16 and m["ratio_mean"] == pytest.approx(1.0)
    lp0, mask = _seq_logprob(before, ro, tok)
    lp1, _ = _seq_logprob(model, ro, tok)
    d_first = lp1[:, 0] - lp0[:, 0]  # the rewarded decision
    assert d_first[won].mean() > 0 > d_first[~won].mean()
    d_seq = ((lp1 - lp0) * mask).sum(1)
    assert d_seq[won].mean() > d_seq[~won].mean()


# --------------------------------------------------------------------------------------------
# runs: checkpoints, exact resume, two processes
# --------------------------------------------------------------------------------------------


def token_parity_reward(ro):
    """A reward with spread inside groups: the fraction of even completion tokens."""
    pos = torch.arange(ro.completions.shape[1])[None]
    m = pos < ro.lengths[:, None]
    acc = ((ro.completions % 2 == 0) & m).sum(1).float() / ro.lengths.clamp(min=1)
    return acc, torch.zeros_like(acc), torch.zeros_like(acc)


def run_args(world, out, steps, *extra):
    return ["--data", world["data"], "--model", world["model"], "--out", str(out), "--prompts-per-step", "2",
            "--group-size", "4", "--max-new-tokens", "6", "--micro-batch", "3", "--max-steps", str(steps),
            "--lr", "3e-3", "--save-every", "2", "--device", "cpu", "--dtype", "fp32", *extra]


def read_metrics(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def strip(row):
    return {k: v for k, v in row.items() if k not in TIMING}


def test_short_run_checkpoints_and_exact_resume(world, tmp_path):
    """3 steps (2 PPO epochs, KL to the reference, dropped zero-spread groups), checkpoints at steps
    2 and 3; a run stopped after step 2 (its `latest` names step_2) and resumed gives the same
    metrics for step 3 as the uninterrupted run, and the same weights. Both draw their curves
    (every GRPO panel has its curve) and report to TensorBoard, where the resumed run shows each
    step once, with the values of its metrics.jsonl."""
    extra = ("--ppo-epochs", "2", "--kl-coef", "0.05", "--drop-zero-spread", "--report-to", "tensorboard")
    a = tmp_path / "a"
    res = tg.main(run_args(world, a, 3, *extra), reward_fn=token_parity_reward)
    assert sorted(os.listdir(a)) == ["latest", "metrics.jsonl", "run_config.json", "step_2", "step_3", "tensorboard",
                                     "train_state", "training_curves.png"]
    assert open(a / "latest").read().strip() == "step_3"
    for f in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"):
        assert os.path.exists(a / "step_3" / f)
    assert sorted(os.listdir(a / "train_state")) == ["step_2.pt", "step_3.pt"]
    ma = read_metrics(a)
    assert [r["step"] for r in ma] == [1, 2, 3] and res["checkpoint"] == str(a / "step_3")
    assert all(r["loss"] is not None and r["kl"] is not None for r in ma)
    assert ma[-1]["kl"] > 0 and any(r["clip_frac"] > 0 or r["ratio_max"] != 1.0 for r in ma)
    # the stopped run: step_3 never written, `latest` at step_2, metrics of steps 1-3 (3 is redone)
    b = tmp_path / "b"
    shutil.copytree(a, b, ignore=shutil.ignore_patterns("step_3"))
    (b / "latest").write_text("step_2\n")
    tg.main(run_args(world, b, 3, *extra, "--resume"), reward_fn=token_parity_reward)
    mb = read_metrics(b)
    assert [r["step"] for r in mb] == [1, 2, 3]
    assert strip(mb[2]) == strip(ma[2])
    assert_scalars_are_metrics(tensorboard_events(b / "tensorboard")[0], mb)
    img = Image.open(b / plot.CURVES_PNG).convert("RGB")
    _, axes = plot.draw_curves([(str(b), mb)], plot.GRPO_PANELS)
    for key, ax in axes.items():
        assert plot.PALETTE[0] in {c for _, c in img.crop(ax.box).getcolors(1 << 24)}, key
    wa = from_pretrained(str(a / "step_3"), dtype=torch.float32).state_dict()
    wb = from_pretrained(str(b / "step_3"), dtype=torch.float32).state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    w0 = from_pretrained(world["model"], dtype=torch.float32).state_dict()
    assert not all(torch.equal(wa[k], w0[k]) for k in wa)  # the steps did change the weights


RUNNER = """
import os, sys
sys.path.insert(0, {root!r})
import torch
import model, train_grpo
# Any non-empty response counts as correct (a random model answers nothing), so r_visual runs,
# through FSDP, and every other one as well formatted (spread in every group). Process 1 samples
# <|im_end|> first in every row: its decode stops after one token while process 0 decodes all of
# them (no collective may hide in a decode step); its empty responses all score 0 (zero spread,
# dropped), so it runs only zero-weight dummy passes for the r_visual, old-policy, reference and
# training micro-batches that process 0 runs.
def acc_and_format(texts, records):
    acc = torch.tensor([float(len(t) > 0) for t in texts])
    return acc, acc * (torch.arange(len(texts)) % 2 == 0)
train_grpo.accuracy_and_format = acc_and_format
if os.environ["RANK"] == "1":
    real = model.sample_next
    model.sample_next = lambda logits, *a, **k: torch.full_like(real(logits, *a, **k), 258)
train_grpo.main()
"""


def test_two_processes_keep_identical_weights(world, tmp_path):
    """torchrun, 2 CPU processes (gloo, FSDP2; 2 PPO epochs, KL to the reference) that decode
    different numbers of steps and hold different numbers of micro-batches: the full weights every process sees are identical after
    each step, change from step to step, and are those of the checkpoint on disk."""
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER.format(root=ROOT))
    out = tmp_path / "dist"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(runner),
           *run_args(world, out, 2, "--checksum", "--lambda-f", "0.5", "--drop-zero-spread",
                     "--ppo-epochs", "2", "--kl-coef", "0.01")]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-4000:]
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    sums = [r["param_checksums"] for r in rows]
    assert all(len(s) == 2 and s[0] == s[1] for s in sums), sums
    initial = tg.weights_checksum(from_pretrained(world["model"], dtype=torch.float32), False)
    assert initial != sums[0][0] != sums[1][0]  # both steps updated the weights
    assert any(r["reward_visual"] > 0 for r in rows)  # the FSDP r_visual path ran
    assert rows[0]["n_sequences"] == 8
    assert all(r["n_trained_sequences"] == 4 for r in rows)  # process 1's groups were all dropped
    assert all(r["accuracy"] == 0.5 for r in rows) and rows[0]["response_length"] == 3.5
    on_disk = tg.weights_checksum(from_pretrained(str(out / "step_2"), dtype=torch.float32), False)
    assert on_disk == sums[1][0]
    cfg = json.load(open(out / "run_config.json"))
    assert cfg["world_size"] == 2 and cfg["fsdp"]
