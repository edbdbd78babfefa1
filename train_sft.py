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
    run_config.json        all arguments and derived settings of the run, and its provenance (the
                           command, the weights' fingerprint, git commit, torch, device: provenance.py)
    metrics.jsonl          one line per optimizer step (--report-to: also to TensorBoard, OUT/tensorboard, or W&B)
    training_curves.png    its curves, drawn again at every checkpoint (plot.py)
    step_N/                the model folder as the hub has it, ready to upload: config.json (with its
                           dtype) + model.safetensors in the source model's dtype (--save-dtype), and
                           the source folder's tokenizer, chat template, generation config and
                           preprocessor_config.json (with this run's pixel bounds)
    train_state/step_N.pt  what only --resume needs: optimizer, step, RNG of every rank, data position,
                           the run's arguments; the float32 master weights when step_N is bf16/fp16
    latest                 "step_N": the last complete checkpoint (written last, atomically)

A user error (a bad record, a missing or unreadable file, a folder that is not a checkpoint) ends
the script with one `error: ...` line naming the file, exit status 1; a traceback means a bug.
"""

import argparse
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import plot
import release
import training
import vas
from data import IGNORE, IMAGE, DataError, ImageProcessor, SFTDataset, Tokenizer, UserError, collate, run_cli
from hub import check_model_folder

parser = argparse.ArgumentParser(description="Cold-start SFT of Qwen2.5-VL with the attention-guided objective",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument("--config", default=None, metavar="FILE.yaml",
                    help="LLaMA-Factory's SFT YAML (the release's avar_sft.yaml) as the settings, the flags given here "
                         "overriding it (release.sft_settings; needs pyyaml)")
# data
parser.add_argument("--data", default="toy/sft.jsonl",
                    help="SFT records, JSON lines or a .json array (OpenAI/TRL, LLaMA-Factory, flat/EasyR1 forms); "
                         "or DIR/dataset_info.json:NAME[,NAME...], LLaMA-Factory's datasets by name")
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
parser.add_argument("--new-special-tokens", default=None, metavar="T1,T2,...",
                    help="comma-separated tokens added as special tokens before the data is read, as LLaMA-Factory's "
                         "new_special_tokens (the release: '<think>,</think>,<answer>,</answer>'); the embedding "
                         "grows only if it has too few rows; the checkpoints' tokenizer files carry them")
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
parser.add_argument("--report-to", default="none", choices=training.REPORT_TO,
                    help="also log every metrics.jsonl row to TensorBoard (OUT/tensorboard) or W&B (needs that package)")
# checkpoints
parser.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps (and at the end); 0: end only")
parser.add_argument("--keep-last", type=int, default=0, help="keep only the last N checkpoints (0: all)")
parser.add_argument("--save-dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                    help="dtype of the saved weights; auto: the dtype the source config.json states")
parser.add_argument("--resume", nargs="?", const="auto", default=None,
                    help="continue a run: bare --resume reads OUT/latest; or a step_N folder")


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
    n_tok, n_img, n_all = training.all_reduce_sum(local, use_fsdp).tolist()
    if n_tok == 0:  # every process sees the same sums, so all of them stop here
        raise DataError("no trained token in this step: all of its records failed to load")
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
            if mb.get("empty"):  # all its records failed to load (collate): a zero loss through every
                # parameter the others train (under FSDP each process reduces the same gradients)
                loss = loss + 0.0 * F.linear(hidden[:, -1], model.lm_head.weight).sum()
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
    lm, enh, sup, vas_sum, vas_n, share, floor_n = training.all_reduce_sum(sums, use_fsdp).tolist()
    lm_loss, enhance, suppress = lm / n_tok, enh / max(n_img, 1), sup / max(n_img, 1)
    return dict(loss=lm_loss + alpha * enhance + beta * suppress, lm_loss=lm_loss, enhance=enhance,
                suppress=suppress, vas=vas_sum / vas_n if vas_n else None, n_tok=int(n_tok), n_img=int(n_img),
                n_all=int(n_all), sys_share=share / n_img if ctl_factory is not None and n_img else None,
                at_floor=floor_n / n_img if ctl_factory is not None and n_img else None)


# --------------------------------------------------------------------------------------------
# The run: setup, then per step the data, the update, the report and the checkpoint
# --------------------------------------------------------------------------------------------


@dataclass
class Run:
    """What every step of one SFT run reads: its settings, data, model and optimizer."""
    args: argparse.Namespace
    dctx: training.Dist
    tok: Tokenizer
    improc: ImageProcessor
    ds: SFTDataset
    source: training.SaveSource  # what checkpoints take from the folder the weights came from
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    autocast: object  # the context of the forwards (bf16 autocast in one process)
    accum: int  # micro-batches per process and step
    steps_per_epoch: int
    total_steps: int
    warmup: int
    start: int  # the first step this process runs (> 0 when resumed)
    last_ckpt: str | None  # the newest complete checkpoint
    config: dict
    reporter: training.Reporter | None  # --report-to, on rank 0


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # data-loader workers fork after the tokenizer ran
    with training.distributed(args.device, args.fsdp) as dctx:
        return train(args, dctx)


def parse_args(argv=None) -> argparse.Namespace:
    """The command line; with --config FILE, the file's settings (release.sft_settings) in place of the
    defaults, so that every flag given overrides the file."""
    config = parser.parse_known_args(argv)[0].config
    if config is None:
        return parser.parse_args(argv)
    settings, ignored = release.sft_settings(config)
    if ignored and os.environ.get("RANK", "0") == "0":
        print(f"--config {config}: ignored (they cannot change the result here): {', '.join(ignored)}", flush=True)
    args = parser.parse_args(argv, namespace=argparse.Namespace(**settings))  # argparse keeps what is set
    if args.data is None:
        raise UserError(f"{config}: `dataset` names no dataset (LLaMA-Factory's names in dataset_dir's "
                        "dataset_info.json), nor does --data")
    return args


def setup(args, dctx) -> Run:
    """The resume point, the data (validated before anything is trained), the model (float32
    master weights; FSDP2 shards them, bf16 autocast without FSDP), AdamW, the run files."""
    torch.manual_seed(args.seed + dctx.rank)
    backend = training.report_backend(args.report_to)  # a missing package stops the run here
    dtype = training.compute_dtype(args.dtype, dctx.device)
    if args.batch_size % (args.micro_batch * dctx.world):
        raise UserError(f"--batch-size {args.batch_size} must be a multiple of --micro-batch {args.micro_batch}"
                         f" x {dctx.world} processes")
    accum = args.batch_size // (args.micro_batch * dctx.world)

    ckpt = training.resume_checkpoint(args.resume, args.out) if args.resume else None
    if args.resume and ckpt is None:
        dctx.print0(f"--resume: no checkpoint in {args.out}, starting from {args.model}")
    model_dir = ckpt or check_model_folder(args.model)  # a run folder (an SFT run for more SFT): its latest
    source = training.save_source(model_dir, args.save_dtype)  # read now: --keep-last may remove model_dir

    tok = Tokenizer(model_dir)
    if args.new_special_tokens:
        add_special_tokens(tok, args.new_special_tokens, dctx)
    improc = ImageProcessor.from_pretrained(model_dir, min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    records = release.dataset_records(args.data) if release.is_dataset_spec(args.data) else None
    ds = SFTDataset(args.data, tok, improc, args.max_len, args.on_long, args.skip_bad, args.max_errors,
                    args.check_images, records)
    dctx.print0(ds.summary())
    if ds.stats["bad"]:
        dctx.print0(f"--skip-bad: dropped {ds.stats['bad']} invalid records, e.g.\n  " + "\n  ".join(ds.errors[:5]))
    steps_per_epoch = len(ds) // args.batch_size
    if steps_per_epoch == 0:
        raise UserError(f"{args.data}: {len(ds)} records, fewer than one batch of --batch-size {args.batch_size}")
    total_steps = args.max_steps if args.max_steps > 0 else max(1, int(args.epochs * steps_per_epoch))
    warmup = math.ceil(args.warmup_ratio * total_steps)

    model = training.load_for_training(model_dir, tok, dctx.device, args.grad_ckpt, args.freeze_vision, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    autocast = training.prepare_model(model, dctx, dtype)
    model.train()
    optimizer = training.build_optimizer(model, args.lr, args.weight_decay, args.betas, dctx.device, args.vision_lr)
    start = 0
    if ckpt is not None:
        expected = dict(batch_size=args.batch_size, seed=args.seed, num_records=len(ds),
                        group_by_length=not args.no_group_by_length)
        start = training.restore_train_state(ckpt, training.read_train_state(ckpt), model, optimizer, dctx, expected)
        dctx.print0(f"resumed from {ckpt} at step {start}")

    config = dict(vars(args), world_size=dctx.world, grad_accum=accum, steps_per_epoch=steps_per_epoch,
                  total_steps=total_steps, warmup_steps=warmup, fsdp=dctx.fsdp, compute_dtype=str(dtype),
                  device=str(dctx.device), parameters=n_params, data_stats=ds.stats, torch=torch.__version__)
    dctx.print0("config: " + json.dumps(config, default=str))
    if ckpt is None and os.path.exists(os.path.join(args.out, "latest")):
        dctx.print0(f"warning: {args.out} holds checkpoints of an earlier run; this run starts afresh and "
                    "overwrites them")
    reporter = training.start_run(args, dctx, config, start, source, model_dir, dtype, backend,
                                  [key for key, _, _ in plot.SFT_PANELS])
    return Run(args, dctx, tok, improc, ds, source, model, optimizer, autocast, accum, steps_per_epoch,
               total_steps, warmup, start, ckpt, config, reporter)

def add_special_tokens(tok: Tokenizer, spec: str, dctx):
    """--new-special-tokens "<think>,</think>": split at commas, each stripped, as LLaMA-Factory does."""
    tokens = [t.strip() for t in spec.split(",")]
    if not all(tokens):
        raise UserError(f"--new-special-tokens {spec!r}: an empty token (tokens are separated by commas)")
    new = tok.add_special_tokens(tokens)
    dctx.print0(f"special tokens: {', '.join(f'{t} {tok.tok.token_to_id(t)}' for t in tokens)} "
                f"({len(new)} new; the tokenizer now has {tok.vocab_size})")


def train(args, dctx):
    from tqdm import tqdm  # a progress bar only

    run = setup(args, dctx)
    pbar = tqdm(total=run.total_steps, initial=run.start, disable=dctx.rank != 0, dynamic_ncols=True, desc="sft")
    history, skipped = [], 0  # skipped: records that failed to load, this process's run
    floor_warned = -10 ** 9  # the step of the last warning that the system mass sits at its floor
    finished = False
    try:
        batches = step_batches(run)
        for step in range(run.start, run.total_steps):
            t0 = time.time()
            mbs = next(batches)
            n_bad = skip_bad_records(run, step, mbs, pbar)
            skipped += n_bad
            row, r = update(run, step, mbs)
            row.update(tokens_per_s=r["n_all"] / (time.time() - t0), n_tokens=r["n_tok"], n_all_tokens=r["n_all"],
                       n_image_samples=r["n_img"], skipped=n_bad)
            history.append(row)
            if floor_warned < row["step"] - 50 and warn_at_floor(run, row, pbar):
                floor_warned = row["step"]  # at most one warning per 50 steps
            if dctx.rank == 0:
                training.append_metrics(args.out, row)
                if run.reporter is not None:
                    run.reporter.log(row)
                show_progress(run, pbar, row, skipped)
            done = step + 1
            if done == run.total_steps or (args.save_every > 0 and done % args.save_every == 0):
                save(run, done)
        finished = True
    finally:
        pbar.close()
        if run.reporter is not None:
            run.reporter.close(finished)
    return {"metrics": history, "checkpoint": run.last_ckpt, "config": run.config}


def step_batches(run: Run):
    """This process's micro-batches, `accum` per step, from the run's start: the epoch's batches
    (epoch_batches, a function of the seed and the epoch) cut into micro-batches over processes;
    the loader is rebuilt at every epoch, and at the resume point."""
    args, step = run.args, run.start
    while True:  # one epoch (or its rest) per pass
        epoch, k = divmod(step, run.steps_per_epoch)
        batches = training.epoch_batches(run.ds.lengths, args.batch_size, args.seed, epoch,
                                         not args.no_group_by_length)
        sampler = [mb for b in batches[k:]
                   for mb in training.micro_batches(b, args.micro_batch, run.dctx.rank, run.dctx.world)]
        loader = iter(torch.utils.data.DataLoader(
            run.ds, batch_sampler=sampler, num_workers=args.num_workers, pin_memory=run.dctx.device.type == "cuda",
            collate_fn=partial(collate, pad_id=run.tok.pad_id)))
        for _ in range(k, run.steps_per_epoch):
            yield [next(loader) for _ in range(run.accum)]
        step = (epoch + 1) * run.steps_per_epoch


def skip_bad_records(run: Run, step: int, mbs, pbar) -> int:
    """Records whose images passed validation but do not decode (collate lists them): the same
    records on every run, so a resumed run skips exactly what the first one skipped. Without
    --skip-bad the run stops before the update, saved at the step before. Returns their number
    over all processes."""
    bad = [err for mb in mbs for _, err in mb["skipped"]]
    n_bad = int(training.all_reduce_sum(torch.tensor([len(bad)], device=run.dctx.device), run.dctx.fsdp).item())
    if n_bad and not run.args.skip_bad:
        if step > 0 and run.last_ckpt != os.path.join(run.args.out, f"step_{step}"):
            save(run, step)
        kept = f"saved {run.last_ckpt}" if run.last_ckpt else "no checkpoint was written yet"
        raise DataError(f"step {step + 1}: {bad[0] if bad else 'a record on another process failed to load'}"
                        f"; stopped before the update, {kept}. Fix the file and --resume, or "
                        f"--resume --skip-bad to skip such records")
    for err in bad:
        pbar.write(f"skipped (--skip-bad): {err}")
    return n_bad


def update(run: Run, step: int, mbs):
    """Update `step` (0-based): the lr of the schedule, forward_backward over the micro-batches,
    the clipped and checked gradient, the optimizer step. Returns the metrics row and the losses."""
    args = run.args
    mult = lr_multiplier(step, run.total_steps, run.warmup, args.min_lr_ratio)
    training.set_lr(run.optimizer, mult)
    use_ctl = args.agto_alpha != 0 or args.agto_beta != 0
    layers = vas.parse_layers([args.agto_layers], run.model.cfg.num_hidden_layers) if args.agto_layers else None
    ctl_factory = (partial(vas.AttentionGuidedLoss, layers=layers, chunk_size=args.agto_chunk, eps=args.agto_eps,
                           sys_floor=args.agto_sys_floor) if use_ctl else None)
    r = forward_backward(run.model, mbs, args.agto_alpha, args.agto_beta, ctl_factory, args.ce_chunk,
                         run.dctx.device, run.autocast, run.dctx.fsdp)
    grad_norm = training.clip_grad_norm(run.model, args.grad_clip)
    training.check_finite(step + 1, r["loss"], grad_norm, run.last_ckpt,
                          f"lm {r['lm_loss']}, enhance {r['enhance']}, suppress {r['suppress']}, ")
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    row = dict(step=step + 1, epoch=round((step + 1) / run.steps_per_epoch, 4), loss=r["loss"], lm_loss=r["lm_loss"],
               enhance=r["enhance"] if use_ctl else None, suppress=r["suppress"] if use_ctl else None,
               vas=r["vas"], sys_share=r["sys_share"], at_floor=r["at_floor"], grad_norm=grad_norm,
               lr=args.lr * mult)
    return row, r


def warn_at_floor(run: Run, row: dict, pbar) -> bool:
    """Warn (rank 0) when in most (sample, layer, head) cells the system turn's share of the user
    turn's attention sits at the floor of L_suppress (the term pulls it back up) or at eps (VAS no longer
    measures anything. Returns whether it warned."""
    if run.dctx.rank != 0 or row["at_floor"] is None or row["at_floor"] <= 0.5:
        return False
    args = run.args
    what = (f"--agto-sys-floor {args.agto_sys_floor} (or below): L_suppress pulls it back up there"
            if args.agto_sys_floor > 0 else
            f"the eps floor ({args.agto_eps:g}): the system turn has lost its attention, VAS reads "
            f"{row['vas']:.3g} and no longer measures anything; consider --agto-sys-floor")
    pbar.write(f"warning: step {row['step']}: in {100 * row['at_floor']:.0f}% of the user-turn query rows (over layers "
               f"and heads) the share of attention on the system turn (mean {row['sys_share']:.2e}) sits at {what}")
    return True


def show_progress(run: Run, pbar, row: dict, skipped: int):
    # the LM loss first: the objective's terms are logs of attention masses (the suppress term is
    # negative), so the total alone does not show learning
    terms = (dict(enhance=f"{row['enhance']:.3f}", suppress=f"{row['suppress']:.2f}", sys=f"{row['sys_share']:.3f}")
             if row["enhance"] is not None and row["sys_share"] is not None else {})
    pbar.set_postfix(lm_loss=f"{row['lm_loss']:.4f}", **terms, lr=f"{row['lr']:.2e}",
                     tok_s=f"{row['tokens_per_s']:.0f}", **({"skipped": skipped} if skipped else {}))
    pbar.update(1)


def save(run: Run, step: int):
    """Checkpoint the state after `step` updates (every rank calls this), make it the run's last,
    and draw OUT/training_curves.png from metrics.jsonl (plot.py)."""
    args = run.args
    state = dict(step=step, epoch=step // run.steps_per_epoch, batch_in_epoch=step % run.steps_per_epoch,
                 steps_per_epoch=run.steps_per_epoch, batch_size=args.batch_size, num_records=len(run.ds),
                 seed=args.seed, group_by_length=not args.no_group_by_length, total_steps=run.total_steps,
                 warmup_steps=run.warmup, world_size=run.dctx.world, args=vars(args))
    run.last_ckpt = training.save_checkpoint(run.model, run.optimizer, run.dctx, args.out, step, state, run.source,
                                             args.keep_last, run.improc, previous=run.last_ckpt, tokenizer=run.tok)
    if run.dctx.rank == 0:
        plot.save_run_curves(args.out, "sft")


if __name__ == "__main__":
    run_cli(main)
