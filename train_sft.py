"""Cold-start SFT of Qwen2.5-VL with AVAR's attention-guided objective (arXiv 2603.03825, eq. 4b).

One optimizer step sees a global batch of records, split into micro-batches over processes and
gradient-accumulation steps. Its loss, with R the response tokens (assistant content + <|im_end|>),
Q = U + V the user-turn query tokens, V the image tokens, S the system tokens (docs/avar_method.md):

    L_LM       = (1 / N_tok) sum_{t in R, all micro-batches, all processes} -log p(x_t | x_<t)
    L_enhance  = (1 / N_img) sum_{samples b with images} -(1/|L|) sum_l (1/H) sum_h log( (1/(|Q||V|)) sum_{q in Q, k in V} A^{l,h}_{q,k} )
    L_suppress = (1 / N_img) sum_{samples b with images}  (1/|L|) sum_l (1/H) sum_h log( (1/(|Q||S|)) sum_{q in Q, k in S} A^{l,h}_{q,k} + eps )
    L          = L_LM + alpha * L_enhance + beta * L_suppress        (paper: alpha = beta = 0.15, eps = 1e-6)

--agto-sys-floor F puts a floor under the suppressed mass: with s the system turn's share of a
query's attention, the paper's log(s/|S| + eps) above F, its mirror image below (vas.AttentionGuidedLoss);
metrics.jsonl logs s (`sys_share`) and the fraction of cells at or below the floor (`at_floor`),
and the log warns when most are.

N_tok and N_img are counted over the WHOLE step (all micro-batches, all processes: counted first,
all-reduced) and every micro-batch's SUMS are divided by them, so the step's loss is the token mean
(and the image-sample mean), not a mean of micro-batch means. Samples without images add only to
L_LM. The attention terms come from vas.AttentionGuidedLoss, a controller the model calls in every
layer: it recomputes the attention of the query rows in chunks (and again in backward), so no
T x T matrix is kept (bench/bench_sft_memory.py measures this).

Defaults follow the released SFT config where it is stated (lr 1e-5, cosine, warmup 0.1, 10
epochs, cutoff 8192 tokens, max_pixels 262144, vision tower trained, alpha = beta = 0.15) and point
at the toy world, so `python train_sft.py` runs as it is. `--agto-alpha 0 --agto-beta 0` is plain
SFT (no controller, no attention recomputation).

Run:
    python train_sft.py                                                  # toy world: toy/sft.jsonl, toy/model
    python train_sft.py --data cold_start.jsonl --model Qwen2.5-VL-7B-Instruct
    torchrun --nproc_per_node 8 train_sft.py --data cold_start.jsonl --model DIR --batch-size 512 --grad-ckpt
    python train_sft.py --data cold_start.jsonl --model DIR --agto-alpha 0 --agto-beta 0    # plain SFT
    python train_sft.py ... --resume                                     # continue from runs/sft/latest

One process: the plain model (float32 weights, bf16 autocast on CUDA). Several (torchrun) or
--fsdp: FSDP2 (each vision block, each decoder layer, then the root), bf16 parameters for compute,
float32 gradient reduction, float32 sharded master weights. Outputs under --out:
    run_config.json        all arguments and derived settings of the run
    metrics.jsonl          one line per optimizer step
    step_N/                config.json + model.safetensors (hub layout, float32 master weights),
                           tokenizer.json, tokenizer_config.json, preprocessor_config.json,
                           train_state.pt (optimizer, step, RNG of every rank, data position),
                           run_config.json
    latest                 "step_N": the last complete checkpoint (written last, atomically)
"""

import argparse
import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # data-loader workers fork after the tokenizer ran

import vas  # noqa: E402
from data import IGNORE, IMAGE, ImageProcessor, SFTDataset, Tokenizer, collate, epoch_batches, micro_batches
from model import from_pretrained, save_pretrained  # noqa: E402

