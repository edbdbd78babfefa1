"""Attention statistics of AVAR: Visual Attention Score, intervention, attention-guided loss, visual reward.

Paper: "From Narrow to Panoramic Vision: Attention-Guided Cold-Start Reshapes Multimodal Reasoning"
(arXiv 2603.03825); the formulas below are those of docs/avar_method.md. Every token has one role
(data.py): S system, V image (<|image_pad|>), U user (every other prompt token), R response.
A^{l,h}_{i,j} is the post-softmax attention of query i on key j in layer l, head h.

    VAS_i(l,h) = sum_{j in V} A_ij / sum_{j in S} A_ij                                          (1)
    VAS        = 1/(L H |Q|) sum_l sum_h sum_{i in Q} VAS_i(l,h),  Q = U + V (the user turn)
                 per sample, then the mean over the samples that have image (and system) tokens.
                 Bands (`band`): "narrow" < 10, "wide" 10-15, "panoramic" > 15.
    Z'_{l,h}   = Z_{l,h} * (1 + a_img M_img - a_sys M_sys)   (logits to image / system keys)     (3)
    L_enhance  = -(1/|L|) sum_l (1/H) sum_h log( 1/(|Q||V|) sum_{q in Q} sum_{k in V} A_qk )      (4b)
    L_suppress =  (1/|L|) sum_l (1/H) sum_h log( 1/(|Q||S|) sum_{q in Q} sum_{k in S} A_qk + eps )
    r_visual   = (1/|T|) sum_{t in T} (1/|L|) sum_l sum_{k in V} A^l_tk / (sum_{k in S} A^l_tk + eps)
                 T the response tokens, A^l the head-mean attention, layers 0-7; zero for a wrong
                 answer (the gate is the caller's: train_grpo.total_reward).                   (4c)

Everything is a sum of attention over keys of one role, so the one quantity computed here is the
role mass  m^{l,h}_{i,r} = sum_{j: role(j)=r} A^{l,h}_ij  for the chosen query rows i: (B, H, N, 4).
It is computed inside the model's forward through the `attn_ctl` hook (model.py): at the end of
each decoder layer `observe(layer, q, k, allowed, key_scale)` hands over the rotated queries and
keys, and `role_masses` recomputes the attention of the query rows with `model.attention_probs`
(the model's own lines: scores, intervention scale, mask, softmax), a chunk of rows at a time:

    memory: a chunk holds (B, H, chunk, Tk) probabilities; what is kept is (B, H, N, 4) per layer.
    No layer's T x T attention ever exists, and nothing T x T outlives the layer.

Query rows may differ per batch row: each row's query positions are gathered into an index list
padded to the longest one (`query_rows`), so chunks only touch query rows (a padded slot costs
one wasted row and is zeroed). For the differentiable loss each chunk runs under
torch.utils.checkpoint (non-reentrant): backward recomputes the chunk's probabilities instead of
storing them, and the chunk saves only references to q, k and the mask that the layer keeps anyway.

Controllers (the attn_ctl protocol):  Intervention (key_scale only), AttentionStats (observe; takes
an optional intervention for its key_scale), AttentionGuidedLoss (AttentionStats with gradients).
A stats controller serves ONE forward: it records the first observe per layer and ignores the
replay of activation checkpointing (whose computation it still repeats, so autograd finds its
saved tensors). Functions: `vas`, `measure_vas`, `visual_reward`.

CLI (VAS of one image + question, per-layer table, heatmap of attention on the image):
    python vas.py --model DIR --image cat.png --question "What is shown?" [--layers 0-7]
                  [--a-img 0.15 --a-sys 0.05] [--query user|user_text] [--out heatmap.png]
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.checkpoint import checkpoint

from data import (IMAGE, PAD_ROLE, RESPONSE, ROLE_NAMES, SYSTEM, USER, ImageProcessor, Tokenizer, UserError,
                  encode_chat, load_image, run_cli)
from hub import resolve_checkpoint
from model import attention_probs, from_pretrained

N_ROLES = 4  # SYSTEM, IMAGE, USER, RESPONSE: the last axis of every role-mass tensor
CHUNK_ELEMS = 2 ** 24  # default chunk: rows such that one chunk's (B, H, rows, Tk) holds ~16M values
QUERY_SETS = ("user", "user_text", "response")


# --------------------------------------------------------------------------------------------
# Query sets and role masses: the core
# --------------------------------------------------------------------------------------------


def query_mask(roles, query: str = "user"):
    """Query tokens (B, T) bool from roles (B, T).

    "user":      Q = U + V, the user turn: USER or IMAGE tokens before the row's first RESPONSE token
                 (the whole row when it has none). The "\\n" after a reply and later turns are not
                 the user turn the formulas mean, hence "before the first response".
    "user_text": U only (same span, IMAGE tokens excluded).
    "response":  R, the RESPONSE tokens.
    """
    if query == "response":
        return roles == RESPONSE
    if query not in QUERY_SETS:
        raise ValueError(f"query must be one of {QUERY_SETS}, got {query!r}")
    prompt = (roles == RESPONSE).long().cumsum(1) == 0  # before the first response token
    keep = (roles == USER) | (roles == IMAGE) if query == "user" else roles == USER
    return keep & prompt


def query_rows(mask):
    """Per-row index lists of the query positions, padded to the longest.

    mask (B, T) bool -> rows (B, N) long (positions, in order), valid (B, N) bool. Padded slots
    point at position 0, which no query row precedes: its allowed keys (at least its diagonal) lie
    within the causal bound of any chunk (see role_masses), so a padded slot is never fully masked
    (no NaN); it is computed and then zeroed.
    """
    B, T = mask.shape
    counts = mask.sum(1)  # (B,)
    N = int(counts.max()) if B else 0
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)  # query positions first, in order
    valid = torch.arange(N, device=mask.device)[None, :] < counts[:, None]
    rows = torch.where(valid, order[:, :N], torch.zeros_like(order[:, :N]))
    return rows, valid


def role_onehot(roles, Tk: int):
    """(B, Tk) float32 one-hot of each key's role (padding: all zero); roles shorter than Tk (a KV
    cache not yet written) are extended with PAD_ROLE."""
    if roles.shape[1] > Tk:
        raise ValueError(f"roles cover {roles.shape[1]} positions but the layer has {Tk} keys")
    if roles.shape[1] < Tk:
        roles = torch.cat([roles, roles.new_full((roles.shape[0], Tk - roles.shape[1]), PAD_ROLE)], 1)
    real = roles >= 0  # PAD_ROLE keys: no role, all zero
    return torch.nn.functional.one_hot(roles.clamp(min=0), N_ROLES).float() * real[..., None]  # (B, Tk, 4)


def _chunk_probs(q, k, allowed, key_scale, rows):
    """Attention A (B, H, c, Tk) of query rows `rows` (B, c), by the model's own attention lines."""
    B, H, _, d = q.shape
    c = rows.shape[1]
    qc = q.gather(2, rows[:, None, :, None].expand(B, H, c, d))  # (B, H, c, d)
    ac = allowed.gather(2, rows[:, None, :, None].expand(B, 1, c, allowed.shape[-1]))  # (B, 1, c, Tk)
    return attention_probs(qc, k, ac, d ** -0.5, key_scale)


