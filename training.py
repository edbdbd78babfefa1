"""What train_sft.py and train_grpo.py share: the process group, the model's placement, the
optimizer, the checked update, and checkpoints that a killed run resumes from exactly.

    Dist               the process group as a run sees it (rank, world, device, FSDP on/off), its
                       print0 and the few collectives the loops use; `distributed(...)` sets it up
    balanced_chunks    micro-batches padded with dummy passes: every process runs as many forwards
    epoch_batches, micro_batches   the data order, a function of (seed, epoch): resume stays exact
    load_for_training  float32 master weights, checked against the tokenizer
    prepare_model      FSDP2 units (each vision block, each decoder layer, the root) with bf16
                       compute and float32 gradient reduction; bf16 autocast in one process
    build_optimizer    AdamW, no decay on biases and norms, an own lr for the vision tower if asked
    clip_grad_norm, check_finite   the global gradient norm; NonFiniteLoss stops a diverged run
                       before its update, naming the last good checkpoint
    save_source        what every checkpoint takes from the folder the run loaded, read at the start
    save_checkpoint    OUT/step_N (a hub folder) + OUT/train_state/step_N.pt, then OUT/latest
    resume_checkpoint, read_train_state, restore_train_state   the way back into a run
    weights_checksum   a hash of the full weights as one process sees them (GRPO's --checksum)
    start_run_files, append_metrics   OUT/run_config.json, OUT/metrics.jsonl
    report_backend, Reporter   --report-to tensorboard | wandb: the same rows, the config as hyperparameters

A checkpoint OUT/step_N/ is the model folder as the hub has it: config.json, safetensors in the
source model's dtype (--save-dtype), and the tokenizer, chat template, generation and preprocessor
files of the source folder; it can be uploaded or loaded by transformers as it is. What only a
resumed run needs (optimizer, RNG of every rank, data position; the float32 master weights when
step_N holds a lower precision) is one file beside it, OUT/train_state/step_N.pt. Both are written
under temporary names, fsynced and renamed; `latest` is updated last, so it never names a partial
checkpoint, nor, while a step saved before is replaced (a run resumed from an older step), a
missing one. A run reads the source folder's dtype and hub files once, at its start
(`save_source`): it depends on no file it may itself remove (--keep-last removes the checkpoint a
resumed run started from).
"""

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import pickle
import shutil

import torch
import torch.distributed as dist

from data import UserError
from hub import config_dtype, read_hub_files, replace_dir, resolve_checkpoint, write_hub_files
from model import from_pretrained, save_pretrained
from provenance import provenance


class NonFiniteLoss(UserError):
    """The loss or gradient norm is not finite (diverged settings, e.g. too large a learning rate):
    the run stops with `latest` on the last good checkpoint, one message and no traceback."""


# --------------------------------------------------------------------------------------------
# The process group
# --------------------------------------------------------------------------------------------


class Dist:
    """The process group as a run sees it: rank, world size, device, FSDP on/off. Its collectives
    are no-ops in one process without FSDP."""

    def __init__(self, rank=0, world=1, device=torch.device("cpu"), fsdp=False):
        self.rank, self.world, self.device, self.fsdp = rank, world, device, fsdp

    def print0(self, *a, **k):
        if self.rank == 0:
            print(*a, **k, flush=True)

    def sum(self, values):
        """Sum of a list of floats over processes (float64)."""
        return all_reduce_sum(torch.tensor(values, dtype=torch.float64, device=self.device), self.fsdp).tolist()

    def max(self, value):
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        if self.fsdp:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()

    def gather(self, t):
        """Concatenation over processes of an equal-length 1-D tensor, in rank order."""
        if not self.fsdp:
            return t
        t = t.to(self.device)
        out = torch.empty(t.numel() * self.world, dtype=t.dtype, device=self.device)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(out, t.contiguous())
        return out.cpu()


def all_reduce_sum(t: torch.Tensor, distributed: bool) -> torch.Tensor:
    if distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


