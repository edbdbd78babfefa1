"""A custom GRPO loop for Qwen2.5-VL with AVAR's visual-anchored reward shaping.

The RL algorithm itself (advantages, log-probs, the clipped policy loss, KL, aggregation, the
reward of AVAR eq. 4c) is in grpo.py as pure functions on tensors; this file is the loop: sampling
G completions per prompt (rollouts.py), rewards (grading.py for r_acc and r_format, vas.py for
r_visual), the old/reference log-prob passes, and the optimizer steps.

Run:
    python train_grpo.py --data rl.jsonl --model DIR
    torchrun --nproc_per_node=8 train_grpo.py --data rl.jsonl --model DIR

Outputs under --out as train_sft.py's: run_config.json, metrics.jsonl (one line per rollout step;
--report-to: also to TensorBoard or W&B), training_curves.png (drawn at every checkpoint), step_N/,
train_state/step_N.pt, latest.
"""

import argparse
import contextlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

import grading
import plot
import training
import vas
from benchmarks import IMAGE_ERRORS, encode_record
from data import (IMAGE_PLACEHOLDER, PAD_ROLE, RESPONSE, DataError, ImageProcessor, Tokenizer, UserError,
                  answer_text, encode_chat, image_tokens, normalize_record, prompt_content,
                  read_records, run_cli)
from grpo import aggregate, group_advantages, kl_k3, policy_loss, response_mask, token_logprobs, total_reward
from hub import check_model_folder
from model import from_pretrained
from release import read_format_prompt
from rollouts import cat_images, generate_rollouts, generation_mode, rollout_seed
from training import Dist, weights_checksum

# One step, for `--prompts-per-step` prompts shared out over the processes (each prompt and its G
# samples stay on one process, so a group never spans processes):
#
#   1. rollout    G samples per prompt with model.generate (rollouts.py: KV cache; temperature,
#                 top-p; a seed made from (seed, step, rank); ids >= tokenizer size never drawn).
#                 Under FSDP the parameters are gathered once for the whole decode, so that
#                 processes whose samples stop at different lengths issue no per-token collectives.
#   2. rewards    r_acc = grade(extract_answer(text)), r_format = format_ok(text) (grading.py, the
#                 graders of the evaluation); r_visual = vas.visual_reward over the response rows of
#                 prompt + completion, computed for correct answers only; r = total_reward(...).
#   3. advantages group_advantages over the rewards of the whole step (all-gathered, so "batch"
#                 scaling and the zero-spread fraction are global).
#   4. update     --ppo-epochs optimizer steps on the rollout batch, each accumulating gradients over
#                 micro-batches; policy_loss against the log-probs of the policy that sampled
#                 (+ kl_coef * k3 to the frozen initial policy), aggregated with the step's global
#                 token / sequence counts.
#
# The sequence layout of every forward after the rollout (prompt left-padded, completion
# right-padded, so every completion starts at column Lp):
#
#       | pad pad p p p p | c c c c pad |      row 0
#       | p p p p p p p p | c c pad pad |      row 1
#         <---- Lp -----> <---- Lc --->
#
# The model computes M-RoPE positions over the non-padding tokens of each row, so completion token
# t sits at (last prompt position + 1 + t): what generate gave it (cache index + rope_delta). The
# logits of columns Lp-1 .. Lp+Lc-2 predict the completion; masks come from the sampler's lengths.
#
# Multi-process design: training.py's, shared with train_sft.py (torchrun, RANK/WORLD_SIZE, gloo on
# CPU, FSDP2 units per vision block and decoder layer, bf16 compute with float32 master weights,
# atomic step_N checkpoints with a `latest` pointer, metrics.jsonl, NaN stop). Under FSDP every
# process must run the same number of forwards and backwards: where processes hold different
# numbers of micro-batches (correct answers for r_visual, --drop-zero-spread), the short ones run
# zero-weight dummy micro-batches (training.balanced_chunks).