def _chunk_masses(q, k, allowed, key_scale, onehot, rows, valid):
    """Role masses (B, H, c, 4) of one chunk of query rows, float32; padded slots zeroed."""
    a = _chunk_probs(q, k, allowed, key_scale, rows).float()  # (B, H, c, Tk)
    return torch.matmul(a, onehot[:, None]) * valid[:, None, :, None]  # sum over keys of each role


def role_masses(q, k, allowed, onehot, rows, valid, key_scale=None, chunk_size: int | None = None,
                differentiable: bool = False, key_mass: bool = False):
    """m_{i,r} = sum_{j: role(j) = r} A_ij for the query rows, chunk by chunk.

    q (B, H, Tq, d) rotated queries, k (B, H, Tk, d) GQA-expanded keys, allowed (B, 1, Tq, Tk) bool,
    onehot (B, Tk, 4) key roles, rows / valid (B, N) from `query_rows`, key_scale (B, Tk) or None.
    differentiable: each chunk under non-reentrant checkpoint, so backward recomputes its
    (B, H, c, Tk) probabilities instead of keeping them. Otherwise the caller decides on no_grad.
    key_mass: also return sum_i A_ij over the valid rows, per key (B, H, Tk) (for heatmaps).
    Returns masses (B, H, N, 4) float32 and key_mass (B, H, Tk) or None.
    """
    B, H, _, _ = q.shape
    Tk, N = k.shape[2], rows.shape[1]
    c = chunk_size or max(1, CHUNK_ELEMS // max(1, B * H * Tk))
    out = []
    kmass = q.new_zeros(B, H, Tk, dtype=torch.float32) if key_mass else None
    for s in range(0, N, c):
        r, v = rows[:, s:s + c], valid[:, s:s + c]
        # Keys that no row of this chunk may see (past the causal bound) get exactly zero attention:
        # drop them, which halves the work over a causal prompt. The slices are views, no copies.
        seen = allowed.gather(2, r[:, None, :, None].expand(B, 1, r.shape[1], Tk))[:, 0] & v[:, :, None]
        seen = seen.any(1).any(0)  # (Tk,)
        kb = int(seen.nonzero().max()) + 1 if bool(seen.any()) else Tk
        kc, ac, hot = k[:, :, :kb], allowed[..., :kb], onehot[:, :kb]
        sc = key_scale[:, :kb] if key_scale is not None else None
        if differentiable and torch.is_grad_enabled():
            out.append(checkpoint(_chunk_masses, q, kc, ac, sc, hot, r, v, use_reentrant=False))
        elif key_mass:
            a = _chunk_probs(q, kc, ac, sc, r).float() * v[:, None, :, None]  # (B, H, c, kb)
            out.append(torch.matmul(a, hot[:, None]))
            kmass[..., :kb] += a.sum(2)
        else:
            out.append(_chunk_masses(q, kc, ac, sc, hot, r, v))
    masses = torch.cat(out, 2) if out else q.new_zeros(B, H, 0, N_ROLES, dtype=torch.float32)
    return masses, kmass


# --------------------------------------------------------------------------------------------
# Controllers (model.py's attn_ctl protocol)
# --------------------------------------------------------------------------------------------


class Intervention:
    """Training-free intervention (3): logits to IMAGE keys times (1 + a_img), to SYSTEM keys times
    (1 - a_sys), in the layers of `layers` (None: every layer).

    roles (B, Tk): the role of every key the forward will see. key_scale(layer) is (B, Tk) or None;
    None also when a_img == a_sys == 0, so zero strength runs exactly the unmodified model.
    """

    def __init__(self, roles, a_img: float = 0.15, a_sys: float = 0.0, layers=None):
        self.a_img, self.a_sys = float(a_img), float(a_sys)
        self.layers = None if layers is None else set(int(l) for l in layers)
        self.active = self.a_img != 0.0 or self.a_sys != 0.0
        scale = torch.ones(roles.shape, dtype=torch.float32, device=roles.device)  # (B, Tk)
        scale[roles == IMAGE] = 1.0 + self.a_img
        scale[roles == SYSTEM] = 1.0 - self.a_sys
        self.scale = scale

    def key_scale(self, layer: int):
        if not self.active or (self.layers is not None and layer not in self.layers):
            return None
        return self.scale

    def observe(self, layer, q, k, allowed, key_scale):
        pass

    @staticmethod
    def for_generation(roles, a_img: float = 0.15, a_sys: float = 0.0, layers=None):
        """A factory for `model.generate(..., attn_ctl_factory=...)`.

        roles: a list of 1-D role tensors, one per prompt (unpadded, the order of `prompts`), or a
        (B, L) tensor already left-padded like generate pads (PAD_ROLE on padding). generate calls
        factory(cache_len, ids (B, L) left-padded, mask (B, L)); the keys are the padded prompt
        followed by the generated tokens, whose role is RESPONSE.
        """
        def factory(cache_len: int, ids, mask):
            B, L = mask.shape
            if isinstance(roles, torch.Tensor):
                padded = roles.to(mask.device)
                if padded.shape != (B, L) or not torch.equal(padded != PAD_ROLE, mask.bool()):
                    raise ValueError("left-padded roles must be (B, L) with PAD_ROLE exactly on generate's padding")
            else:
                if len(roles) != B:
                    raise ValueError(f"{len(roles)} role tensors for {B} prompts")
                padded = torch.full((B, L), PAD_ROLE, dtype=torch.long, device=mask.device)
                for b, r in enumerate(roles):
                    n = int(mask[b].sum())
                    if len(r) != n:
                        raise ValueError(f"prompt {b}: {len(r)} roles for {n} tokens")
                    padded[b, L - n:] = r.to(mask.device)
            gen = torch.full((B, cache_len - L), RESPONSE, dtype=torch.long, device=mask.device)
            return Intervention(torch.cat([padded, gen], 1), a_img, a_sys, layers)
        return factory


class StopForward(Exception):
    """Raised by a stats controller after its last layer when `stop_early`: later layers are not needed."""


class AttentionStats:
    """Records, per layer, the role masses (B, H, N, 4) of the query rows during one forward.

    roles (B, T) key roles; query_mask (B, T) bool (see `query_mask`); layers: which layers (None:
    all); chunk_size: query rows per chunk (None: ~16M probabilities per chunk); grad: keep the
    masses differentiable (chunks checkpointed); intervention: an object whose key_scale the model
    uses (the masses are then those of the intervened model); key_mass: also keep sum_i A_ij per
    key (B, H, Tk) (no grad); stop_early: raise StopForward after the last wanted layer (the
    measuring functions catch it; needs `layers`).

    After the forward: masses {layer: (B, H, N, 4)}, rows / valid (B, N) the query positions.
    """

    def __init__(self, roles, query_mask, layers=None, chunk_size: int | None = None, grad: bool = False,
                 intervention=None, key_mass: bool = False, stop_early: bool = False):
        if query_mask.shape != roles.shape:
            raise ValueError(f"query_mask {tuple(query_mask.shape)} and roles {tuple(roles.shape)} differ")
        self.roles = roles
        self.rows, self.valid = query_rows(query_mask.bool())
        self.layers = None if layers is None else sorted(set(int(l) for l in layers))
        self.chunk_size, self.grad, self.intervention = chunk_size, grad, intervention
        self.want_key_mass, self.stop_early = key_mass, stop_early and layers is not None
        self.masses: dict[int, torch.Tensor] = {}
        self.key_mass: dict[int, torch.Tensor] = {}
        self._onehot = None

    def key_scale(self, layer: int):
        return self.intervention.key_scale(layer) if self.intervention is not None else None

    def observe(self, layer, q, k, allowed, key_scale):
        if self.layers is not None and layer not in self.layers:
            return
        replay = layer in self.masses  # activation checkpointing replays the layer in backward
        differentiable = self.grad and torch.is_grad_enabled()
        if replay and not differentiable:
            return  # nothing of ours was saved for backward: nothing to recompute
        if self._onehot is None or self._onehot.shape[1] != k.shape[2]:
            self._onehot = role_onehot(self.roles.to(k.device), k.shape[2])
        rows, valid = self.rows.to(q.device), self.valid.to(q.device)
        with torch.set_grad_enabled(differentiable):
            m, km = role_masses(q, k, allowed, self._onehot, rows, valid, key_scale, self.chunk_size,
                                differentiable, self.want_key_mass and not differentiable)
        if replay:
            return  # the replay ran the same computation (autograd needs it); the record stays the first
        self.masses[layer] = m
        if km is not None:
            self.key_mass[layer] = km
        if self.stop_early and len(self.masses) == len(self.layers):
            raise StopForward

    def stacked(self, layers=None):
        """Masses of `layers` (default: all recorded, in order) as (B, L, H, N, 4), and the layer list."""
        layers = sorted(self.masses) if layers is None else [int(l) for l in layers]
        missing = [l for l in layers if l not in self.masses]
        if missing:
            raise ValueError(f"layers {missing} were not recorded (recorded: {sorted(self.masses)})")
        if not layers:
            raise ValueError("no layer recorded: did the forward run with this controller?")
        return torch.stack([self.masses[l] for l in layers], 1), layers


def can_stop_early(model) -> bool:
    """Aborting a forward by exception is safe on a plain module, not under FSDP (its per-block
    hooks must run to reshard and to keep collectives in step)."""
    try:  # imported here: torch.distributed is not in every torch build
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return True
    return not any(isinstance(m, FSDPModule) for m in model.modules())


def run_forward(model, batch: dict, ctl):
    """One forward with controller `ctl` (final hidden states only: no logits), StopForward caught."""
    try:
        model(batch["input_ids"], batch.get("attention_mask"), batch.get("pixel_values"),
              batch.get("image_grid_thw"), attn_ctl=ctl, return_hidden=True)
    except StopForward:
        pass


# --------------------------------------------------------------------------------------------
# VAS (1)
# --------------------------------------------------------------------------------------------


def band(v: float | None) -> str:
    """The paper's reading of a VAS: "narrow" < 10, "wide" 10-15, "panoramic" > 15; "-" for no
    value (None; NaN when no sample counted; infinite when nothing attends to the system turn)."""
    if v is None or not math.isfinite(v):
        return "-"
    return "narrow" if v < 10 else "wide" if v <= 15 else "panoramic"


@dataclass
class VASResult:
    vas: float  # batch mean over counted samples (NaN if none)
    per_sample: torch.Tensor  # (B,) NaN where not counted
    per_layer: torch.Tensor  # (L,) mean over counted samples of the per-sample, per-layer VAS
    per_head: torch.Tensor  # (L, H)
    layers: list  # the L layer indices
    counted: torch.Tensor  # (B,) bool: samples with image and system tokens and >= 1 query token
    query: str | None = None
    stats: AttentionStats | None = field(default=None, repr=False)

    @property
    def band(self) -> str:
        return band(self.vas)


def vas(stats: AttentionStats, query: str | None = None, layers=None) -> VASResult:
    """VAS (1) from recorded masses, with its per-layer and per-head breakdown.

    query: restrict to a query set ("user", "user_text", "response") within the recorded rows
    (None: all recorded rows); layers: a subset of the recorded layers. A sample counts when it has
    image tokens, system tokens (else the ratio is 0/x or x/0) and at least one query token.
    """
    m, layers = stats.stacked(layers)
    m = m.detach()  # (B, L, H, N, 4)
    roles, rows, valid = stats.roles.to(m.device), stats.rows.to(m.device), stats.valid.to(m.device)
    if query is not None:
        want = query_mask(roles, query)  # (B, T)
        recorded = torch.zeros_like(want)
        recorded[valid.nonzero()[:, 0], rows[valid]] = True  # (padded slots all point at row 0)
        if (want & ~recorded).any():
            raise ValueError(f"query set {query!r} has tokens that were not recorded")
        valid = valid & want.gather(1, rows)
    ratio = m[..., IMAGE] / m[..., SYSTEM]  # VAS_i(l, h): (B, L, H, N)
    ratio = torch.where(valid[:, None, None, :], ratio, torch.zeros_like(ratio))
    nq = valid.sum(1)  # |Q| per sample
    per_lh = ratio.sum(-1) / nq.clamp(min=1)[:, None, None]  # (B, L, H): mean over query tokens
    counted = (roles == IMAGE).any(1) & (roles == SYSTEM).any(1) & (nq > 0)
    per_sample = torch.where(counted, per_lh.mean((1, 2)), torch.full_like(per_lh[:, 0, 0], float("nan")))
    per_head = per_lh[counted].mean(0)  # (L, H), NaN when no sample counts
    return VASResult(vas=float(per_sample[counted].mean()) if counted.any() else float("nan"),
                     per_sample=per_sample.cpu(), per_layer=per_head.mean(1).cpu(), per_head=per_head.cpu(),
                     layers=layers, counted=counted.cpu(), query=query, stats=stats)


@torch.no_grad()
def measure_vas(model, batch: dict, query: str = "user", layers=None, intervention=None,
                chunk_size: int | None = None, key_mass: bool = False) -> VASResult:
    """VAS of a batch in one no-grad forward.

    batch: input_ids (B, T), attention_mask (B, T), roles (B, T), pixel_values, image_grid_thw.
    intervention: an Intervention (or None) active while measuring. Only the query rows of `query`
    in the layers `layers` (None: all) are computed; the forward stops after the last of them
    (unless the model is FSDP-sharded).
    """
    roles = batch["roles"]
    stats = AttentionStats(roles, query_mask(roles, query), layers, chunk_size, grad=False,
                           intervention=intervention, key_mass=key_mass, stop_early=can_stop_early(model))
    run_forward(model, batch, stats)
    return vas(stats)


# --------------------------------------------------------------------------------------------
# VAS against accuracy: the paper's first finding is a correlation (Pearson r with its p value)
# --------------------------------------------------------------------------------------------


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) by its continued fraction (modified Lentz; Numerical
    Recipes 6.4), using the symmetry I_x(a, b) = 1 - I_{1-x}(b, a) where the fraction converges slowly."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - betainc(b, a, 1.0 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 500):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return front * f