@contextlib.contextmanager
def distributed(device_arg: str = "auto", fsdp: bool = False):
    """RANK / WORLD_SIZE from torchrun (absent: one process) -> a Dist; the process group, if one
    was made, is destroyed on the way out. FSDP is on with several processes or when asked."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available() if device_arg == "auto" else device_arg.startswith("cuda")
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    use_fsdp = world > 1 or fsdp
    if use_fsdp and not dist.is_initialized():
        backend = "nccl" if cuda else "gloo"
        if "RANK" in os.environ:
            dist.init_process_group(backend, device_id=device if cuda else None)
        else:  # --fsdp in a plain `python` process: a one-process group
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield Dist(rank, world, device, use_fsdp)
    finally:
        if use_fsdp and dist.is_initialized():
            dist.destroy_process_group()


def balanced_chunks(indices, size, dctx):
    """`indices` cut into chunks of `size`; under FSDP padded with None (a zero-weight dummy pass) up
    to the largest chunk count of any process, so that all run the same number of forwards."""
    chunks = [indices[s:s + size] for s in range(0, len(indices), size)]
    n = int(dctx.max(len(chunks))) if dctx.fsdp else len(chunks)
    return chunks + [None] * (n - len(chunks))


# --------------------------------------------------------------------------------------------
# The data order: a function of (seed, epoch) alone, the same on every process, so a resumed run
# trains exactly the batches the interrupted one would have
# --------------------------------------------------------------------------------------------


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int, group_by_length: bool = True,
                  bucket_batches: int = 16) -> list[list[int]]:
    """The global batches (lists of record indices) of one epoch, the same on every process: a
    seeded shuffle (seed, epoch) cut into buckets of `bucket_batches` batches, each bucket sorted by
    length and cut into batches, the batches shuffled again. So a batch holds records of similar
    length (little padding, sorted within the batch) and the epoch's order stays random. The last
    incomplete batch is dropped; with group_by_length=False batches are plain slices of the shuffle."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(lengths), generator=g).tolist()
    n = len(order) // batch_size * batch_size
    if not group_by_length:
        return [order[i:i + batch_size] for i in range(0, n, batch_size)]
    bucket = batch_size * bucket_batches
    batches = []
    for s in range(0, len(order), bucket):
        chunk = sorted(order[s:s + bucket], key=lambda i: lengths[i])
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk) - batch_size + 1, batch_size))
    batches = batches[: n // batch_size]
    perm = torch.randperm(len(batches), generator=g).tolist()
    return [batches[p] for p in perm]


def micro_batches(batch: list[int], micro_batch: int, rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """This process's micro-batches of one global batch: `micro_batch` consecutive (similar-length)
    records each, micro-batch j to process j % world_size, so every process gets long and short
    ones alike, and one process with A micro-batches sees exactly what A processes would see."""
    assert len(batch) % (micro_batch * world_size) == 0, (len(batch), micro_batch, world_size)
    mbs = [batch[i:i + micro_batch] for i in range(0, len(batch), micro_batch)]
    return mbs[rank::world_size]


# --------------------------------------------------------------------------------------------
# The model and its optimizer
# --------------------------------------------------------------------------------------------


def compute_dtype(arg: str, device) -> torch.dtype:
    """--dtype: bf16, fp32, or auto (bf16 on CUDA, fp32 on the CPU)."""
    return {"bf16": torch.bfloat16, "fp32": torch.float32,
            "auto": torch.bfloat16 if device.type == "cuda" else torch.float32}[arg]


def load_for_training(model_dir: str, tok, device, grad_ckpt: bool, freeze_vision: bool, seed: int = 0):
    """float32 master weights on `device`, checked against the tokenizer (grown for the tokens the run
    added: grow_vocab), with activation checkpointing and a frozen vision tower as asked."""
    model = from_pretrained(model_dir, dtype=torch.float32, device=device)
    if tok.vocab_size - len(tok.added_ids) > model.cfg.vocab_size:
        raise UserError(f"{model_dir}: the tokenizer has {tok.vocab_size - len(tok.added_ids)} tokens, the "
                        f"model's embedding {model.cfg.vocab_size}")
    grow_vocab(model, tok.vocab_size, seed)
    model.set_gradient_checkpointing(grad_ckpt)
    if freeze_vision:
        model.visual.requires_grad_(False)
    return model


def grow_vocab(model, size: int, seed: int = 0) -> bool:
    """LLaMA-Factory's resize_embedding_layer: only when the tokenizer has more tokens (`size`) than
    the embedding has rows (Qwen's 152064 rows leave room for 399 more), the embedding and the LM
    head grow to `size` rounded up to a multiple of 64, and every new row of each is the mean of its
    old rows plus normal noise of std 1/sqrt(D) (D the hidden size; their _noisy_mean_initialization).
    A tied head is the embedding itself. The noise comes from its own generator (`seed`): every
    process draws the same rows. Returns whether it grew."""
    old = model.cfg.vocab_size
    if size <= old:
        return False
    new = -(-size // 64) * 64
    gen = torch.Generator().manual_seed(seed)

    def grown(w):
        noise = torch.randn(new - old, w.shape[1], generator=gen, dtype=torch.float32) / math.sqrt(w.shape[1])
        rows = w.detach().mean(0, keepdim=True) + noise.to(w.device, w.dtype)
        return torch.nn.Parameter(torch.cat([w.detach(), rows]), requires_grad=w.requires_grad)

    emb = model.model.embed_tokens
    emb.weight, emb.num_embeddings = grown(emb.weight), new
    if model.cfg.tie_word_embeddings:
        model.lm_head.weight = emb.weight
    else:
        model.lm_head.weight = grown(model.lm_head.weight)
    model.lm_head.out_features = new
    model.cfg.vocab_size = new
    return True


def shard_model(model, dtype):
    """FSDP2 as torchtitan: each vision block and decoder layer is a unit, then the root (embeddings,
    patch embed, merger, final norm, LM head). bf16 params for compute, float32 gradient reduction."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
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


def prepare_model(model, dctx: Dist, dtype: torch.dtype):
    """Under FSDP: shard_model + run_vision_on_text_batches (parameters in `dtype` for compute).
    Returns the context of the training forwards: bf16 autocast in one process (the weights stay
    float32), nothing under FSDP or in float32."""
    if dctx.fsdp:
        shard_model(model, dtype)
        run_vision_on_text_batches(model)
    if not dctx.fsdp and dtype != torch.float32:
        return torch.autocast(dctx.device.type, dtype=dtype)
    return contextlib.nullcontext()


def build_optimizer(model, lr: float, weight_decay: float, betas, device, vision_lr: float | None = None):
    """AdamW over the trained parameters: weight decay on matrices only (not on biases and norms),
    the vision tower at `vision_lr` if given. Each group keeps its peak lr as `base_lr` (set_lr)."""
    groups = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        vision, decay = n.startswith("visual."), p.ndim >= 2
        groups.setdefault((vision, decay), {"params": [], "weight_decay": weight_decay if decay else 0.0,
                                            "base_lr": vision_lr if vision and vision_lr is not None else lr})
        groups[(vision, decay)]["params"].append(p)
    return torch.optim.AdamW(list(groups.values()), lr=lr, betas=tuple(betas), fused=device.type == "cuda")


def set_lr(optimizer, multiplier: float):
    """Every group's lr = its peak lr (base_lr) * multiplier."""
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * multiplier


def clip_grad_norm(model, max_norm: float) -> float:
    """Clip the trained parameters' gradients to a global norm of max_norm (0: no clipping) and
    return that norm before clipping (over all processes under FSDP)."""
    params = [p for p in model.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP
        norm = norm.full_tensor()
    return float(norm)


def check_finite(step: int, loss: float, grad_norm: float, last_ckpt: str | None, terms: str = ""):
    """NonFiniteLoss if the loss or the gradient norm of update `step` (1-based) is not finite."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    where = f"the last good checkpoint is {last_ckpt} (--resume)" if last_ckpt else "no checkpoint was written yet"
    raise NonFiniteLoss(f"step {step}: non-finite loss {loss} ({terms}grad norm {grad_norm}); stopped before "
                        f"the update; {where}")


def weights_checksum(model, use_fsdp):
    """sha256 of the full float32 weights as this process sees them (FSDP: gathered)."""
    if use_fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
    else:
        sd = model.state_dict()
    h = hashlib.sha256()
    for name in sorted(sd):
        h.update(name.encode())
        h.update(sd[name].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# The run folder: run_config.json, metrics.jsonl
# --------------------------------------------------------------------------------------------


def start_run_files(out: str, config: dict, start: int):
    """Write OUT/run_config.json (the run's full config) and cut OUT/metrics.jsonl back to the
    steps a resumed run does not redo. A resumed run keeps, under "earlier", the start step and
    "provenance" of each run before it in the folder (what produced the steps it continues). Rank 0
    only. Returns the config as written (what --report-to sends as the run's hyperparameters)."""
    os.makedirs(out, exist_ok=True)
    config_path = os.path.join(out, "run_config.json")
    config = dict(config, start_step=start)
    if start > 0 and os.path.exists(config_path):
        try:
            with open(config_path) as f:
                old = json.load(f)
        except ValueError:  # cut by a kill during its write
            old = {}
        config["earlier"] = old.get("earlier", []) + [{k: old.get(k) for k in ("start_step", "provenance")}]
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2, default=str)
    metrics_path = os.path.join(out, "metrics.jsonl")
    if os.path.exists(metrics_path):
        with open(metrics_path) as f:
            lines = [line for line in f if line.strip()]
        kept = []
        for n, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
            except ValueError:
                if n == len(lines):  # the last line, cut by a kill during its write: its step is redone
                    continue
                raise ValueError(f"{metrics_path}: line {n} is not JSON") from None
            if row["step"] <= start:
                kept.append(line if line.endswith("\n") else line + "\n")
        with open(metrics_path, "w") as f:
            f.writelines(kept)
    return config


def start_run(args, dctx, config: dict, start: int, source, model_dir: str, dtype, backend, panels):
    """Rank 0: add the run's provenance (the command, the weights' fingerprint, code version and
    machine) to `config`, write the run files (start_run_files) and, with a --report-to backend
    (report_backend), open the reporter over `panels` (metrics.jsonl keys). Returns the reporter,
    None on other ranks or without a backend."""
    if dctx.rank != 0:
        return None
    config.update(save_dtype_resolved=str(source.dtype), provenance=provenance(model_dir, dctx.device, dtype))
    written = start_run_files(args.out, config, start)
    return Reporter(args.report_to, backend, args.out, written, start, panels) if backend is not None else None


def append_metrics(out: str, row: dict):
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


# --------------------------------------------------------------------------------------------
# --report-to: the metrics.jsonl rows also to TensorBoard or Weights & Biases
# --------------------------------------------------------------------------------------------

REPORT_TO = ("none", "tensorboard", "wandb")


def report_backend(kind: str):
    """The package `--report-to kind` needs, imported here and only when asked for: SummaryWriter
    (tensorboard), the wandb module, or None (none). Every process calls this before training, so
    that a missing package stops all of them with one line."""
    try:
        if kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            return SummaryWriter
        if kind == "wandb":
            import wandb
            return wandb
    except ImportError as e:
        raise UserError(f"--report-to {kind}: the {kind} package is missing ({e}): pip install {kind}") from None
    return None


def flat_config(config: dict, prefix: str = "") -> dict:
    """The run config as TensorBoard's HParams take it: nested dicts as `a.b`, None and lists as
    text, numbers, strings and booleans as they are."""
    out = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(flat_config(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v if isinstance(v, (bool, int, float, str)) else json.dumps(v, default=str)
    return out


def row_scalars(row: dict) -> dict:
    """The numbers of a metrics.jsonl row but its step (booleans as 0 / 1; None, text, lists left out)."""
    return {k: float(v) for k, v in row.items() if k != "step" and isinstance(v, (bool, int, float))}


class Reporter:
    """--report-to on the main process: every number of each metrics.jsonl row at its step, and the
    run config as hyperparameters.

    tensorboard  OUT/tensorboard: a scalar per key, the config as HParams (the dashboard's table,
                 with `metrics` as its columns) and as JSON text. A resumed run (start > 0) hides
                 the interrupted run's steps after `start` (purge_step), which it redoes.
    wandb        wandb.init(config=...): WANDB_MODE=offline, WANDB_PROJECT (default avar),
                 WANDB_NAME (default: OUT), WANDB_DIR (default: OUT) are honoured as wandb reads
                 them; a resumed run is a new W&B run unless WANDB_RUN_ID and WANDB_RESUME say otherwise.
    """

    def __init__(self, kind: str, backend, out: str, config: dict, start: int = 0, metrics=()):
        self.kind = kind
        if kind == "tensorboard":
            from torch.utils.tensorboard.summary import hparams

            self.writer = backend(os.path.join(out, "tensorboard"), purge_step=start + 1 if start else None,
                                  flush_secs=10)
            experiment, session_start, self.session_end = hparams(flat_config(config), dict.fromkeys(metrics, 0.0))
            self.writer.file_writer.add_summary(experiment)
            self.writer.file_writer.add_summary(session_start)
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```")
        else:
            try:
                self.run = backend.init(project=os.environ.get("WANDB_PROJECT", "avar"),
                                        name=os.environ.get("WANDB_NAME", out),
                                        dir=os.environ.get("WANDB_DIR", out), config=config)
            except backend.errors.Error as e:  # no account, no network
                raise UserError(f"--report-to wandb: {e} (WANDB_MODE=offline logs without an account, "
                                "for `wandb sync` later)") from None

    def log(self, row: dict):
        values = row_scalars(row)
        if self.kind == "tensorboard":
            for k, v in values.items():
                self.writer.add_scalar(k, v, row["step"])
        else:
            self.run.log(values, step=row["step"])

    def close(self, ok: bool):
        """The end of the run: `ok` False when it stopped on an error (W&B marks it failed)."""
        if self.kind == "tensorboard":
            if ok:
                self.writer.file_writer.add_summary(self.session_end)
            self.writer.close()
        else:
            self.run.finish(exit_code=0 if ok else 1)


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------

SAVE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def train_state_path(ckpt: str) -> str:
    """OUT/train_state/step_N.pt: the training state of the checkpoint OUT/step_N."""
    ckpt = os.path.normpath(ckpt)
    return os.path.join(os.path.dirname(ckpt), "train_state", os.path.basename(ckpt) + ".pt")


def save_dtype(arg: str, source_dir: str) -> torch.dtype:
    """--save-dtype: `auto` keeps the dtype config.json of the source folder states (a bf16 hub
    model stays bf16); bf16, fp16 or fp32 as asked."""
    return config_dtype(source_dir) if arg == "auto" else SAVE_DTYPES[arg]


@dataclasses.dataclass(frozen=True)
class SaveSource:
    """What every checkpoint of a run takes from the folder the run loaded (the source model, or
    the checkpoint a resumed run started from): the dtype its weights are written in and the hub
    files it carries ({name: bytes}). Read once, when the run starts (`save_source`)."""
    dtype: torch.dtype
    hub_files: dict


def save_source(model_dir: str, dtype_arg: str = "auto") -> SaveSource:
    return SaveSource(save_dtype(dtype_arg, model_dir), read_hub_files(model_dir))


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
    """torch.save to a temporary name, fsync, rename: `path` is complete or absent."""
    tmp = path + ".partial"
    torch.save(state, tmp)
    _fsync_path(tmp)
    os.replace(tmp, path)
    _fsync_path(os.path.dirname(path))


def read_latest(out: str) -> str | None:
    """The name OUT/latest holds, None without one."""
    try:
        with open(os.path.join(out, "latest")) as f:
            return f.read().strip()
    except FileNotFoundError:
        return None


def write_latest(out: str, name: str | None):
    """Point OUT/latest at `name` (a checkpoint folder relative to OUT) atomically, or remove it (None)."""
    if name is None:
        os.remove(os.path.join(out, "latest"))
    else:
        tmp = os.path.join(out, "latest.tmp")
        with open(tmp, "w") as f:
            f.write(name + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(out, "latest"))  # atomic: readers see the old or the new name
    _fsync_path(out)


def prune_checkpoints(out: str, step: int, keep_last: int):
    """--keep-last: remove all but the newest `keep_last` checkpoints up to `step` (the one just
    written) with their training states. Newer ones, left by an earlier run past the step a run
    resumed from, are kept until this run writes that step again (it replaces them)."""
    steps = sorted(int(d[5:]) for d in os.listdir(out) if d.startswith("step_") and d[5:].isdigit())
    for s in [s for s in steps if s <= step][:-keep_last]:
        ckpt = os.path.join(out, f"step_{s}")
        if os.path.exists(train_state_path(ckpt)):
            os.remove(train_state_path(ckpt))
        shutil.rmtree(ckpt)


def save_checkpoint(model, optimizer, dctx: Dist, out: str, step: int, state: dict, source: SaveSource,
                    keep_last: int = 0, image_processor=None, previous: str | None = None, tokenizer=None) -> str:
    """Write OUT/step_N and OUT/train_state/step_N.pt, then `latest`; with keep_last > 0 remove all
    but the last keep_last checkpoints (prune_checkpoints). Every rank calls this (the state dicts
    are gathered collectively); rank 0 writes. `source`: the dtype and hub files of the folder the
    run loaded (save_source); `state`: the run's position, to which the optimizer and RNG states
    are added; `previous`: the run's newest complete checkpoint (the one it resumed from, or its
    last save), which `latest` names while a step_N that `latest` named is replaced; `tokenizer`: the
    run's, whose added special tokens go into the folder's tokenizer files."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(model, options=opts) if dctx.fsdp else model.state_dict()
    # The optimizer state keyed by parameter name (not by index) in one and several processes
    # alike, so that a run started in one process resumes under FSDP and back.
    osd = get_optimizer_state_dict(model, optimizer, options=opts)
    rng = {"cpu": torch.get_rng_state()}
    if dctx.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(dctx.device)
    rngs = [None] * dist.get_world_size() if dctx.fsdp else [rng]
    if dctx.fsdp:
        dist.all_gather_object(rngs, rng)
    name = f"step_{step}"
    final = os.path.join(out, name)
    if dctx.rank == 0:
        tmp = os.path.join(out, f".{name}.partial")
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        save_pretrained(model, tmp, state_dict=msd, dtype=source.dtype)  # config.json + safetensors (hub layout)
        write_hub_files(source.hub_files, tmp, image_processor, tokenizer)
        fsync_tree(tmp)
        if read_latest(out) == name:
            # A run resumed from an older step saves a step that `latest` names (the earlier run's):
            # its train state and folder are about to be replaced. `latest` first names the run's
            # previous checkpoint (none: no `latest`), so it never names a missing or mixed one.
            write_latest(out, os.path.relpath(previous, out) if previous else None)
        state = dict(state, optimizer=osd, rng=rngs)
        if source.dtype != torch.float32:  # step_N rounds the master weights: resume from these
            state["model"] = msd
        os.makedirs(os.path.join(out, "train_state"), exist_ok=True)
        write_train_state(train_state_path(final), state)
        replace_dir(tmp, final)  # the same step saved again (a resumed run): replaced whole
        _fsync_path(out)
        write_latest(out, name)
        if keep_last > 0:
            prune_checkpoints(out, step, keep_last)
    if dctx.fsdp:
        dist.barrier()
    return final


# --------------------------------------------------------------------------------------------
# Resuming
# --------------------------------------------------------------------------------------------


def resume_checkpoint(arg: str, out: str) -> str | None:
    """--resume: bare (`auto`) is the checkpoint OUT/latest names, None when there is none; else a
    step_N folder, or a run folder whose `latest` names one (hub.resolve_checkpoint, the one
    resolver of `latest`). The checkpoint must have its training state."""
    if arg == "auto" and not os.path.isfile(os.path.join(out, "latest")):
        return None
    path = resolve_checkpoint(out if arg == "auto" else arg)
    if not os.path.exists(train_state_path(path)):
        raise UserError(f"--resume {arg}: {train_state_path(path)} is missing; --resume takes a run folder"
                        " (with `latest`) or one of its step_N checkpoints")
    return path


def read_train_state(ckpt: str) -> dict:
    path = train_state_path(ckpt)
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:  # absent, truncated, not a torch file
        raise UserError(f"{path}: cannot read the training state of {ckpt} ({e})") from None


def restore_train_state(ckpt: str, state: dict, model, optimizer, dctx: Dist, expected: dict) -> int:
    """Continue from `state` (read_train_state(ckpt)): the settings in `expected` must be those
    the run was started with; the float32 master weights (where the checkpoint stored them), the
    optimizer state and, with the same number of processes, every rank's RNG are restored.
    Returns the step to continue from. The model weights were loaded from ckpt before."""
    for key, now in expected.items():
        if state[key] != now:
            raise UserError(f"cannot resume from {ckpt}: {key} was {state[key]}, now {now} (the run would differ)")
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if "model" in state:
        if dctx.fsdp:
            set_model_state_dict(model, state["model"], options=opts)
        else:
            model.load_state_dict(state["model"])
    if not dctx.fsdp and all(isinstance(k, int) for k in state["optimizer"]["state"]):
        optimizer.load_state_dict(state["optimizer"])  # a one-process state keyed by index (older saves)
    else:
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=opts)
    if state["world_size"] == dctx.world:
        rng = state["rng"][dctx.rank]
        torch.set_rng_state(rng["cpu"])
        if dctx.device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], dctx.device)
    return int(state["step"])