def build_parser():
    p = argparse.ArgumentParser(
        description="GRPO of Qwen2.5-VL with AVAR's visual-anchored reward shaping (arXiv 2603.03825, 4c)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # data
    p.add_argument("--data", default="toy/rl.jsonl",
                   help="prompts with gold answers, JSON lines or a .json array: {images, question (or EasyR1 problem), "
                        "answer, options?, answer_type?}")
    p.add_argument("--model", default="runs/sft",
                   help="initial policy: a Hugging Face folder, or a run folder whose `latest` names one (train_sft.py's --out)")
    p.add_argument("--out", default="runs/grpo", help="checkpoints, metrics.jsonl, run_config.json")
    p.add_argument("--max-prompt-len", type=int, default=2048,
                   help="prompts longer than this (image tokens included) are dropped and counted (released config: 2048)")
    p.add_argument("--skip-bad", action="store_true", help="drop invalid records (counted) instead of stopping")
    p.add_argument("--format-prompt", default=None, metavar="FILE.jinja",
                   help="EasyR1's format prompt (the release's math.jinja / r1v.jinja): the user turn is its "
                        "rendering of {{ content }}, the record's question as written, instead of this project's "
                        "instruction (needs jinja2)")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="image resize bound; default: the model folder's preprocessor_config.json (as evaluate.py)")
    p.add_argument("--min-pixels", type=int, default=None, help="default: the model folder's preprocessor_config.json")
    # rollouts
    p.add_argument("--prompts-per-step", type=int, default=32,
                   help="prompts per rollout batch, all processes together (each sampled --group-size times)")
    p.add_argument("--group-size", type=int, default=8, help="samples per prompt, G (paper: 8, released config: 5)")
    p.add_argument("--max-new-tokens", type=int, default=256,
                   help="longest completion (released config: 2048; toy responses are < 200 tokens)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (> 0); the training "
                   "forward divides its logits by the same value")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1.0: the full distribution)")
    p.add_argument("--gen-batch", type=int, default=0,
                   help="sequences per generate call on one process (0: all of its prompts x G at once)")
    # rewards
    p.add_argument("--lambda-v", type=float, default=0.3, help="weight of r_visual (AVAR 4c); 0 disables it (no attention pass)")
    p.add_argument("--lambda-f", type=float, default=0.1, help="weight of r_format; 0 disables it")
    p.add_argument("--vas-layers", default="0-7", help="layers of r_visual, e.g. 0-7 or 0,2,4 (released config: 0-7)")
    p.add_argument("--visual-form", default="ratio", choices=["ratio", "share"],
                   help="r_visual per token: V / (S + eps) (the paper's) or V / (V + S + eps), bounded by 1 "
                        "(see vas.visual_reward)")
    # advantages and loss
    p.add_argument("--adv-scale", default="group", choices=["group", "batch", "none"],
                   help="divide centred rewards by the group's std, the batch's std, or nothing (Dr. GRPO)")
    p.add_argument("--drop-zero-spread", action="store_true",
                   help="leave groups whose rewards are all equal (zero advantage) out of the update and its counts")
    p.add_argument("--ppo-epochs", type=int, default=1,
                   help="optimizer steps per rollout batch; with 1 the ratio is exactly 1 and the clip never fires")
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per training forward on one process")
    p.add_argument("--clip-low", type=float, default=0.2, help="ratio clip 1 - eps_low (all implementations: 0.2)")
    p.add_argument("--clip-high", type=float, default=0.3,
                   help="ratio clip 1 + eps_high (released AVAR config / EasyR1: 0.3; DAPO 0.28; TRL 0.2)")
    p.add_argument("--dual-clip", type=float, default=3.0,
                   help="dual-clip constant c for negative advantages (EasyR1: 3); 0 disables")
    p.add_argument("--kl-coef", type=float, default=0.0,
                   help="beta of the k3 KL to the frozen initial policy (paper: 0, released config: 1e-2); "
                        "0 loads no reference model")
    p.add_argument("--loss-agg", default="token_mean", choices=["token_mean", "seq_mean", "dr_grpo"],
                   help="token_mean: / response tokens of the step; seq_mean: mean of per-sequence means; "
                        "dr_grpo: / (sequences x --max-new-tokens)")
    # optimisation
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the prompts")
    p.add_argument("--max-steps", type=int, default=0, help="rollout steps; > 0 overrides --epochs")
    p.add_argument("--lr", type=float, default=1e-6, help="learning rate (paper and released config: 1e-6)")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW decay on matrices (EasyR1: 1e-2)")
    p.add_argument("--warmup-steps", type=int, default=0, help="linear warmup, then a constant lr (EasyR1)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max global gradient norm (0: no clipping)")
    p.add_argument("--freeze-vision", action="store_true", help="do not train the vision tower")
    # system
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                   help="compute dtype; auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--fsdp", action="store_true", help="FSDP2 even in one process (always on with several)")
    p.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing of decoder layers and vision blocks")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--seed", type=int, default=0, help="data order and the rollout seeds (seed, step, rank)")
    p.add_argument("--report-to", default="none", choices=training.REPORT_TO,
                   help="also log every metrics.jsonl row to TensorBoard (OUT/tensorboard) or W&B (needs that package)")
    # checkpoints
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps (and at the end); 0: end only")
    p.add_argument("--keep-last", type=int, default=0, help="keep only the last N checkpoints (0: all)")
    p.add_argument("--save-dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="dtype of the saved weights; auto: the dtype the source config.json states")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue a run: bare --resume reads OUT/latest; or a step_N folder")
    p.add_argument("--checksum", action="store_true",
                   help="log a checksum of the full weights as every process sees them (param_checksums)")
    return p


# ---------------------------------------------------------------------------------------------
# data: prompts with gold answers
# ---------------------------------------------------------------------------------------------

def _question_of(rec, as_written=False):
    """The text of a normalised record's single user turn, each image part written back as the
    `<image>` placeholder, so the images stay where the record put them (data.prompt_content);
    leading images first and the text stripped, or (as_written: EasyR1's `content`) as the record
    has it."""
    users = [m for m in rec.messages if m["role"] == "user"]
    if len(users) != 1:
        raise ValueError(f"an RL record holds one user turn (the question), not {len(users)}")
    parts = users[0]["content"]
    if as_written:
        return "".join(p["text"] if p["type"] == "text" else IMAGE_PLACEHOLDER for p in parts)
    k = 0  # images that open the question ("<image>\nQ"): images first, then the question, as in evaluation
    while k < len(parts) and (parts[k]["type"] == "image" or not parts[k]["text"].strip()):
        k += 1
    n_lead = sum(p["type"] == "image" for p in parts[:k])
    rest = "".join(p["text"] if p["type"] == "text" else IMAGE_PLACEHOLDER for p in parts[k:])
    return IMAGE_PLACEHOLDER * n_lead + rest.strip()