def pearson(x, y) -> dict:
    """Pearson r = sum (x - mx)(y - my) / sqrt(sum (x - mx)^2 sum (y - my)^2), and the two-sided
    p-value of H0: r = 0 from t = r sqrt((n - 2) / (1 - r^2)) with n - 2 degrees of freedom:
    p = I_{df / (df + t^2)}(df / 2, 1 / 2). r is None when n < 2 or one side is constant; p is None
    when n < 3."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"pearson: x and y must be 1-D of one length, got {x.shape} and {y.shape}")
    n = len(x)
    if n < 2:
        return {"r": None, "p": None, "n": n}
    dx, dy = x - x.mean(), y - y.mean()
    denom = math.sqrt(float((dx * dx).sum()) * float((dy * dy).sum()))
    if denom == 0.0:
        return {"r": None, "p": None, "n": n}
    r = max(-1.0, min(1.0, float((dx * dy).sum()) / denom))
    return {"r": r, "p": pearson_p(r, n), "n": n}


def pearson_p(r: float, n: int) -> float | None:
    """Two-sided p-value of a Pearson r from n pairs (Student t, n - 2 degrees of freedom)."""
    if n < 3:
        return None
    if abs(r) >= 1.0:
        return 0.0
    df = n - 2
    t2 = r * r * df / (1.0 - r * r)
    return betainc(df / 2.0, 0.5, df / (df + t2))


# --------------------------------------------------------------------------------------------
# Attention-guided SFT objective (4b)
# --------------------------------------------------------------------------------------------


@dataclass
class GuidedTerms:
    """Sums over the image samples of a micro-batch, to be averaged by the trainer:
    L_enhance = enhance_sum / n_image summed over micro-batches and processes (same for suppress)."""
    enhance_sum: torch.Tensor  # scalar with grad
    suppress_sum: torch.Tensor  # scalar with grad
    n_image: int  # samples with image tokens (the only ones contributing)
    vas_sum: float  # detached VAS (1) summed over the counted samples, for logging
    vas_n: int
    sys_share_sum: float = 0.0  # detached system share (1/|Q|) sum_q sum_{k in S} A, mean over l, h; summed over image samples
    floor_n: float = 0.0  # fraction of query rows (over layers, heads) at the floor, summed over image samples

    @property
    def enhance(self):
        return self.enhance_sum / max(self.n_image, 1)

    @property
    def suppress(self):
        return self.suppress_sum / max(self.n_image, 1)


class AttentionGuidedLoss(AttentionStats):
    """Controller for the attention-guided objective (4b), differentiable and chunked.

        ctl = AttentionGuidedLoss(roles)                       # roles (B, T) of the SFT batch
        logits = model(ids, mask, pv, grid, attn_ctl=ctl)
        t = ctl.terms()
        loss = lm_loss + 0.15 * t.enhance + 0.15 * t.suppress   (or accumulate the sums)

    Q = U + V (the user turn, `query_mask(roles, "user")`), layers default all, eps 1e-6 in the
    suppress term only (as the formula). Per sample, then the mean over samples with image tokens;
    samples without image tokens contribute nothing. A sample with image tokens but no system turn
    has nothing to suppress: its suppress term is 0. Works with model.set_gradient_checkpointing.

    sys_floor = f (default 0: the paper's formula) is a floor under the suppressed mass. With
    s_q = sum_{k in S} A_qk the share of query q's attention on the system turn and s its mean over
    Q (one layer, one head), the suppress term of a layer and head becomes

        log( max(s, f) / |S| + eps )  +  (1/|Q|) sum_{q in Q} relu( log(f + eps) - log(s_q + eps) )

    the paper's term exactly while every query keeps at least f on the system turn; the push stops
    once the mean reaches f, and each query below f is pulled back up (gradient -1/s_q).
    Why: log(s/|S| + eps) has gradient 1 / (s + eps |S|), so the push grows as s falls and drives
    it to its eps floor (s ~ |S| eps), where VAS = V/S reads 1e6-1e11 and measures nothing.
    Measured on the toy (alpha = beta = 0.15, f = 0.25): with only the hinge on the mean, L_enhance
    still lowers s through the softmax (0.53 -> 0.13, VAS 6e6: VAS averages V/S per query, and
    some queries reach S ~ 0); with only the pull per query, the paper's push on the mean wins
    (s 0.07, VAS 65); with both, s stays at the floor. On Qwen2.5-VL-7B the system turn is a strong
    sink and the paper reports VAS 7.5 -> 13.8 with the objective: the system share falls by a
    factor ~2 and stays orders of magnitude above the eps floor. A floor at half the base model's
    share keeps a small model in that regime. `terms()` reports the mean share and the fraction
    of query rows at or below the floor (f, or 10 |S| eps).
    """

    def __init__(self, roles, layers=None, chunk_size: int | None = None, eps: float = 1e-6, intervention=None,
                 sys_floor: float = 0.0):
        super().__init__(roles, query_mask(roles, "user"), layers, chunk_size, grad=True, intervention=intervention)
        if not 0.0 <= sys_floor < 1.0:
            raise ValueError(f"sys_floor must be in [0, 1), got {sys_floor}")
        self.eps, self.sys_floor = eps, sys_floor

    def terms(self) -> GuidedTerms:
        m, layers = self.stacked(self.layers)  # (B, L, H, N, 4), differentiable
        roles, valid = self.roles.to(m.device), self.valid.to(m.device)
        nq = valid.sum(1).float()  # |Q|
        nv, ns = (roles == IMAGE).sum(1).float(), (roles == SYSTEM).sum(1).float()  # |V|, |S|
        has_img, has_sys = nv > 0, ns > 0
        total = m.sum(3)  # (B, L, H, 4): sum over q in Q of the role masses (padded slots are 0)
        mean_v = total[..., IMAGE] / (nq * nv).clamp(min=1)[:, None, None]
        mean_s = total[..., SYSTEM] / (nq * ns).clamp(min=1)[:, None, None]
        # torch.where before the log: a sample without image tokens never takes log(0) (nor its grad)
        one = torch.ones_like(mean_v)
        enhance = -torch.log(torch.where(has_img[:, None, None], mean_v, one)).mean((1, 2))  # (B,)
        s_q = m[..., SYSTEM]  # (B, L, H, N): each query's share on the system turn
        qmask = valid[:, None, None, :].to(m.dtype)
        if self.sys_floor > 0:
            # no push once the mean share reaches the floor, and a pull back up on each query below it
            mean_s = torch.maximum(mean_s, (self.sys_floor / ns.clamp(min=1))[:, None, None])
            below = torch.relu(math.log(self.sys_floor + self.eps) - torch.log(s_q + self.eps))
            pull = (below * qmask).sum(-1) / nq.clamp(min=1)[:, None, None]  # (B, L, H)
        else:
            pull = torch.zeros_like(mean_s)
        suppress = (torch.log(mean_s + self.eps) + pull).mean((1, 2))  # (B,)
        suppress = torch.where(has_sys, suppress, torch.zeros_like(suppress))
        w = has_img.to(m.dtype)
        v = vas(self, layers=layers)
        share = (total[..., SYSTEM] / nq.clamp(min=1)[:, None, None]).detach()  # mean s per (B, L, H)
        # at the floor: at most 1% above sys_floor (or below it), or below 10 |S| eps (the eps floor
        # of the paper's formula: the system turn has lost that query's attention)
        low = torch.maximum(torch.full_like(ns, 1.01 * self.sys_floor), 10 * self.eps * ns)[:, None, None, None]
        at_floor = (((s_q.detach() <= low).to(m.dtype) * qmask).sum(-1) / nq.clamp(min=1)[:, None, None]).mean((1, 2))
        sel = has_img & has_sys
        return GuidedTerms(enhance_sum=(enhance * w).sum(), suppress_sum=(suppress * w).sum(),
                           n_image=int(has_img.sum()),
                           vas_sum=float(v.per_sample[v.counted].sum()) if v.counted.any() else 0.0,
                           vas_n=int(v.counted.sum()),
                           sys_share_sum=float(share.mean((1, 2))[sel].sum()), floor_n=float(at_floor[sel].sum()))


# --------------------------------------------------------------------------------------------
# Visual reward (4c)
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def visual_reward(model, input_ids, attention_mask, roles, pixel_values=None, image_grid_thw=None,
                  layers=None, eps: float = 1e-6, chunk_size: int | None = None, form: str = "ratio"):
    """r_visual (4c) of each sequence (prompt + sampled response), (B,) float32, no grad.

    Over the RESPONSE rows t: A^l = head-mean attention of layer l; per token the ratio
    sum_V A^l / (sum_S A^l + eps), then the mean over layers and tokens.
    form="ratio" is that formula (the paper's); form="share" takes per token and layer
    v / (v + s + eps) with v = sum_V A^l, s = sum_S A^l instead: the same order (share =
    ratio / (1 + ratio) for eps = 0, so ~ the ratio while it is small), but bounded by 1, so
    lambda_v * r_visual can never outweigh r_acc = 1 however far the system mass falls (the ratio
    is unbounded: at s ~ 0 it reads v / eps ~ 1e4-1e6). layers: default 0-7,
    clipped to the model's depth; the forward stops after the last of them (not under FSDP, where
    every rank runs the whole forward; call it on all ranks alike). Rows without response
    or image tokens give 0. The correctness gate (r_visual = 0 for a wrong answer) is the
    caller's: train_grpo.total_reward applies it.
    """
    n = model.cfg.num_hidden_layers
    layers = [l for l in (range(8) if layers is None else layers) if 0 <= l < n]
    if not layers:
        raise ValueError("visual_reward: no layer left after clipping to the model's depth")
    stats = AttentionStats(roles, query_mask(roles, "response"), layers, chunk_size,
                           stop_early=can_stop_early(model))
    run_forward(model, dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                            image_grid_thw=image_grid_thw), stats)
    m, _ = stats.stacked()
    a = m.mean(2)  # head-mean: (B, L, N, 4)
    if form == "ratio":
        ratio = a[..., IMAGE] / (a[..., SYSTEM] + eps)  # (B, L, N)
    elif form == "share":
        ratio = a[..., IMAGE] / (a[..., IMAGE] + a[..., SYSTEM] + eps)
    else:
        raise ValueError(f"visual_reward: form must be 'ratio' or 'share', got {form!r}")
    valid = stats.valid.to(m.device)
    per_token = torch.where(valid[:, None, :], ratio, torch.zeros_like(ratio)).mean(1)  # mean over layers
    nt = valid.sum(1)
    r = per_token.sum(-1) / nt.clamp(min=1)
    has = (nt > 0) & (roles.to(m.device) == IMAGE).any(1)
    return torch.where(has, r, torch.zeros_like(r)).float()


# --------------------------------------------------------------------------------------------
# CLI: VAS of one image and question, with a heatmap
# --------------------------------------------------------------------------------------------


def image_heatmaps(stats: AttentionStats, image_grid_thw, merge: int = 2, row: int = 0):
    """Mean attention (over recorded layers, heads and query tokens) of the query set on each image
    token of batch row `row`, one (h/merge, w/merge) map per image (mean over frames)."""
    if not stats.key_mass:
        raise ValueError("record with key_mass=True")
    km = torch.stack([stats.key_mass[l][row] for l in sorted(stats.key_mass)]).mean((0, 1))  # (Tk,)
    km = km / stats.valid[row].sum().clamp(min=1)
    img = km[: stats.roles.shape[1]][stats.roles[row].to(km.device) == IMAGE].cpu()  # image tokens, in order
    grids = [(t, h // merge, w // merge) for t, h, w in image_grid_thw.tolist()]  # merged grids
    return [x.view(g).mean(0) for x, g in zip(img.split([t * lh * lw for t, lh, lw in grids]), grids)]


def ramp(x):
    """The colour scale of the heatmaps: black -> red -> yellow -> white for x in [0, 1] (array)."""
    return np.stack([np.clip(3 * x, 0, 1), np.clip(3 * x - 1, 0, 1), np.clip(3 * x - 2, 0, 1)], -1)


def heatmap_figure(image, heat, size: int = 336, title: str = ""):
    """A figure a person can read: the image, the attention map on its own (one block per merged
    token, nearest upsampling: no invented detail), the map over the image, and the colour scale
    from 0 to the largest value (attention per image token, mean over layers, heads and queries)."""
    h = heat.float()
    hi = float(h.max())  # the scale runs from 0: a flat map looks flat, not stretched to the full ramp
    norm = (h / max(hi, 1e-12)).numpy()
    pic = image.convert("RGB").resize((size, size), Image.NEAREST)
    blocks = Image.fromarray((ramp(norm) * 255).round().astype(np.uint8), "RGB").resize((size, size), Image.NEAREST)
    over = Image.blend(pic, blocks, 0.55)
    pad, bar_w, top = 12, 24, 28 if title else 8
    fig = Image.new("RGB", (3 * size + 4 * pad + bar_w + 90, size + top + 30), "white")
    d = ImageDraw.Draw(fig)
    if title:
        d.text((pad, 8), title, fill="black")
    for i, (panel, name) in enumerate(((pic, "image"), (blocks, "attention per image token"), (over, "overlay"))):
        x = pad + i * (size + pad)
        fig.paste(panel, (x, top))
        d.rectangle((x - 1, top - 1, x + size, top + size), outline=(160, 160, 160))
        d.text((x, top + size + 8), name, fill="black")
    x = pad + 3 * (size + pad)
    col = np.linspace(1, 0, size)[:, None].repeat(bar_w, 1)
    fig.paste(Image.fromarray((ramp(col) * 255).round().astype(np.uint8), "RGB"), (x, top))
    d.rectangle((x, top, x + bar_w - 1, top + size - 1), outline="black")
    for frac in (0.0, 0.5, 1.0):
        y = top + round((1 - frac) * (size - 1))
        d.line((x + bar_w, y, x + bar_w + 4, y), fill="black")
        d.text((x + bar_w + 7, y - 5), f"{frac * hi:.3g}", fill="black")
    return fig


def parse_layers(specs, n_layers: int):
    """["0-7"] or ["0", "3", "5"] or ["0,2,4-6"] -> sorted layer list; None -> None (all)."""
    if not specs:
        return None
    out = set()
    for part in ",".join(str(spec) for spec in specs).split(","):
        if part:  # "a-b" or "a"
            a, dash, b = part.partition("-")
            out.update(range(int(a), int(b if dash else a) + 1))
    bad = [l for l in out if not 0 <= l < n_layers]
    if bad:
        raise ValueError(f"layers {sorted(bad)} outside 0..{n_layers - 1}")
    return sorted(out)


def main(argv=None):
    p = argparse.ArgumentParser(description="Visual Attention Score of one image + question")
    p.add_argument("--model", required=True, help="Hugging Face folder (config, safetensors, tokenizer.json)")
    p.add_argument("--image", required=True)
    p.add_argument("--question", required=True)
    p.add_argument("--layers", nargs="*", help="layers to measure, e.g. 0-7 or 0 3 5 (default: all)")
    p.add_argument("--query", default="user", choices=["user", "user_text"])
    p.add_argument("--a-img", type=float, default=0.0, help="intervention on image-key logits (paper: 0.15)")
    p.add_argument("--a-sys", type=float, default=0.0, help="intervention on system-key logits")
    p.add_argument("--out", default="heatmap.png")
    p.add_argument("--size", type=int, default=336, help="side of each panel of the figure, in pixels")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-pixels", type=int, default=None)
    args = p.parse_args(argv)
    print(f"config: {vars(args)}")

    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if dev.startswith("cuda") else "float32"))
    model = from_pretrained(args.model, dtype=dtype, device=dev).eval()
    model_dir = resolve_checkpoint(args.model)  # a run folder: its latest checkpoint
    tok = Tokenizer(model_dir)
    proc = ImageProcessor.from_pretrained(model_dir, max_pixels=args.max_pixels)
    try:
        image = load_image(args.image)
    except (OSError, ValueError) as e:  # missing, empty or undecodable: the message names the file
        raise UserError(str(e)) from None
    pv, grid = proc([image], names=[args.image])
    merge = model.cfg.vision.spatial_merge_size
    enc = encode_chat(tok, [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": args.question}]}],
                      image_tokens=[int(grid[0].prod()) // merge ** 2], add_generation_prompt=True)
    ids, roles = enc["input_ids"][None].to(dev), enc["roles"][None].to(dev)
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), roles=roles,
                 pixel_values=pv.to(dev, dtype), image_grid_thw=grid.to(dev))
    layers = parse_layers(args.layers, model.cfg.num_hidden_layers)
    interv = Intervention(roles, args.a_img, args.a_sys)
    res = measure_vas(model, batch, args.query, layers, interv, key_mass=True)

    print(f"tokens {ids.shape[1]}  image tokens {int((roles == IMAGE).sum())}  "
          f"system tokens {int((roles == SYSTEM).sum())}  query set {args.query} "
          f"({int(res.stats.valid.sum())} tokens)  intervention a_img={args.a_img} a_sys={args.a_sys}")
    print(f"VAS {res.vas:.4f}  ({res.band} view: narrow < 10, wide 10-15, panoramic > 15)")
    m, _ = res.stats.stacked()
    valid = res.stats.valid.to(m.device)
    mean_mass = (m[0] * valid[0, None, None, :, None]).sum(2).mean(1) / valid[0].sum().clamp(min=1)  # (L, 4)
    print("layer      VAS  " + "  ".join(f"{'mass ' + ROLE_NAMES[r]:>14}" for r in range(N_ROLES)))
    for i, l in enumerate(res.layers):
        print(f"{l:5d} {res.per_layer[i]:8.4f}  " + "  ".join(f"{float(x):14.4f}" for x in mean_mass[i]))
    heat = image_heatmaps(res.stats, grid, merge)[0]
    title = f"{args.question.splitlines()[0]}   VAS {res.vas:.3g} ({res.band} view)"
    heatmap_figure(image, heat, args.size, title).save(args.out)
    print(f"heatmap ({heat.shape[0]}x{heat.shape[1]} merged tokens) of the {image.size[0]}x{image.size[1]} "
          f"image, panels of {args.size} px -> {args.out}")
    return res


if __name__ == "__main__":
    run_cli(main)