parser = argparse.ArgumentParser(description="Cold-start SFT of Qwen2.5-VL with the attention-guided objective",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
# data
parser.add_argument("--data", default="toy/sft.jsonl", help="jsonl of SFT records (chat, LLaMA-Factory or flat form)")
parser.add_argument("--model", default="toy/model", help="Hugging Face folder: config, safetensors, tokenizer.json")
parser.add_argument("--out", default="runs/sft", help="checkpoints, metrics.jsonl, run_config.json")
parser.add_argument("--max-len", type=int, default=8192, help="longest sequence in tokens, image tokens included")
parser.add_argument("--on-long", default="drop", choices=["drop", "error"], help="records over --max-len: drop and count, or stop")
parser.add_argument("--skip-bad", action="store_true", help="drop invalid records (counted) instead of stopping")
parser.add_argument("--max-errors", type=int, default=20, help="invalid records listed in the error message")
parser.add_argument("--check-images", default="header", choices=["header", "full"], help="validation reads image headers or decodes images")
parser.add_argument("--max-pixels", type=int, default=262144, help="image resize bound (released config: 262144)")
parser.add_argument("--min-pixels", type=int, default=None, help="default: the model's preprocessor_config.json")
parser.add_argument("--no-group-by-length", action="store_true", help="plain shuffled batches (more padding)")
parser.add_argument("--num-workers", type=int, default=2, help="data-loader processes decoding images")
# objective
parser.add_argument("--agto-alpha", type=float, default=0.15, help="weight of L_enhance (0 with --agto-beta 0: plain SFT)")
parser.add_argument("--agto-beta", type=float, default=0.15, help="weight of L_suppress")
parser.add_argument("--agto-layers", default=None, help="layers of the objective, e.g. 0-7 or 0,4,8 (default: all)")
parser.add_argument("--agto-eps", type=float, default=1e-6, help="eps inside the suppress log")
parser.add_argument("--agto-sys-floor", type=float, default=0.0,
                    help="floor of L_suppress: it pulls the system turn's share of the user turn's attention back "
                         "up below this (0: the paper's formula; see vas.AttentionGuidedLoss)")
parser.add_argument("--agto-chunk", type=int, default=None, help="query rows per attention chunk (default: ~16M probabilities)")
parser.add_argument("--ce-chunk", type=int, default=2048, help="response tokens per logits chunk of the LM loss")
# optimisation
parser.add_argument("--epochs", type=float, default=10, help="passes over the data (released config: 10)")
parser.add_argument("--max-steps", type=int, default=0, help="optimizer steps; > 0 overrides --epochs")
parser.add_argument("--batch-size", type=int, default=32, help="records per optimizer step, all processes together (paper: 512)")
parser.add_argument("--micro-batch", type=int, default=4, help="records per forward on one process")
parser.add_argument("--lr", type=float, default=1e-5, help="peak learning rate (released config: 1e-5, paper: 5e-6)")
parser.add_argument("--vision-lr", type=float, default=None, help="learning rate of the vision tower (default: --lr)")
parser.add_argument("--freeze-vision", action="store_true", help="do not train the vision tower")
parser.add_argument("--weight-decay", type=float, default=0.0)
parser.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.999))
parser.add_argument("--warmup-ratio", type=float, default=0.1, help="linear warmup over this fraction of the steps, then cosine")
parser.add_argument("--min-lr-ratio", type=float, default=0.0, help="cosine decays to lr * this")
parser.add_argument("--grad-clip", type=float, default=1.0, help="max global gradient norm (0: no clipping)")
# system
parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"], help="compute dtype; auto: bf16 on CUDA, fp32 on CPU")
parser.add_argument("--fsdp", action="store_true", help="FSDP2 even in one process (always on with several)")
parser.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing of decoder layers and vision blocks")
parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
parser.add_argument("--seed", type=int, default=0)
# checkpoints
parser.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps (and at the end); 0: end only")
parser.add_argument("--keep-last", type=int, default=0, help="keep only the last N checkpoints (0: all)")
parser.add_argument("--resume", nargs="?", const="auto", default=None,
                    help="continue a run: bare --resume reads OUT/latest; or a step_N folder")

RANK = 0


def print0(*a, **k):
    if RANK == 0:
        print(*a, **k, flush=True)


# --------------------------------------------------------------------------------------------
# Loss pieces
# --------------------------------------------------------------------------------------------


def _ce_sum(h, weight, y):
    """Summed cross-entropy of one chunk: h (n, D), weight (V, D), y (n,). Logits in float32 only here."""
    return F.cross_entropy(F.linear(h, weight).float(), y, reduction="sum")