class PromptDataset:
    """RL records: images (or none), a question, the gold answer; options and answer_type optional.

    The file (JSON lines or a JSON array) is read by data.read_records and data.normalize_record, the
    SFT reader (flat / EasyR1 form {"images", "question" or "problem", "answer" (a string or a
    number)}, also the chat forms with a top-level "answer"), so images, paths and errors follow
    SFT. Each record becomes a benchmark record, and `dataset[i]` is benchmarks.encode_record of it:
    the default system turn, the images (where `<image>` placed them, else first), then
    data.build_prompt(record) (question, "A. ..." option lines, the answer instruction), then
    the assistant header. Train and eval prompts are so the same by construction. Prompts longer
    than max_prompt_len tokens are dropped and counted. With `format_prompt` (release.FormatPrompt)
    the question is the record's text as written and the user turn its rendering, as in EasyR1.
    """

    def __init__(self, path, tok, improc, max_prompt_len=None, skip_bad=False, max_errors=20, format_prompt=None):
        if not os.path.exists(path):
            raise DataError(f"{path}: data file does not exist")
        self.path, self.tok, self.improc, self.format_prompt = path, tok, improc, format_prompt
        self.records, self.lengths, self.where, errors = [], [], [], []
        self.stats = {"lines": 0, "kept": 0, "bad": 0, "too_long": 0, "with_images": 0, "text_only": 0}
        base = os.path.dirname(os.path.abspath(path))
        for where, obj, error in read_records(path):  # JSON lines or a JSON array
            self.stats["lines"] += 1
            try:
                if error is not None:
                    raise error
                rec = normalize_record(obj, base, where)
                if obj.get("answer") is None or answer_text(obj["answer"], "answer").strip() == "":
                    raise ValueError("no gold `answer`")
                answer = answer_text(obj["answer"], "answer")
                options = obj.get("options") or []
                if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
                    raise ValueError("`options` must be a list of strings")
                answer_type = obj.get("answer_type")
                if answer_type is not None and answer_type not in grading.ANSWER_TYPES:
                    raise ValueError(f"answer_type {answer_type!r} not in {grading.ANSWER_TYPES}")
                record = dict(id=str(obj.get("id", where)), question=_question_of(rec, format_prompt is not None),
                              options=options,
                              images=[Path(p) if isinstance(p, str) else p for p in rec.images],
                              image_placeholders=True, answer=answer.strip(),
                              answer_type=answer_type or ("multi_choice" if options else None),
                              benchmark=Path(path).stem)
                n_img = [image_tokens(p, improc) for p in rec.images]
                length = len(encode_chat(tok, [{"role": "user", "content": prompt_content(record, format_prompt)}],
                                         n_img, add_generation_prompt=True)["input_ids"])
            except (ValueError, OSError) as e:
                self.stats["bad"] += 1
                errors.append(f"{where}: {e}")
                continue
            if max_prompt_len and length > max_prompt_len:
                self.stats["too_long"] += 1
                continue
            self.records.append(record)
            self.lengths.append(length)
            self.where.append(where)
        self.errors = errors
        self.stats["kept"] = len(self.records)
        self.stats["with_images"] = sum(bool(r["images"]) for r in self.records)
        self.stats["text_only"] = len(self.records) - self.stats["with_images"]
        if errors and not skip_bad:
            more = f"\n  ... and {len(errors) - max_errors} more" if len(errors) > max_errors else ""
            raise DataError(f"{path}: {len(errors)} invalid record(s) (--skip-bad drops them):\n  "
                            + "\n  ".join(errors[:max_errors]) + more)
        if not self.records:
            raise DataError(f"{path}: no usable records ({self.stats})")

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        """Record i encoded for generation: input_ids, roles (T,), pixel_values, image_grid_thw, record.
        An image that passed the header check but does not decode (a truncated file) raises
        DataError naming the line and the file."""
        try:
            enc = encode_record(self.tok, self.improc, self.records[i], self.format_prompt)
        except IMAGE_ERRORS as e:
            files = ", ".join(map(str, self.records[i]["images"]))
            raise DataError(f"{self.where[i]}: cannot decode image {files} ({e})") from None
        enc["record"] = self.records[i]
        return enc

    def summary(self):
        s = self.stats
        return (f"{self.path}: {s['kept']} prompts ({s['with_images']} with images, {s['text_only']} text-only)"
                f" of {s['lines']}; dropped {s['bad']} invalid, {s['too_long']} too long;"
                f" prompt tokens mean {sum(self.lengths) / len(self.lengths):.0f}, max {max(self.lengths)}")


def pack_sequences(ro, idx, pad_id, device):
    """The training layout (see the top of this section) of rollout rows `idx`.

    Returns input_ids, attention_mask (bool), roles (PAD_ROLE on padding, RESPONSE on the
    completion) of shape (B, Lp + Lc); targets (B, Lc) the sampled ids; mask (B, Lc) from the
    sampler's lengths; Lp, Lc; the images of the rows; lengths (B,).
    """
    lengths = ro.lengths[idx]  # (B,)
    B = len(idx)
    Lp = max(len(ro.prompts[i]) for i in idx)
    Lc = max(1, int(lengths.max()))
    input_ids = torch.full((B, Lp + Lc), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(B, Lp + Lc, dtype=torch.bool)
    roles = torch.full((B, Lp + Lc), PAD_ROLE, dtype=torch.long)
    for b, i in enumerate(idx):
        p, n = ro.prompts[i], int(lengths[b])
        input_ids[b, Lp - len(p):Lp] = p  # prompt: left padding
        roles[b, Lp - len(p):Lp] = ro.roles[i]
        attention_mask[b, Lp - len(p):Lp + n] = True
        input_ids[b, Lp:Lp + n] = ro.completions[i, :n]  # completion: right padding
        roles[b, Lp:Lp + n] = RESPONSE
    pv, grid = cat_images([ro.pixel_values[i] for i in idx], [ro.image_grid_thw[i] for i in idx], device)
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device),
            "roles": roles.to(device), "targets": input_ids[:, Lp:].to(device),
            "mask": response_mask(lengths, Lc).to(device), "Lp": Lp, "Lc": Lc,
            "pixel_values": pv, "image_grid_thw": grid, "lengths": lengths.to(device)}


def completion_logprobs(model, batch, temperature, vocab_size=None, chunk_size=512, with_entropy=False):
    """log pi(completion token) (B, Lc) float32 of the sampled tokens (and the entropy (B, Lc) of the
    tempered distribution), from one forward over a pack_sequences batch. Logits / temperature, in
    float32, restricted to the tokenizer's ids, as the sampler drew them."""
    hidden = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["image_grid_thw"],
                   return_hidden=True)  # (B, Lp + Lc, D)
    Lp, Lc = batch["Lp"], batch["Lc"]
    # Only the completion's columns go through the LM head (the prompt's logits, often the larger
    # part with images, are never made); column Lp-1+t predicts completion token t. train_sft.py
    # applies the head the same way, outside the model's forward, also under FSDP.
    logits = model.lm_head(hidden[:, Lp - 1:Lp + Lc - 1])  # (B, Lc, V)
    return token_logprobs(logits, batch["targets"], temperature, chunk_size, vocab_size, return_entropy=with_entropy)


# ---------------------------------------------------------------------------------------------
# rewards
# ---------------------------------------------------------------------------------------------

def accuracy_and_format(texts, records):
    """r_acc (N,) in {0, 1}: grading.grade(extract_answer(text), gold); r_format (N,) in {0, 1}:
    grading.format_ok(text), the full-match <think>...</think><answer>...</answer> check."""
    acc = [float(grading.grade(grading.extract_answer(t), r["answer"], r.get("options"), r.get("answer_type")))
           for t, r in zip(texts, records)]
    fmt = [float(grading.format_ok(t)) for t in texts]
    return torch.tensor(acc), torch.tensor(fmt)


def compute_rewards(model, ro, args, dctx, pad_id, autocast=contextlib.nullcontext()):
    """AVAR 4c on a rollout: acc, fmt, vis (gated: computed for correct answers only), total; (N,) each."""
    acc, fmt = accuracy_and_format(ro.texts, ro.records)
    vis = torch.zeros_like(acc)
    if args.lambda_v != 0:
        # parsed without a depth bound: visual_reward keeps the layers the model has (0-7 of 4 = 0-3)
        layers = vas.parse_layers([args.vas_layers], 10 ** 9) if args.vas_layers else None
        vis = visual_rewards(model, ro, acc > 0, dctx, args.micro_batch, layers, pad_id, autocast,
                             form=args.visual_form)
        if args.lambda_v * float(vis.max()) > 1.0:
            # a ratio this large means the response tokens' system-turn mass is near eps: the visual
            # term then outweighs r_acc = 1 and GRPO optimises attention, not answers
            dctx.print0(f"warning: lambda_v * r_visual reaches {args.lambda_v * float(vis.max()):.3g} > r_acc = 1 "
                        f"(max r_visual {float(vis.max()):.3g}): the system turn's attention is near its floor; "
                        f"consider --visual-form share")
    return acc, fmt, vis, total_reward(acc, vis, fmt, args.lambda_v, args.lambda_f)


def visual_rewards(model, ro, correct, dctx, micro_batch, layers, pad_id, autocast, form="ratio", eps=1e-6):
    """r_visual (N,) for the rows where `correct` (others 0): vas.visual_reward over prompt +
    completion with roles (prompt roles from encode_chat, completion RESPONSE), no grad."""
    out = torch.zeros(len(ro.prompts))
    rows = [i for i in range(len(ro.prompts)) if correct[i]]
    for chunk in training.balanced_chunks(rows, micro_batch, dctx):
        b = pack_sequences(ro, chunk if chunk is not None else [0], pad_id, dctx.device)
        with autocast:
            r = vas.visual_reward(model, b["input_ids"], b["attention_mask"], b["roles"], b["pixel_values"],
                                  b["image_grid_thw"], layers=layers, eps=eps, form=form)
        if dctx.fsdp:
            # visual_reward stops the forward after its last layer (an exception inside the model):
            # FSDP's per-iteration state must be reset before the next forward.
            model.reset_iter_state()
        if chunk is not None:
            out[chunk] = r.float().cpu()
    return out