def chunked_cross_entropy(hidden, weight, labels, chunk: int = 2048):
    """sum_t -log p(labels[t+1] | hidden[t]) over the trained positions (labels != IGNORE), float32.

    hidden (B, T, D) final hidden states, weight (V, D) the LM head, labels (B, T) unshifted: position
    t predicts token t + 1. Only trained rows go through the head, `chunk` at a time, each under
    checkpoint, so the (n, V) logits of a chunk exist only while it is computed (forward, then again
    in backward): with V = 152k the full float32 logits of 8k tokens would be 5 GB.
    """
    h, y = hidden[:, :-1], labels[:, 1:]
    sel = y != IGNORE
    h, y = h[sel], y[sel]  # (N, D), (N,)
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, y.numel(), chunk):
        total = total + checkpoint(_ce_sum, h[s:s + chunk], weight, y[s:s + chunk], use_reentrant=False)
    return total


def lr_multiplier(step: int, total: int, warmup: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak lr for update `step` (0-based): linear warmup (1/w, 2/w, ..., 1) over
    `warmup` updates, then cosine from 1 to min_ratio over the rest."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


class NonFiniteLoss(RuntimeError):
    pass


# --------------------------------------------------------------------------------------------
# Distributed setup, FSDP2
# --------------------------------------------------------------------------------------------


def setup_distributed(args):
    """RANK / WORLD_SIZE from torchrun (absent: one process). Returns rank, world, device, use_fsdp."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available() if args.device == "auto" else args.device.startswith("cuda")
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    use_fsdp = world > 1 or args.fsdp
    if use_fsdp and not dist.is_initialized():
        backend = "nccl" if cuda else "gloo"
        if "RANK" in os.environ:
            dist.init_process_group(backend, device_id=device if cuda else None)
        else:  # --fsdp in a plain `python` process: a one-process group
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return rank, world, device, use_fsdp


def shard_model(model, compute_dtype):
    """FSDP2 as torchtitan: each vision block and decoder layer is a unit, then the root (embeddings,
    patch embed, merger, final norm, LM head). bf16 params for compute, float32 gradient reduction."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for blk in model.visual.blocks:
        fully_shard(blk, mp_policy=mp)
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def run_vision_on_text_batches(model):
    """Under FSDP every process must run the same modules in the same order (each vision block's
    all-gather is a collective). A micro-batch without images would skip the vision tower on one
    process while another runs it, and both would hang. So a micro-batch without images runs the
    tower on one blank 28x28 image and adds 0 * its output: same values, same collectives, and a
    zero gradient for the tower (which also keeps the backward reduce-scatters in step)."""
    plain_embed = model.embed
    vc = model.cfg.vision

    def embed(input_ids, pixel_values=None, image_grid_thw=None, **kw):
        x = plain_embed(input_ids, pixel_values, image_grid_thw, **kw)
        if pixel_values is None:
            grid = torch.tensor([[1, vc.spatial_merge_size, vc.spatial_merge_size]])
            n = vc.spatial_merge_size ** 2
            pv = torch.zeros(n, vc.in_chans * vc.temporal_patch_size * vc.patch_size ** 2, device=x.device)
            x = x + 0.0 * model.visual(pv, grid).sum().to(x.dtype)
        return x

    model.embed = embed


def all_reduce_sum(t: torch.Tensor, distributed: bool) -> torch.Tensor:
    if distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def forward_backward(model, mbs, alpha: float, beta: float, ctl_factory, ce_chunk: int, device,
                     autocast=nullcontext(), use_fsdp: bool = False) -> dict:
    """Forward and backward of one optimizer step's micro-batches (this process's share); gradients
    accumulate in the parameters. Returns the step's losses over all processes.

    The counts come first: N_tok (trained tokens, labels shifted by one) and N_img (samples with
    image tokens) of the whole step, all-reduced. Each micro-batch then adds
        lm_sum / N_tok + (alpha * enhance_sum + beta * suppress_sum) / N_img
    so the gradient is that of the step's token mean (and image-sample mean), however the records
    are split into micro-batches and processes. ctl_factory(roles) -> an attention-guided
    controller (vas.AttentionGuidedLoss), or None for plain SFT.
    """
    world = dist.get_world_size() if use_fsdp else 1
    local = torch.tensor([sum(int((mb["labels"][:, 1:] != IGNORE).sum()) for mb in mbs),
                          sum(int((mb["roles"] == IMAGE).any(1).sum()) for mb in mbs),
                          sum(int(mb["attention_mask"].sum()) for mb in mbs)], dtype=torch.float64, device=device)
    n_tok, n_img, n_all = all_reduce_sum(local, use_fsdp).tolist()
    # lm, enhance, suppress, vas, vas samples, system share, cells at the floor (both summed over image samples)
    sums = torch.zeros(7, dtype=torch.float64, device=device)
    for j, mb in enumerate(mbs):
        if use_fsdp:  # reduce-scatter gradients only after the last micro-batch
            model.set_requires_gradient_sync(j == len(mbs) - 1)
        b = {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in mb.items()}
        with autocast:
            ctl = ctl_factory(b["roles"]) if ctl_factory is not None else None
            hidden = model(b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_grid_thw"],
                           attn_ctl=ctl, return_hidden=True)  # (B, T, D)
            lm_sum = chunked_cross_entropy(hidden, model.lm_head.weight, b["labels"], ce_chunk)
            loss = lm_sum / max(n_tok, 1)
            if ctl is not None:
                t = ctl.terms()  # sums over this micro-batch's image samples
                loss = loss + (alpha * t.enhance_sum + beta * t.suppress_sum) / max(n_img, 1)
                sums[1:] += torch.stack([t.enhance_sum.detach().double(), t.suppress_sum.detach().double(),
                                         torch.tensor(t.vas_sum, dtype=torch.float64, device=device),
                                         torch.tensor(float(t.vas_n), dtype=torch.float64, device=device),
                                         torch.tensor(t.sys_share_sum, dtype=torch.float64, device=device),
                                         torch.tensor(t.floor_n, dtype=torch.float64, device=device)])
        # FSDP averages gradients over processes; the loss is already the global mean: undo the average
        (loss * world if use_fsdp else loss).backward()
        sums[0] += lm_sum.detach().double()
    lm, enh, sup, vas_sum, vas_n, share, floor_n = all_reduce_sum(sums, use_fsdp).tolist()
    lm_loss, enhance, suppress = lm / n_tok, enh / max(n_img, 1), sup / max(n_img, 1)
    return dict(loss=lm_loss + alpha * enhance + beta * suppress, lm_loss=lm_loss, enhance=enhance,
                suppress=suppress, vas=vas_sum / vas_n if vas_n else None, n_tok=int(n_tok), n_img=int(n_img),
                n_all=int(n_all), sys_share=share / n_img if ctl_factory is not None and n_img else None,
                at_floor=floor_n / n_img if ctl_factory is not None and n_img else None)


# --------------------------------------------------------------------------------------------
# Checkpoints: step_N/ written to a temporary folder, fsynced, renamed; `latest` updated last
# --------------------------------------------------------------------------------------------

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json")


def _fsync_path(path: str):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str):
    for root, _, files in os.walk(path):
        for f in files:
            _fsync_path(os.path.join(root, f))
        _fsync_path(root)