# ---------------------------------------------------------------------------------------------
# the update
# ---------------------------------------------------------------------------------------------

@dataclass
class LossConfig:
    temperature: float = 1.0
    clip_low: float = 0.2
    clip_high: float = 0.3
    dual_clip: float | None = 3.0
    kl_coef: float = 0.0
    loss_agg: str = "token_mean"
    max_new_tokens: int = 256
    vocab_size: int | None = None
    logp_chunk: int = 512


def _no_grad_logprobs(model, ro, chunks, pad_id, cfg, dctx, autocast):
    """Per chunk (B, Lc) log-probs under no grad: the old policy's or the reference's (a dummy
    chunk's too: its loss is multiplied by 0 but still computed)."""
    out = []
    with torch.no_grad():
        for chunk in chunks:
            b = pack_sequences(ro, chunk if chunk is not None else [0], pad_id, dctx.device)
            with autocast:
                lp = completion_logprobs(model, b, cfg.temperature, cfg.vocab_size, cfg.logp_chunk)
            out.append(lp)
    return out


def policy_update(model, optimizer, ro, adv, keep, cfg, dctx, *, micro_batch, ppo_epochs, pad_id,
                  grad_clip=1.0, ref_model=None, autocast=contextlib.nullcontext(), lr_for=None):
    """--ppo-epochs optimizer steps on one rollout batch. Returns a dict of step metrics.

    adv (N,) per-sequence advantages; keep (N,) bool, the rows that take part (all but the dropped
    zero-spread groups). The normalisers are the counts of the kept rows of ALL processes (one
    optimizer step covers them all): response tokens (token_mean), sequences (seq_mean, dr_grpo).
    old log-probs: with one update per rollout batch the policy that sampled is the policy being
    updated, so old = logp.detach() (ratio exactly 1, TRL's shortcut); with more, one no-grad pass
    before the first update. Reference log-probs (kl_coef > 0): one no-grad pass of the frozen copy.
    FSDP averages gradients over processes, so each loss is multiplied by the world size.
    """
    rows = [i for i in range(len(ro.prompts)) if keep[i]]
    n_tok, n_seq = dctx.sum([float(ro.lengths[rows].sum()) if rows else 0.0, float(len(rows))])
    metrics = {"n_trained_sequences": int(n_seq), "n_trained_tokens": int(n_tok)}
    if n_seq == 0:  # every group had zero spread and was dropped: nothing to learn from this batch
        metrics["skipped_update"] = True
        return metrics
    chunks = training.balanced_chunks(rows, micro_batch, dctx)
    old = _no_grad_logprobs(model, ro, chunks, pad_id, cfg, dctx, autocast) if ppo_epochs > 1 else None
    ref = _no_grad_logprobs(ref_model, ro, chunks, pad_id, cfg, dctx, autocast) if cfg.kl_coef > 0 else None
    scale = dctx.world if dctx.fsdp else 1
    dual = cfg.dual_clip if cfg.dual_clip else None
    keys = ("loss", "pg_loss", "kl", "entropy", "clip_frac", "clip_frac_high", "clip_frac_low", "dual_clip_frac",
            "approx_kl", "ratio_mean", "tokens")
    sums = dict.fromkeys(keys, 0.0)
    ratio_max, norms, train_tokens = 0.0, [], 0
    t0 = time.time()
    for epoch in range(ppo_epochs):
        if lr_for is not None:
            lr_for(epoch)
        for j, chunk in enumerate(chunks):
            if dctx.fsdp:  # reduce-scatter gradients only after the last micro-batch
                model.set_requires_gradient_sync(j == len(chunks) - 1)
            b = pack_sequences(ro, chunk if chunk is not None else [0], pad_id, dctx.device)
            with autocast:
                logp, ent = completion_logprobs(model, b, cfg.temperature, cfg.vocab_size, cfg.logp_chunk,
                                                with_entropy=True)
            mask = b["mask"]
            a = adv[chunk if chunk is not None else [0]].to(logp.device)
            old_lp = old[j] if old is not None else logp.detach()
            pg, pm = policy_loss(logp, old_lp, a, mask, cfg.clip_low, cfg.clip_high, dual)
            per_token = pg
            kl = None
            if ref is not None:
                kl = kl_k3(logp, ref[j])
                per_token = per_token + cfg.kl_coef * kl
            loss = aggregate(per_token, mask, cfg.loss_agg, total_tokens=n_tok, num_seqs=n_seq,
                             max_len=cfg.max_new_tokens)
            if chunk is None:
                loss = loss * 0.0  # a dummy micro-batch: same collectives, no contribution
            (loss * scale).backward()
            train_tokens += int(b["attention_mask"].sum())
            if chunk is None:
                continue
            with torch.no_grad():
                m = mask.float()
                nt = float(m.sum())
                sums["tokens"] += nt
                sums["loss"] += float(loss)
                sums["pg_loss"] += float(aggregate(pg, mask, cfg.loss_agg, total_tokens=n_tok, num_seqs=n_seq,
                                                   max_len=cfg.max_new_tokens))
                sums["entropy"] += float((ent * m).sum())
                if kl is not None:
                    sums["kl"] += float((kl * m).sum())
                for k in ("clip_frac", "clip_frac_high", "clip_frac_low", "dual_clip_frac", "approx_kl", "ratio_mean"):
                    sums[k] += float(pm[k]) * nt
                ratio_max = max(ratio_max, float(pm["ratio_max"]))
        norms.append(training.clip_grad_norm(model, grad_clip))
        loss_now = dctx.sum([sums["loss"]])[0]
        if not (math.isfinite(norms[-1]) and math.isfinite(loss_now)):
            optimizer.zero_grad(set_to_none=True)
            metrics.update(nonfinite=True, grad_norm=norms[-1], loss=loss_now)
            return metrics
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    dt = time.time() - t0
    s = dict(zip(keys, dctx.sum([sums[k] for k in keys])))
    tok = max(s["tokens"], 1.0)
    metrics.update(
        loss=s["loss"] / ppo_epochs, pg_loss=s["pg_loss"] / ppo_epochs,
        kl=s["kl"] / tok if cfg.kl_coef > 0 else None, entropy=s["entropy"] / tok,
        clip_frac=s["clip_frac"] / tok, clip_frac_high=s["clip_frac_high"] / tok,
        clip_frac_low=s["clip_frac_low"] / tok, dual_clip_frac=s["dual_clip_frac"] / tok,
        approx_kl=s["approx_kl"] / tok, ratio_mean=s["ratio_mean"] / tok,
        ratio_max=dctx.max(ratio_max), grad_norm=norms[-1],
        train_tokens_per_s=dctx.sum([float(train_tokens)])[0] / max(dctx.max(dt), 1e-9))
    return metrics


def grpo_step(model, optimizer, tok, encs, group_ids, args, dctx, step, *, ref_model=None,
              reward_fn=None, autocast=contextlib.nullcontext(), lr_for=None):
    """One rollout batch and its update on this process's prompts `encs`. Returns (metrics, rollout).

    reward_fn(rollout) -> (acc, fmt, vis) may replace the AVAR reward (tests); by default
    r_acc / r_format from grading.py and r_visual from vas.py for the correct answers.
    """
    G = args.group_size
    cfg = LossConfig(temperature=args.temperature, clip_low=args.clip_low, clip_high=args.clip_high,
                     dual_clip=args.dual_clip, kl_coef=args.kl_coef, loss_agg=args.loss_agg,
                     max_new_tokens=args.max_new_tokens, vocab_size=tok.vocab_size)
    # 1. rollout
    t0 = time.time()
    with generation_mode(model, dctx), torch.no_grad():
        ro = generate_rollouts(model, tok, encs, group_ids, G, max_new_tokens=args.max_new_tokens,
                               temperature=args.temperature, top_p=args.top_p,
                               seed=rollout_seed(args.seed, step, dctx.rank), gen_batch=args.gen_batch)
    t_gen = time.time() - t0
    # 2. rewards
    t0 = time.time()
    if reward_fn is not None:
        acc, fmt, vis = reward_fn(ro)
        reward = total_reward(acc, vis, fmt, args.lambda_v, args.lambda_f)
    else:
        acc, fmt, vis, reward = compute_rewards(model, ro, args, dctx, tok.pad_id, autocast)
    t_reward = time.time() - t0
    # 3. advantages over the whole step's rewards
    all_r, all_g = dctx.gather(reward.float()), dctx.gather(ro.group_ids)
    adv_all, am = group_advantages(all_r, all_g, scale=args.adv_scale)
    n = len(ro.prompts)
    sl = slice(dctx.rank * n, (dctx.rank + 1) * n) if dctx.fsdp else slice(0, n)
    adv, zero = adv_all[sl], am["zero_spread_mask"][sl]
    keep = ~zero if args.drop_zero_spread else torch.ones(n, dtype=torch.bool)
    # 4. update
    m = policy_update(model, optimizer, ro, adv, keep, cfg, dctx, micro_batch=args.micro_batch,
                      ppo_epochs=args.ppo_epochs, pad_id=tok.pad_id, grad_clip=args.grad_clip,
                      ref_model=ref_model, autocast=autocast, lr_for=lr_for)
    # step metrics, over all processes
    gated_vis = torch.where(acc > 0, vis, torch.zeros_like(vis))
    s = dctx.sum([float(n), float(reward.sum()), float(acc.sum()), float(fmt.sum()), float(gated_vis.sum()),
                  float(ro.lengths.sum()), float((~ro.stopped).sum())])
    N, gen_tokens = s[0], s[5]
    m.update(
        reward=s[1] / N, reward_acc=s[2] / N, reward_format=s[3] / N, reward_visual=s[4] / N,
        reward_visual_correct=s[4] / s[2] if s[2] else None, accuracy=s[2] / N,
        response_length=gen_tokens / N, response_length_max=int(dctx.max(float(ro.lengths.max()))),
        truncated_frac=s[6] / N, zero_spread_frac=am["zero_spread_frac"], reward_std=am["reward_std"],
        n_sequences=int(N), gen_tokens_per_s=gen_tokens / max(dctx.max(t_gen), 1e-9),
        time_rollout=t_gen, time_reward=t_reward)
    return m, ro


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------