def write_train_state(path: str, state: dict):
    torch.save(state, path)


def write_latest(out: str, name: str):
    tmp = os.path.join(out, "latest.tmp")
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(out, "latest"))  # atomic: readers see the old or the new name
    _fsync_path(out)


def resolve_resume(arg: str, out: str) -> str | None:
    """`auto`: the checkpoint named in OUT/latest (None if there is none); else a step folder, or a
    run folder holding `latest`."""
    path = out if arg == "auto" else arg
    if os.path.exists(os.path.join(path, "train_state.pt")):
        return path
    latest = os.path.join(path, "latest")
    if os.path.exists(latest):
        with open(latest) as f:
            return os.path.join(path, f.read().strip())
    if arg == "auto":
        return None
    raise FileNotFoundError(f"--resume {arg}: neither a checkpoint (train_state.pt) nor a run folder with `latest`")


def load_for_training(model_dir: str, tok, device, grad_ckpt: bool, freeze_vision: bool):
    """float32 master weights on `device`, checked against the tokenizer, with activation
    checkpointing and a frozen vision tower as asked (shared by SFT and GRPO)."""
    model = from_pretrained(model_dir, dtype=torch.float32, device=device)
    if tok.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} tokens, the model's embedding {model.cfg.vocab_size}")
    model.set_gradient_checkpointing(grad_ckpt)
    if freeze_vision:
        model.visual.requires_grad_(False)
    return model