@dataclass
class Run:
    """What every step of one GRPO run reads: its settings, prompts, policy and optimizer."""
    args: argparse.Namespace
    dctx: Dist
    tok: Tokenizer
    improc: ImageProcessor
    ds: PromptDataset
    init_dir: str  # the initial policy, also the reference of the KL term (after a resume too)
    source: training.SaveSource  # what checkpoints take from the folder the weights came from
    model: torch.nn.Module
    ref_model: torch.nn.Module | None
    optimizer: torch.optim.Optimizer
    autocast: object  # the context of the training forwards (bf16 autocast in one process)
    steps_per_epoch: int
    total_steps: int
    start: int  # the first step this process runs (> 0 when resumed)
    last_ckpt: str | None  # the newest complete checkpoint
    config: dict
    reporter: training.Reporter | None  # --report-to, on rank 0


def main(argv=None, reward_fn=None):
    """Parse the arguments, set up the process group (training.distributed) and train.
    reward_fn(rollout) -> (acc, fmt, vis) replaces the AVAR reward (tests)."""
    args = build_parser().parse_args(argv)
    with training.distributed(args.device, args.fsdp) as dctx:
        return train(args, dctx, reward_fn)


def setup(args, dctx) -> Run:
    """The resume point, the prompts, the policy (float32 master weights; FSDP2 shards them, bf16
    autocast without FSDP), the frozen reference (kl_coef > 0), AdamW, the run files."""
    torch.manual_seed(args.seed + dctx.rank)
    backend = training.report_backend(args.report_to)  # a missing package stops the run here
    if args.temperature <= 0:
        raise UserError("--temperature must be > 0 for GRPO rollouts (the log-probs divide by it)")
    if args.prompts_per_step % dctx.world:
        raise UserError(f"--prompts-per-step {args.prompts_per_step} must be a multiple of the {dctx.world} processes")
    dtype = training.compute_dtype(args.dtype, dctx.device)

    ckpt = training.resume_checkpoint(args.resume, args.out) if args.resume else None
    if args.resume and ckpt is None:
        dctx.print0(f"--resume: no checkpoint in {args.out}, starting from {args.model}")
    state = training.read_train_state(ckpt) if ckpt is not None else None
    # --model resolved once (a run folder through its `latest`), so that the reference model of a
    # resumed run is still the initial policy
    init_dir = state["init_model"] if state is not None else check_model_folder(args.model)
    model_dir = ckpt or init_dir
    source = training.save_source(model_dir, args.save_dtype)  # read now: --keep-last may remove model_dir

    tok = Tokenizer(model_dir)
    improc = ImageProcessor.from_pretrained(model_dir, min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    fmt = read_format_prompt(args.format_prompt) if args.format_prompt else None
    ds = PromptDataset(args.data, tok, improc, args.max_prompt_len, args.skip_bad, format_prompt=fmt)
    dctx.print0(ds.summary())
    steps_per_epoch = len(ds) // args.prompts_per_step
    if steps_per_epoch == 0:
        raise UserError(f"{args.data}: {len(ds)} prompts, fewer than one batch of --prompts-per-step "
                        f"{args.prompts_per_step}")
    total_steps = args.max_steps if args.max_steps > 0 else max(1, int(args.epochs * steps_per_epoch))

    model = training.load_for_training(model_dir, tok, dctx.device, args.grad_ckpt, args.freeze_vision)
    n_params = sum(p.numel() for p in model.parameters())
    ref_model = None
    if args.kl_coef > 0:  # the frozen initial policy (also after a resume)
        ref_model = from_pretrained(init_dir, dtype=torch.float32, device=dctx.device).eval()
        ref_model.requires_grad_(False)
    # one process in bf16: autocast for the training forwards; generation runs on the float32
    # weights (its KV cache takes the weights' dtype). --fsdp gives bf16 generation.
    autocast = training.prepare_model(model, dctx, dtype)
    if ref_model is not None:
        training.prepare_model(ref_model, dctx, dtype)
    model.train()
    optimizer = training.build_optimizer(model, args.lr, args.weight_decay, (0.9, 0.999), dctx.device)
    start = 0
    if state is not None:
        expected = dict(prompts_per_step=args.prompts_per_step, seed=args.seed, num_records=len(ds),
                        group_size=args.group_size)
        start = training.restore_train_state(ckpt, state, model, optimizer, dctx, expected)
        dctx.print0(f"resumed from {ckpt} at step {start}")

    config = dict(vars(args), init_model=init_dir, world_size=dctx.world, steps_per_epoch=steps_per_epoch,
                  total_steps=total_steps, fsdp=dctx.fsdp, compute_dtype=str(dtype), device=str(dctx.device),
                  parameters=n_params, data_stats=ds.stats, torch=torch.__version__)
    dctx.print0("config: " + json.dumps(config, default=str))
    reporter = training.start_run(args, dctx, config, start, source, model_dir, dtype, backend,
                                  [key for key, _, _ in plot.GRPO_PANELS])
    return Run(args, dctx, tok, improc, ds, init_dir, source, model, ref_model, optimizer, autocast,
               steps_per_epoch, total_steps, start, ckpt, config, reporter)


def train(args, dctx, reward_fn=None):
    from tqdm import tqdm  # a progress bar only

    run = setup(args, dctx)
    pbar = tqdm(total=run.total_steps, initial=run.start, disable=dctx.rank != 0, dynamic_ncols=True, desc="grpo")
    history, skipped = [], 0  # skipped: prompts that failed to load, this process's run
    finished = False
    try:
        for step in range(run.start, run.total_steps):
            t0 = time.time()
            encs, group_ids, n_bad = step_prompts(run, step, pbar)
            skipped += n_bad
            lrs = [set_lr(run, step * args.ppo_epochs)]
            m, _ = grpo_step(run.model, run.optimizer, run.tok, encs, group_ids, args, dctx, step,
                             ref_model=run.ref_model, reward_fn=reward_fn, autocast=run.autocast,
                             lr_for=lambda e: lrs.append(set_lr(run, step * args.ppo_epochs + e)))
            if m.get("nonfinite"):
                training.check_finite(step + 1, m["loss"], m["grad_norm"], run.last_ckpt)
            row = dict(step=step + 1, epoch=round((step + 1) / run.steps_per_epoch, 4), lr=lrs[-1], **m,
                       skipped=n_bad, step_time=time.time() - t0)
            if args.checksum:
                row["param_checksums"] = checksums(run)
            history.append(row)
            if dctx.rank == 0:
                training.append_metrics(args.out, row)
                if run.reporter is not None:
                    run.reporter.log(row)
                pbar.set_postfix(reward=f"{row['reward']:.3f}", acc=f"{row['accuracy']:.3f}",
                                 len=f"{row['response_length']:.0f}", **({"skipped": skipped} if skipped else {}))
                pbar.update(1)
            done = step + 1
            if done == run.total_steps or (args.save_every > 0 and done % args.save_every == 0):
                save(run, done)
        finished = True
    finally:
        pbar.close()
        if run.reporter is not None:
            run.reporter.close(finished)
    return {"metrics": history, "checkpoint": run.last_ckpt, "config": run.config}


def set_lr(run: Run, update: int) -> float:
    """Linear warmup over --warmup-steps optimizer updates, then the constant --lr (EasyR1)."""
    mult = min(1.0, (update + 1) / run.args.warmup_steps) if run.args.warmup_steps > 0 else 1.0
    training.set_lr(run.optimizer, mult)
    return run.args.lr * mult


def step_prompts(run: Run, step: int, pbar):
    """This process's share of step `step`'s prompts (epoch_batches, a function of the seed and the
    epoch), encoded, with one exact group id each. A prompt whose image does not decode is skipped
    with --skip-bad in one process; otherwise the run stops before the rollout, saved at the step
    before. Returns the encodings, their group ids and the number skipped over all processes."""
    args, dctx = run.args, run.dctx
    P = args.prompts_per_step
    share = P // dctx.world
    epoch, k = divmod(step, run.steps_per_epoch)
    batch = training.epoch_batches(run.ds.lengths, P, args.seed, epoch, group_by_length=False)[k]
    encs, group_ids, bad = [], [], []
    for j, i in enumerate(batch[dctx.rank * share:(dctx.rank + 1) * share]):
        try:
            encs.append(run.ds[i])
            group_ids.append(step * P + dctx.rank * share + j)  # exact, unique in the step
        except DataError as e:  # an image that does not decode: the same ones on every run
            bad.append(str(e))
    n_bad = int(dctx.sum([float(len(bad))])[0])
    # several processes exchange equal-length rollout tensors: there a lost prompt stops the run
    if n_bad and (not args.skip_bad or dctx.world > 1):
        if step > 0 and run.last_ckpt != os.path.join(args.out, f"step_{step}"):
            save(run, step)
        kept = f"saved {run.last_ckpt}" if run.last_ckpt else "no checkpoint was written yet"
        how = ("--skip-bad cannot skip a prompt with several processes; fix the file and --resume" if args.skip_bad
               else "Fix the file and --resume, or --resume --skip-bad to skip such prompts")
        raise DataError(f"step {step + 1}: {bad[0] if bad else 'a prompt on another process failed to load'}; "
                        f"stopped before the rollout, {kept}. {how}")
    for err in bad:
        pbar.write(f"skipped (--skip-bad): {err}")
    if not encs:
        raise DataError(f"step {step + 1}: every prompt of this process failed to load ({bad[0]})")
    return encs, group_ids, n_bad


def checksums(run: Run) -> list:
    """weights_checksum of every process, in rank order (--checksum)."""
    mine = weights_checksum(run.model, run.dctx.fsdp)
    if not run.dctx.fsdp:
        return [mine]
    sums = [None] * run.dctx.world
    dist.all_gather_object(sums, mine)
    return sums


def save(run: Run, step: int):
    """Checkpoint the state after `step` steps (every rank calls this), make it the run's last, and
    draw OUT/training_curves.png from metrics.jsonl (plot.py)."""
    args = run.args
    state = dict(step=step, epoch=step // run.steps_per_epoch, batch_in_epoch=step % run.steps_per_epoch,
                 steps_per_epoch=run.steps_per_epoch, prompts_per_step=args.prompts_per_step,
                 group_size=args.group_size, num_records=len(run.ds), seed=args.seed, total_steps=run.total_steps,
                 world_size=run.dctx.world, init_model=run.init_dir, args=vars(args))
    run.last_ckpt = training.save_checkpoint(run.model, run.optimizer, run.dctx, args.out, step, state, run.source,
                                             args.keep_last, run.improc, previous=run.last_ckpt)
    if run.dctx.rank == 0:
        plot.save_run_curves(args.out, "grpo")


if __name__ == "__main__":
    run_cli(main)