def start_run_files(out: str, config: dict, start: int):
    """Write OUT/run_config.json (the run's full config) and cut OUT/metrics.jsonl back to the
    steps a resumed run does not redo. Rank 0 only."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "run_config.json"), "w") as f:
        json.dump(config, f, indent=2, default=str)
    metrics_path = os.path.join(out, "metrics.jsonl")
    if os.path.exists(metrics_path):
        with open(metrics_path) as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= start]
        with open(metrics_path, "w") as f:
            f.writelines(kept)


def save_checkpoint(model, optimizer, step: int, args, state: dict, tokenizer_dir: str, use_fsdp: bool,
                    device, image_processor=None) -> str:
    """Write OUT/step_N atomically (every rank calls this: the state dicts are gathered collectively)."""
    if use_fsdp:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        msd = get_model_state_dict(model, options=opts)
        osd = get_optimizer_state_dict(model, optimizer, options=opts)
    else:
        msd, osd = model.state_dict(), optimizer.state_dict()
    rng = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    rngs = [None] * dist.get_world_size() if use_fsdp else [rng]
    if use_fsdp:
        dist.all_gather_object(rngs, rng)
    name = f"step_{step}"
    final = os.path.join(args.out, name)
    if RANK == 0:
        tmp = os.path.join(args.out, f".{name}.partial")
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        save_pretrained(model, tmp, state_dict=msd)  # config.json + safetensors (hub layout)
        for f in TOKENIZER_FILES:
            if os.path.exists(os.path.join(tokenizer_dir, f)):
                shutil.copy2(os.path.join(tokenizer_dir, f), os.path.join(tmp, f))
        if image_processor is not None:  # the pixel bounds this run used, for evaluation and RL to match
            image_processor.save(tmp)
        write_train_state(os.path.join(tmp, "train_state.pt"), dict(state, optimizer=osd, rng=rngs))
        with open(os.path.join(tmp, "run_config.json"), "w") as f:
            json.dump(vars(args), f, indent=2)
        fsync_tree(tmp)
        if os.path.exists(final):  # the same step saved again (a resumed run): replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_path(args.out)
        write_latest(args.out, name)
        if args.keep_last > 0:
            steps = sorted(int(d[5:]) for d in os.listdir(args.out) if d.startswith("step_") and d[5:].isdigit())
            for s in steps[:-args.keep_last]:
                shutil.rmtree(os.path.join(args.out, f"step_{s}"))
    if use_fsdp:
        dist.barrier()
    return final


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def main(argv=None):
    global RANK
    args = parser.parse_args(argv)
    rank, world, device, use_fsdp = setup_distributed(args)
    RANK = rank
    try:
        return train(args, rank, world, device, use_fsdp)
    finally:
        if use_fsdp and dist.is_initialized():
            dist.destroy_process_group()


def train(args, rank, world, device, use_fsdp):
    torch.manual_seed(args.seed + rank)
    compute_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32,
                     "auto": torch.bfloat16 if device.type == "cuda" else torch.float32}[args.dtype]
    if args.batch_size % (args.micro_batch * world):
        raise ValueError(f"--batch-size {args.batch_size} must be a multiple of --micro-batch {args.micro_batch}"
                         f" x {world} processes")
    accum = args.batch_size // (args.micro_batch * world)

    # ---- resume point (the model then comes from the checkpoint, optimizer state too)
    ckpt = resolve_resume(args.resume, args.out) if args.resume else None
    if args.resume and ckpt is None:
        print0(f"--resume: no checkpoint in {args.out}, starting from {args.model}")
    model_dir = ckpt or args.model

    # ---- data: validated before anything is trained
    tok = Tokenizer(model_dir)
    improc = ImageProcessor.from_pretrained(model_dir, min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    ds = SFTDataset(args.data, tok, improc, args.max_len, args.on_long, args.skip_bad, args.max_errors,
                    args.check_images)
    print0(ds.summary())
    if ds.stats["bad"]:
        print0(f"--skip-bad: dropped {ds.stats['bad']} invalid records, e.g.\n  " + "\n  ".join(ds.errors[:5]))
    steps_per_epoch = len(ds) // args.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{args.data}: {len(ds)} records, fewer than one batch of --batch-size {args.batch_size}")
    total_steps = args.max_steps if args.max_steps > 0 else max(1, int(args.epochs * steps_per_epoch))
    warmup = math.ceil(args.warmup_ratio * total_steps)

    # ---- model: float32 master weights; FSDP2 shards them, bf16 autocast without FSDP
    model = load_for_training(model_dir, tok, device, args.grad_ckpt, args.freeze_vision)
    n_params = sum(p.numel() for p in model.parameters())
    if use_fsdp:
        shard_model(model, compute_dtype)
        run_vision_on_text_batches(model)
    model.train()
    autocast = (torch.autocast(device.type, dtype=compute_dtype)
                if not use_fsdp and compute_dtype != torch.float32 else nullcontext())

    # ---- optimizer: AdamW, optional own lr for the vision tower, no decay on biases and norms
    groups = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        vision = n.startswith("visual.")
        decay = p.ndim >= 2
        key = (vision, decay)
        groups.setdefault(key, {"params": [], "weight_decay": args.weight_decay if decay else 0.0,
                                "base_lr": (args.vision_lr if vision and args.vision_lr is not None else args.lr)})
        groups[key]["params"].append(p)
    optimizer = torch.optim.AdamW(list(groups.values()), lr=args.lr, betas=tuple(args.betas),
                                  fused=device.type == "cuda")

    start = 0
    if ckpt is not None:
        start = load_train_state(ckpt, model, optimizer, args, rank, world, len(ds), steps_per_epoch, use_fsdp, device)
        print0(f"resumed from {ckpt} at step {start}")
    last_ckpt = ckpt

    config = dict(vars(args), world_size=world, grad_accum=accum, steps_per_epoch=steps_per_epoch,
                  total_steps=total_steps, warmup_steps=warmup, fsdp=use_fsdp, compute_dtype=str(compute_dtype),
                  device=str(device), parameters=n_params, data_stats=ds.stats, torch=torch.__version__)
    print0("config: " + json.dumps(config, default=str))
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    if ckpt is None and os.path.exists(os.path.join(args.out, "latest")):
        print0(f"warning: {args.out} holds checkpoints of an earlier run; this run starts afresh and overwrites them")
    if rank == 0:
        start_run_files(args.out, config, start)

    # ---- the loop
    use_ctl = args.agto_alpha != 0 or args.agto_beta != 0
    layers = vas.parse_layers([args.agto_layers], model.cfg.num_hidden_layers) if args.agto_layers else None
    from tqdm import tqdm
    pbar = tqdm(total=total_steps, initial=start, disable=rank != 0, dynamic_ncols=True, desc="sft")
    try:
        history = []
        floor_warned = -10 ** 9  # the step of the last warning that the system mass sits at its floor
        step = start
        loader, epoch = None, -1
        while step < total_steps:
            if loader is None:  # (re)build this process's micro-batch stream from the current position
                epoch, k = divmod(step, steps_per_epoch)
                batches = epoch_batches(ds.lengths, args.batch_size, args.seed, epoch, not args.no_group_by_length)
                sampler = [mb for b in batches[k:] for mb in micro_batches(b, args.micro_batch, rank, world)]
                loader = iter(torch.utils.data.DataLoader(
                    ds, batch_sampler=sampler, num_workers=args.num_workers, pin_memory=device.type == "cuda",
                    collate_fn=partial(collate, pad_id=tok.pad_id)))
            t0 = time.time()
            mbs = [next(loader) for _ in range(accum)]
            if (step + 1) % steps_per_epoch == 0:
                loader = None

            mult = lr_multiplier(step, total_steps, warmup, args.min_lr_ratio)
            for g in optimizer.param_groups:
                g["lr"] = g["base_lr"] * mult
            ctl_factory = (partial(vas.AttentionGuidedLoss, layers=layers, chunk_size=args.agto_chunk, eps=args.agto_eps,
                                   sys_floor=args.agto_sys_floor) if use_ctl else None)
            r = forward_backward(model, mbs, args.agto_alpha, args.agto_beta, ctl_factory, args.ce_chunk, device,
                                 autocast, use_fsdp)
            lm_loss, enhance, suppress, n_tok, n_img, n_all = (r[k] for k in ("lm_loss", "enhance", "suppress", "n_tok",
                                                                               "n_img", "n_all"))
            total = r["loss"]

            params = [p for p in model.parameters() if p.requires_grad]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip if args.grad_clip > 0 else float("inf"))
            if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
                grad_norm = grad_norm.full_tensor()
            grad_norm = float(grad_norm)
            if not (math.isfinite(total) and math.isfinite(grad_norm)):
                where = f"the last good checkpoint is {last_ckpt} (--resume)" if last_ckpt else "no checkpoint was written yet"
                raise NonFiniteLoss(f"step {step + 1}: non-finite loss {total} (lm {lm_loss}, enhance {enhance}, "
                                    f"suppress {suppress}, grad norm {grad_norm}); stopped before the update; {where}")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            dt = time.time() - t0
            row = dict(step=step, epoch=round(step / steps_per_epoch, 4), loss=total, lm_loss=lm_loss,
                       enhance=enhance if use_ctl else None, suppress=suppress if use_ctl else None,
                       vas=r["vas"], sys_share=r["sys_share"], at_floor=r["at_floor"], grad_norm=grad_norm,
                       lr=args.lr * mult, tokens_per_s=n_all / dt, n_tokens=int(n_tok), n_all_tokens=int(n_all),
                       n_image_samples=int(n_img))
            history.append(row)
            if rank == 0 and r["at_floor"] is not None and r["at_floor"] > 0.5 and floor_warned < step - 50:
                floor_warned = step  # at most one warning per 50 steps
                what = (f"--agto-sys-floor {args.agto_sys_floor} (or below): L_suppress pulls it back up there"
                        if args.agto_sys_floor > 0 else
                        f"the eps floor ({args.agto_eps:g}): the system turn has lost its attention, VAS reads "
                        f"{r['vas']:.3g} and no longer measures anything; consider --agto-sys-floor")
                tqdm.write(f"warning: step {step}: in {100 * r['at_floor']:.0f}% of the user-turn query rows (over "
                           f"layers and heads) the share of attention on the system turn (mean {r['sys_share']:.2e}) "
                           f"sits at {what}")
            if rank == 0:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                # the LM loss first: the objective's terms are logs of attention masses (the
                # suppress term is negative), so the total alone does not show learning
                terms = (dict(enhance=f"{enhance:.3f}", suppress=f"{suppress:.2f}", sys=f"{r['sys_share']:.3f}")
                         if use_ctl and r["sys_share"] is not None else {})
                pbar.set_postfix(lm_loss=f"{lm_loss:.4f}", **terms, lr=f"{row['lr']:.2e}",
                                 tok_s=f"{row['tokens_per_s']:.0f}")
                pbar.update(1)

            if step == total_steps or (args.save_every > 0 and step % args.save_every == 0):
                state = dict(step=step, epoch=step // steps_per_epoch, batch_in_epoch=step % steps_per_epoch,
                             steps_per_epoch=steps_per_epoch, batch_size=args.batch_size, num_records=len(ds),
                             seed=args.seed, group_by_length=not args.no_group_by_length, total_steps=total_steps,
                             warmup_steps=warmup, world_size=world, args=vars(args))
                last_ckpt = save_checkpoint(model, optimizer, step, args, state, model_dir, use_fsdp, device, improc)
    finally:
        pbar.close()
    return {"metrics": history, "checkpoint": last_ckpt, "config": config}


def load_train_state(ckpt, model, optimizer, args, rank, world, num_records, steps_per_epoch, use_fsdp, device) -> int:
    """Optimizer, RNG and data position from ckpt/train_state.pt; returns the step to continue from.
    The model weights were already loaded from the same folder."""
    state = torch.load(os.path.join(ckpt, "train_state.pt"), map_location="cpu", mmap=True, weights_only=True)
    for key, now in (("batch_size", args.batch_size), ("seed", args.seed), ("num_records", num_records),
                     ("group_by_length", not args.no_group_by_length)):
        if state[key] != now:
            raise ValueError(f"cannot resume from {ckpt}: {key} was {state[key]}, now {now} (the data order would differ)")
    if use_fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(model, optimizer, state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        optimizer.load_state_dict(state["optimizer"])
    if state["world_size"] == world:
        rng = state["rng"][rank]
        torch.set_rng_state(rng["cpu"])
        if device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], device)
    return int(state["step"])


if __name__ == "__main__":
    main()
