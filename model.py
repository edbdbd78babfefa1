"""Qwen2.5-VL in plain PyTorch: vision tower, M-RoPE decoder, KV-cache generation.

One file holds the whole model, written to be read next to
`transformers/models/qwen2_5_vl/modeling_qwen2_5_vl.py` (the reference it is tested against, to
float32 round-off or bitwise) and the Qwen2.5-VL technical report (arXiv 2502.13923).

    config.json + *.safetensors  --from_pretrained-->  Qwen2_5_VL
    pixel_values (N, 1176), image_grid_thw (n_img, 3)  --VisionTower-->  (N/4, D) image features
    input_ids (B, T) with <|image_pad|> slots  --embed, splice features, decoder-->  logits (B, T, V)

The attention maths is written out once, in `attention_probs` (scores, intervention, mask,
softmax): the explicit path multiplies those probabilities with the values, and the attention
statistics of vas.py (VAS, the attention-guided loss, the visual reward) call the same function on
chunks of query rows. The SDPA path (`attn_impl="sdpa"`, the default) gives the same numbers with
a fused kernel. An `attn_ctl` object passed to `forward` is the one hook the method needs:

    attn_ctl.key_scale(layer) -> (B, Tk) multiplier on each key's logits, or None   (intervention)
    attn_ctl.observe(layer, q, k, allowed, key_scale) -> None                           (statistics)

`observe` sees the rotated queries (B, H, Tq, d), the GQA-expanded keys (B, H, Tk, d) (with a KV
cache: the whole cache), the boolean mask (B, 1, Tq, Tk) and the key scale actually used. It is
called at the end of each decoder layer; under activation checkpointing the layer is replayed in
backward and the call repeats, so a controller records the first call per layer and ignores the
replay (the replay must still run its computation so that autograd finds its saved tensors).

Generation: `generate` left-pads a batch of prompts into a pre-allocated KV cache (`KVCache`), then
`prefill` runs the prompts and their images (the vision tower once) through it and `decode` draws
one token per row at a time (`decode_step`, compiled as one graph with `compile`), greedily or by
temperature / top-p sampling (`sample_next`), until every row has emitted a stop token.

Hub folders are read and written through hub.py (safetensors, shards, `latest` of a training run):
`from_pretrained` builds the model on the meta device and fills it tensor by tensor,
`save_pretrained` writes config.json and the weights as transformers writes them.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, dataclass, field
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from data import UserError
from hub import (check_model_folder, check_tensor_table, checkpoint_files, iter_safetensors, normalise_name,
                 tensor_table, write_model_folder)


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclass
class VisionConfig:
    depth: int = 32
    hidden_size: int = 1280
    num_heads: int = 16
    intermediate_size: int = 3420
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: list = field(default_factory=lambda: [7, 15, 23, 31])
    in_chans: int = 3
    out_hidden_size: int = 3584
    rope_theta: float = 10000.0  # fixed in the reference, not read from config.json


@dataclass
class Config:
    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: list = field(default_factory=lambda: [16, 24, 24])
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 128000
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    bos_token_id: int = 151643
    eos_token_id: int = 151645
    vision: VisionConfig = field(default_factory=VisionConfig)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        """Read a Hugging Face config: flat (hub files) or with a nested `text_config` (newer saves).
        Top level first, then `text_config`; rope settings from `rope_scaling` or `rope_parameters`."""
        text = d.get("text_config") or {}

        def get(name, default=None):
            if name in d:
                return d[name]
            return text.get(name, default)

        rope = get("rope_scaling") or get("rope_parameters") or {}
        kw = {}
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "rms_norm_eps",
                  "max_position_embeddings", "image_token_id", "video_token_id",
                  "vision_start_token_id", "vision_end_token_id", "bos_token_id", "eos_token_id"):
            v = get(f)
            if v is not None:
                kw[f] = v
        if isinstance(kw.get("eos_token_id"), list):
            kw["eos_token_id"] = kw["eos_token_id"][0]
        kw["rope_theta"] = get("rope_theta") or rope.get("rope_theta") or 1000000.0
        kw["mrope_section"] = list(rope.get("mrope_section", [16, 24, 24]))
        kw["tie_word_embeddings"] = bool(d.get("tie_word_embeddings", False)
                                         or text.get("tie_word_embeddings", False))
        if get("use_sliding_window"):
            raise ValueError("config.json: sliding-window attention is not supported (Qwen2.5-VL does not use it)")
        vd = dict(d.get("vision_config") or {})
        if "in_channels" in vd and "in_chans" not in vd:
            vd["in_chans"] = vd["in_channels"]
        vfields = {f for f in VisionConfig.__dataclass_fields__ if f != "rope_theta"}
        vision = VisionConfig(**{k: v for k, v in vd.items() if k in vfields})
        cfg = cls(**kw, vision=vision)
        if sum(cfg.mrope_section) * 2 != cfg.head_dim:
            raise ValueError(f"config.json: mrope_section {cfg.mrope_section} must sum to head_dim/2 = {cfg.head_dim // 2}")
        return cfg

    @classmethod
    def from_json(cls, path: str) -> "Config":
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> dict:
        """The hub's flat layout, as Qwen's released config.json has it (transformers 4.x and 5.x
        read it without a warning; 5.x moves the text fields into its `text_config` itself)."""
        d = asdict(self)
        vision = d.pop("vision")
        vision.pop("rope_theta")
        vision["in_channels"] = vision["in_chans"]
        mrope = d.pop("mrope_section")
        return dict(d, architectures=["Qwen2_5_VLForConditionalGeneration"], model_type="qwen2_5_vl",
                    hidden_act="silu", use_sliding_window=False,
                    rope_scaling={"type": "mrope", "mrope_section": mrope},
                    vision_config=dict(vision, model_type="qwen2_5_vl", hidden_act="silu",
                                       tokens_per_second=2))


# --------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):  # normalise in float32, cast back before the weight: it matters for bf16 parity
        h = x.float()
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class Linear(nn.Linear):
    """nn.Linear, except that a product with 2 to 8 rows on a CPU (a decode step) is computed as
    (W @ x^T)^T: MKL streams the weight faster this way round (1.4-4.9x at 2 and 4 rows, 0.8-1.5x
    per matrix at 8, no gain at 1 or 16: `python bench/bench_model.py --matmul`). The last bits may
    differ from F.linear (another summation order), so training and prefill keep F.linear."""

    thin_rows = 8

    def forward(self, x):
        rows = x.numel() // x.shape[-1]
        if x.device.type != "cpu" or not 1 < rows <= self.thin_rows:
            return F.linear(x, self.weight, self.bias)
        # contiguous: SDPA's fast CPU kernel and the next thin product want row-major inputs
        y = (self.weight @ x.reshape(rows, -1).T).T.contiguous().reshape(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool):
        super().__init__()
        self.gate_proj = Linear(dim, hidden, bias=bias)
        self.up_proj = Linear(dim, hidden, bias=bias)
        self.down_proj = Linear(hidden, dim, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rotary(x, cos, sin):
    """Rotary embedding: each feature pair (i, i + d/2) of x turned by the angle whose cos, sin are given."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


# --------------------------------------------------------------------------------------------
# Attention: the explicit maths (where VAS is measured and logits are rescaled) and SDPA
# --------------------------------------------------------------------------------------------


def attention_probs(q, k, allowed, scale: float, key_scale=None):
    """Post-softmax attention A (B, H, Tq, Tk) in q's dtype, written out.

    q (B, H, Tq, d), k (B, H, Tk, d), allowed (B, 1, Tq, Tk) bool, key_scale (B, Tk) or None.
    """
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale  # Z: pre-softmax logits
    if key_scale is not None:  # the paper's intervention: Z' = Z * (1 + a_img on image keys - a_sys on system keys)
        scores = scores * key_scale[:, None, None, :].to(scores.dtype)
    scores = scores.masked_fill(~allowed, float("-inf"))  # causal + padding mask
    return F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)


def attend(q, k, v, allowed, scale: float, impl: str, key_scale=None, is_causal=False):
    """Attention output (B, H, Tq, d). `impl`: "eager" (explicit, via attention_probs) or "sdpa".

    q (B, H, Tq, d); k, v (B, KV, Tk, d) with H a multiple of KV (grouped-query attention: KV head j
    serves query heads j*H/KV .. (j+1)*H/KV - 1).
    Because Z = q.k * scale, multiplying the logits of key j by c equals multiplying k_j by c: the
    SDPA path applies the intervention to the keys and runs the fused kernel unchanged.
    """
    rep = q.shape[1] // k.shape[1]
    if rep > 1 and (impl == "eager" or (q.device.type != "cpu" and not is_causal)):
        # One key per query head for the explicit maths, and for masked GPU calls: there only flash
        # attention (which takes no mask) reads grouped heads itself; SDPA's CPU kernels always do.
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    if impl == "eager":
        return torch.matmul(attention_probs(q, k, allowed, scale, key_scale), v)
    if key_scale is not None:
        k = k * key_scale[:, None, :, None].to(k.dtype)
    gqa = k.shape[1] != q.shape[1]
    if is_causal:  # no padding, no cache: let the kernel build the causal mask itself
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=gqa)


# --------------------------------------------------------------------------------------------
# Vision tower
# --------------------------------------------------------------------------------------------


def vision_rotary(grid_thw, merge: int, head_dim: int, theta: float):
    """2-D rotary angles (N, head_dim) in float32: [row freqs | col freqs] twice, patches in merge-block order."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim // 2, 2, dtype=torch.float) / (head_dim // 2)))  # (head_dim/4,)
    pos = []
    for t, h, w in grid_thw.tolist():
        rows_cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")  # (h, w) each
        # reorder into 2x2 merge blocks so that 4 consecutive patches become one merged token
        blocks = [p.reshape(h // merge, merge, w // merge, merge).permute(0, 2, 1, 3).flatten() for p in rows_cols]
        pos.append(torch.stack(blocks, dim=-1).repeat(t, 1))
    pos = torch.cat(pos).to(inv.device)  # (N, 2)
    freqs = (pos[..., None].float() * inv).flatten(1)  # (N, 2 * head_dim/4) = [row | col]
    return torch.cat([freqs, freqs], dim=-1)


def vision_windows(grid_thw, merge: int, window_size: int, patch_size: int):
    """Window order of the merged tokens and window boundaries in patches.

    Returns window_index (N/4,) (merged-token permutation) and cu_window_seqlens (n_windows + 1,).
    Windows are `window_size / merge / patch_size` merged tokens on a side; edge windows are smaller.
    """
    side = window_size // merge // patch_size
    unit = merge * merge
    index, cu, offset = [], [0], 0
    for t, h, w in grid_thw.tolist():
        lh, lw = h // merge, w // merge
        ids = torch.arange(t * lh * lw).reshape(t, lh, lw)
        pad_h, pad_w = side - lh % side, side - lw % side  # `side`, not 0, when divisible (as the reference)
        nh, nw = (lh + pad_h) // side, (lw + pad_w) // side
        ids = F.pad(ids, (0, pad_w, 0, pad_h), value=-100)
        ids = ids.reshape(t, nh, side, nw, side).permute(0, 1, 3, 2, 4).reshape(t, nh * nw, side * side)
        sizes = (ids != -100).sum(-1).flatten()
        ids = ids.flatten()
        index.append(ids[ids != -100] + offset)
        cu.extend((sizes.cumsum(0) * unit + cu[-1]).tolist())
        offset += t * lh * lw
    cu = torch.unique_consecutive(torch.tensor(cu, dtype=torch.int64))  # empty windows vanish
    return torch.cat(index), cu


def segment_attention(q, k, v, cu_seqlens, scale: float, batched: bool):
    """Non-causal attention within each segment [cu[i], cu[i+1]) of a packed sequence.

    q, k, v (N, H, d) -> (N, H, d). `batched=False`: one SDPA call per segment (bitwise equal to the
    reference). `batched=True`: segments padded into one (S, H, Lmax, d) call with a key mask.
    """
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    if not batched:
        outs = [F.scaled_dot_product_attention(qs.transpose(0, 1)[None], ks.transpose(0, 1)[None],
                                               vs.transpose(0, 1)[None], scale=scale)[0].transpose(0, 1)
                for qs, ks, vs in zip(q.split(lengths), k.split(lengths), v.split(lengths))]
        return torch.cat(outs)
    starts, lens = cu_seqlens[:-1].to(q.device), torch.tensor(lengths, device=q.device)
    offs = torch.arange(max(lengths), device=q.device)
    valid = offs[None, :] < lens[:, None]  # (S, Lmax)
    idx = (starts[:, None] + offs[None, :]).clamp(max=q.shape[0] - 1)  # (S, Lmax)
    qb, kb, vb = (x[idx].transpose(1, 2) for x in (q, k, v))  # (S, H, Lmax, d)
    out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=valid[:, None, None, :], scale=scale)
    return out.transpose(1, 2)[valid]  # segments are contiguous and in order: (N, H, d)


class VisionAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x, cos, sin, cu_seqlens, batched: bool):
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)  # (N, H, d) each
        # rotary in float32, cast back (as the reference: it matters for bf16 parity)
        q, k = (rotary(t.float(), cos[:, None], sin[:, None]).to(v.dtype) for t in (q, k))
        out = segment_attention(q, k, v, cu_seqlens, self.head_dim ** -0.5, batched)
        return self.proj(out.reshape(n, -1))


class VisionBlock(nn.Module):
    def __init__(self, vc: VisionConfig):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(vc.hidden_size), RMSNorm(vc.hidden_size)
        self.attn = VisionAttention(vc.hidden_size, vc.num_heads)
        self.mlp = SwiGLU(vc.hidden_size, vc.intermediate_size, bias=True)

    def forward(self, x, cos, sin, cu_seqlens, batched: bool):
        x = x + self.attn(self.norm1(x), cos, sin, cu_seqlens, batched)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, vc: VisionConfig):
        super().__init__()
        self.shape = (vc.in_chans, vc.temporal_patch_size, vc.patch_size, vc.patch_size)
        self.proj = nn.Conv3d(vc.in_chans, vc.hidden_size, kernel_size=self.shape[1:], stride=self.shape[1:], bias=False)

    def forward(self, pixel_values):  # (N, 3*2*14*14) -> (N, hidden)
        x = pixel_values.view(-1, *self.shape).to(self.proj.weight.dtype)
        return self.proj(x).flatten(1)


class PatchMerger(nn.Module):
    def __init__(self, vc: VisionConfig):
        super().__init__()
        self.unit_dim = vc.hidden_size * vc.spatial_merge_size ** 2
        self.ln_q = RMSNorm(vc.hidden_size)
        self.mlp = nn.Sequential(nn.Linear(self.unit_dim, self.unit_dim), nn.GELU(),
                                 nn.Linear(self.unit_dim, vc.out_hidden_size))

    def forward(self, x):  # (N, hidden) -> (N/4, out_hidden): 4 consecutive patches form one token
        return self.mlp(self.ln_q(x).view(-1, self.unit_dim))


class VisionTower(nn.Module):
    def __init__(self, vc: VisionConfig):
        super().__init__()
        self.vc = vc
        self.patch_embed = PatchEmbed(vc)
        self.blocks = nn.ModuleList([VisionBlock(vc) for _ in range(vc.depth)])
        self.merger = PatchMerger(vc)
        # True: one padded kernel call per block instead of one call per window; None: batched on
        # GPUs (hundreds of tiny kernel launches otherwise), the loop elsewhere (bitwise reference).
        self.batched_attention = None
        self.gradient_checkpointing = False

    def forward(self, pixel_values, grid_thw):
        vc = self.vc
        unit = vc.spatial_merge_size ** 2
        grid_thw = grid_thw.cpu()
        x = self.patch_embed(pixel_values)  # (N, C)
        n = x.shape[0]
        rot = vision_rotary(grid_thw, vc.spatial_merge_size, vc.hidden_size // vc.num_heads, vc.rope_theta).to(x.device)
        window_index, cu_window = vision_windows(grid_thw, vc.spatial_merge_size, vc.window_size, vc.patch_size)
        # full attention: one segment per image frame, so no token attends across images
        cu_full = F.pad(torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0]).cumsum(0), (1, 0))
        window_index = window_index.to(x.device)
        # put patches in window order, 4 patches (one merged token) at a time
        x = x.view(n // unit, unit, -1)[window_index].reshape(n, -1)
        rot = rot.view(n // unit, unit, -1)[window_index].reshape(n, -1)
        cos, sin = rot.cos(), rot.sin()
        batched = x.is_cuda if self.batched_attention is None else self.batched_attention
        for i, blk in enumerate(self.blocks):
            cu = cu_full if i in vc.fullatt_block_indexes else cu_window
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, cos, sin, cu, batched, use_reentrant=False)
            else:
                x = blk(x, cos, sin, cu, batched)
        x = self.merger(x)  # (N/4, D)
        return x[torch.argsort(window_index)]  # back to raster order


# --------------------------------------------------------------------------------------------
# Language model
# --------------------------------------------------------------------------------------------


def mrope_cos_sin(position_ids, head_dim: int, theta: float, section, dtype):
    """Multimodal rotary: position_ids (3, B, T) -> cos, sin (B, T, head_dim) in `dtype`.

    Frequency chunk i of `section * 2` takes its angle from axis i % 3 (temporal, height, width).
    """
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=position_ids.device) / head_dim))
    freqs = position_ids[..., None].float() * inv  # (3, B, T, head_dim/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (3, B, T, head_dim)
    chunks = emb.split(list(section) * 2, dim=-1)
    emb = torch.cat([c[i % 3] for i, c in enumerate(chunks)], dim=-1)  # (B, T, head_dim)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=True)
        self.k_proj = Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=True)
        self.v_proj = Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=True)
        self.o_proj = Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, allowed, impl, cache=None, attn_ctl=None, is_causal=False):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, d)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, KV, T, d)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = rotary(q, cos[:, None], sin[:, None]), rotary(k, cos[:, None], sin[:, None])
        if cache is not None:  # write this step's keys/values, attend over the whole static buffer
            k, v = cache.update(self.layer_idx, k, v)  # (B, KV, S, d)
        key_scale = None
        if attn_ctl is not None:  # the statistics see one key per query head: expand once, for both
            rep = self.n_heads // self.n_kv
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            key_scale = attn_ctl.key_scale(self.layer_idx)
        out = attend(q, k, v, allowed, self.head_dim ** -0.5, impl, key_scale, is_causal and key_scale is None)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1)), (q, k, key_scale)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Config, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, allowed, impl, cache=None, attn_ctl=None, is_causal=False):
        h, (q, k, key_scale) = self.self_attn(self.input_layernorm(x), cos, sin, allowed, impl, cache, attn_ctl, is_causal)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        if attn_ctl is not None:
            # Statistics last: when activation checkpointing replays this layer in backward, the
            # replay repeats this call (the controller records only the first one per layer).
            attn_ctl.observe(self.self_attn.layer_idx, q, k, allowed, key_scale)
        return x


class TextModel(nn.Module):
    """The decoder: the token embedding (read by `Qwen2_5_VL.embed`), the layers, the final norm."""

    def __init__(self, cfg: Config):
        super().__init__()
        # Built from an empty table, not nn.Embedding's own normal_ init: every path fills it (from_pretrained,
        # init_weights), and that init's first call imports torch._dynamo, seconds at every process start.
        self.embed_tokens = nn.Embedding.from_pretrained(torch.empty(cfg.vocab_size, cfg.hidden_size), freeze=False)
        self.layers = nn.ModuleList([DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gradient_checkpointing = False

    def forward(self, x, cos, sin, allowed, impl, cache=None, attn_ctl=None, is_causal=False):
        for layer in self.layers:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, allowed, impl, cache, attn_ctl, is_causal, use_reentrant=False)
            else:
                x = layer(x, cos, sin, allowed, impl, cache, attn_ctl, is_causal)
        return self.norm(x)


def rope_index(input_ids, image_grid_thw, attention_mask, cfg: Config):
    """3-D M-RoPE positions (3, B, T) and rope_delta (B,), per row over its non-padding tokens.

    Text tokens advance all three axes together; an image of merged grid (t, lh, lw) starting at
    `base` takes (base + t_i, base + row, base + col) and the text after it resumes at
    base + max(t, lh, lw). rope_delta = max position + 1 - T lets decoding continue at
    (cache index + rope_delta) on all axes. Padding positions are 0 (they are masked anyway).
    """
    B, T = input_ids.shape
    merge = cfg.vision.spatial_merge_size
    grids = image_grid_thw.tolist() if image_grid_thw is not None else []
    ids_cpu = input_ids.cpu()
    mask_cpu = attention_mask.bool().cpu() if attention_mask is not None else torch.ones(B, T, dtype=torch.bool)
    pos = torch.zeros(3, B, T, dtype=torch.long)
    deltas = torch.zeros(B, dtype=torch.long)
    g = 0
    for b in range(B):
        is_img = (ids_cpu[b][mask_cpu[b]] == cfg.image_token_id).tolist()
        n, i, cur, parts = len(is_img), 0, 0, []
        while i < n:
            if not is_img[i]:  # a text run, up to the next image token
                j = next((j for j in range(i, n) if is_img[j]), n)
                parts.append(torch.arange(cur, cur + j - i).expand(3, -1))
                cur, i = cur + j - i, j
                continue
            if g >= len(grids):
                raise ValueError(f"row {b}: more images in input_ids than entries in image_grid_thw")
            t, h, w = grids[g]
            lh, lw = h // merge, w // merge
            cnt = t * lh * lw
            if i + cnt > n or not all(is_img[i:i + cnt]):
                raise ValueError(f"row {b}: image {g} needs {cnt} consecutive <|image_pad|> tokens at {i}")
            thw = torch.meshgrid(torch.arange(t), torch.arange(lh), torch.arange(lw), indexing="ij")
            parts.append(torch.stack(thw).flatten(1) + cur)  # (3, cnt): (t_i, row, col) + base
            cur, i, g = cur + max(t, lh, lw), i + cnt, g + 1
        row = torch.cat(parts, dim=1) if parts else torch.zeros(3, 0, dtype=torch.long)
        pos[:, b, mask_cpu[b]] = row
        deltas[b] = (row.max() + 1 if row.numel() else 0) - T
    if g != len(grids):
        raise ValueError(f"image_grid_thw has {len(grids)} images but input_ids hold {g}")
    return pos.to(input_ids.device), deltas.to(input_ids.device)


class KVCache:
    """Pre-allocated keys/values (layers, B, KV, S, d), written in place at [pos, pos + T).

    Every row shares one write position: prompts are left-padded so they end together; padding
    and not-yet-written slots are excluded through `key_valid` (B, S). `rope_delta` (B,) is set by
    the prefill so that decoding continues at position (cache index + rope_delta). The write
    position `pos` is a tensor, so a decode step reads no changing Python number and compiles once.
    """

    def __init__(self, cfg: Config, batch: int, max_len: int, dtype, device):
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k, self.v = torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)
        self.key_valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.rope_delta = torch.zeros(batch, dtype=torch.long, device=device)
        self.pos = torch.zeros((), dtype=torch.long, device=device)
        self.k_idx = torch.arange(max_len, device=device)
        self.write_idx = None  # (T,) cache slots of the current call, set by the model
        self.prefilled = False
        self.max_len = max_len

    def repeat_interleave(self, n: int) -> "KVCache":
        """A cache whose row b*n + i (i < n) is a copy of row b: n continuations of each prompt
        after one prefill."""
        new = copy.copy(self)
        new.k, new.v = self.k.repeat_interleave(n, dim=1), self.v.repeat_interleave(n, dim=1)
        new.key_valid, new.rope_delta = self.key_valid.repeat_interleave(n, 0), self.rope_delta.repeat_interleave(n, 0)
        new.pos = self.pos.clone()
        return new

    def update(self, layer: int, k, v):
        self.k[layer].index_copy_(2, self.write_idx, k)
        self.v[layer].index_copy_(2, self.write_idx, v)
        return self.k[layer], self.v[layer]


# --------------------------------------------------------------------------------------------
# The full model
# --------------------------------------------------------------------------------------------


class Qwen2_5_VL(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.visual = VisionTower(cfg.vision)
        self.model = TextModel(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.attn_impl = "sdpa"  # "eager": the explicit attention_probs path; "sdpa": fused kernel

    def set_gradient_checkpointing(self, on: bool = True):
        """Recompute each decoder layer and vision block in backward instead of keeping activations."""
        self.model.gradient_checkpointing = self.visual.gradient_checkpointing = on

    def forward(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None, *,
                cache: KVCache | None = None, attn_ctl=None, return_hidden: bool = False):
        """Logits (B, T, V) (or final hidden states (B, T, D) with return_hidden): the vision merge
        (`embed`), the positions and the mask (`rope_and_mask`), the decoder, the head.

        attention_mask (B, T): 1 for tokens, 0 for padding (left or right). With a `cache`, the
        first call is the prefill (its attention_mask marks the prompt's padding) and later calls
        decode, each token taking the next cache slot.
        """
        decoding = cache is not None and cache.prefilled
        x = self.embed(input_ids, pixel_values, image_grid_thw, check=not decoding)
        cos, sin, allowed, is_causal = self.rope_and_mask(input_ids, attention_mask, image_grid_thw, cache, x.dtype)
        x = self.model(x, cos, sin, allowed, self.attn_impl, cache, attn_ctl, is_causal)
        if cache is not None:
            cache.pos += input_ids.shape[1]
        return x if return_hidden else self.lm_head(x)

    def embed(self, input_ids, pixel_values=None, image_grid_thw=None, check: bool = True):
        """The vision merge: token embeddings with the vision tower's features scattered, in image
        order, into the <|image_pad|> slots. (`check=False` skips counting the slots of an
        image-free call: decode steps, no host sync.)"""
        x = self.model.embed_tokens(input_ids)
        slots = input_ids == self.cfg.image_token_id
        if pixel_values is None:
            if check and bool(slots.any()):
                raise ValueError("input_ids hold <|image_pad|> tokens but no pixel_values were given")
            return x
        n_slots = int(slots.sum())
        feats = self.visual(pixel_values, image_grid_thw)  # (N/4, D)
        if feats.shape[0] != n_slots:
            raise ValueError(f"{feats.shape[0]} image features for {n_slots} <|image_pad|> tokens")
        return x.masked_scatter(slots[..., None].expand_as(x), feats.to(x.dtype))

    def rope_and_mask(self, input_ids, attention_mask, image_grid_thw, cache, dtype):
        """M-RoPE cos, sin (B, T, d) in `dtype`, allowed (B, 1, T, Tk) and whether the plain causal
        mask is enough (is_causal). With a cache, the T tokens take its next slots: a prefill
        (the first call) sets rope_delta, a decode step continues at (cache index + rope_delta)."""
        cfg = self.cfg
        B, T = input_ids.shape
        all_valid = attention_mask is None  # known without looking at the mask (no host sync)
        mask = torch.ones(B, T, dtype=torch.bool, device=input_ids.device) if all_valid else attention_mask.bool()
        steps = torch.arange(T, device=input_ids.device)
        q_idx = steps if cache is None else cache.pos + steps  # absolute (cache) index of each query
        if cache is None or not cache.prefilled:
            position_ids, rope_delta = rope_index(input_ids, image_grid_thw, mask, cfg)
            if cache is not None:
                cache.rope_delta, cache.prefilled = rope_delta, True
        else:  # decoding: cache index + rope_delta on all three axes
            position_ids = (q_idx[None, :] + cache.rope_delta[:, None]).expand(3, B, T)
        cos, sin = mrope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta, cfg.mrope_section, dtype)

        # allowed[b, 0, i, j]: query i may see key j (causal by absolute index, key not padding).
        # The diagonal is always allowed, so a padding query row never has zero keys (no NaN).
        if cache is not None:
            cache.write_idx = q_idx
            cache.key_valid.index_copy_(1, q_idx, mask)
            key_valid, k_idx = cache.key_valid, cache.k_idx
        else:
            key_valid, k_idx = mask, q_idx
        allowed = (k_idx[None, :] <= q_idx[:, None])[None] & key_valid[:, None, :]
        allowed = (allowed | (k_idx[None, :] == q_idx[:, None])[None])[:, None]  # (B, 1, T, Tk)
        # Without a cache, a batch that is unpadded or right-padded needs only the causal mask for
        # its real tokens (padding keys come after them): SDPA can then use its flash kernels.
        is_causal = cache is None and (all_valid or bool((mask == (steps < mask.sum(-1, keepdim=True))).all()))
        return cos, sin, allowed, is_causal

    # ---------------------------------------------------------------------------- generation

    @torch.no_grad()
    def generate(self, prompts, pixel_values=None, image_grid_thw=None, *, max_new_tokens: int = 256,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 stop_ids=None, pad_id: int | None = None, vocab_limit: int | None = None,
                 banned_ids=None, num_samples: int = 1, attn_ctl_factory=None, compile: bool = False):
        """Decode a batch of prompts with a pre-allocated KV cache: `prefill` once, then `decode`.

        prompts: list of 1-D LongTensors (ragged; each may contain <|image_pad|> runs).
        pixel_values / image_grid_thw: all prompts' images concatenated in prompt order, as the
            image processor returns them. The vision tower runs once, in the prefill.
        temperature 0 is greedy; otherwise softmax(logits / temperature) restricted to the top-p
            nucleus, drawn from a torch.Generator seeded with `seed` (same seed, same samples).
        stop_ids: a row ends after emitting one of these (kept and counted); default <|im_end|> and
            <|endoftext|> (eos and bos of the config). pad_id (default <|endoftext|>): left padding
            and what follows each row's end.
        Never drawn: ids >= vocab_limit (Qwen pads its embedding matrix past the tokenizer) and
            banned_ids, by default the vision placeholders, which a reply cannot contain (fed back,
            an <|image_pad|> would claim an image slot).
        num_samples: continuations per prompt from one prefill (the cache is copied after it), rows
            prompt-major: row p * num_samples + i is sample i of prompt p.
        attn_ctl_factory(cache_len, ids (B, L), mask (B, L)) -> attn_ctl, for the intervention during
            generation: given the cache length and the left-padded prompts, it returns a controller
            whose key_scale covers all cache_len keys.
        compile: run the one-token decode step through torch.compile (worth it on a GPU).
        Returns (tokens (B * num_samples, max_new_tokens), pad_id after each row's end; lengths).
        """
        c, dev = self.cfg, self.lm_head.weight.device
        stop_ids = (c.eos_token_id, c.bos_token_id) if stop_ids is None else stop_ids
        pad_id = c.bos_token_id if pad_id is None else pad_id
        if banned_ids is None:
            banned_ids = (c.image_token_id, c.video_token_id, c.vision_start_token_id, c.vision_end_token_id)
        B, L = len(prompts), max(len(p) for p in prompts)
        ids = torch.full((B, L), pad_id, dtype=torch.long, device=dev)
        mask = torch.zeros(B, L, dtype=torch.bool, device=dev)
        for b, p in enumerate(prompts):  # left padding: every prompt ends at index L - 1
            ids[b, L - len(p):], mask[b, L - len(p):] = p.to(dev), True
        cache = KVCache(c, B, L + max_new_tokens, self.lm_head.weight.dtype, dev)
        ctl = attn_ctl_factory(cache.max_len, ids, mask) if attn_ctl_factory is not None else None
        if num_samples > 1 and ctl is not None:
            raise ValueError("num_samples > 1 with an attention controller: repeat the prompts instead")
        gen = None
        if temperature > 0:
            gen = torch.Generator(device=dev).manual_seed(seed if seed is not None else torch.seed())
        blocked = torch.zeros(c.vocab_size, dtype=torch.bool, device=dev)  # ids never drawn
        blocked[list(banned_ids)] = True
        if vocab_limit is not None:
            blocked[vocab_limit:] = True
        draw = partial(sample_next, temperature=temperature, top_p=top_p, gen=gen, blocked=blocked)

        logits = self.prefill(ids, mask, pixel_values, image_grid_thw, cache, ctl)
        if num_samples > 1:
            cache, logits = cache.repeat_interleave(num_samples), logits.repeat_interleave(num_samples, dim=0)
        return self.decode(logits, cache, draw, max_new_tokens, stop_ids, pad_id, ctl, compile)

    def prefill(self, ids, mask, pixel_values, image_grid_thw, cache: KVCache, attn_ctl=None):
        """The left-padded prompts (B, L) and their images into the empty `cache` -> next-token
        logits (B, V): the head runs on the last position only."""
        hidden = self(ids, mask, pixel_values, image_grid_thw, cache=cache, attn_ctl=attn_ctl, return_hidden=True)
        return self.lm_head(hidden[:, -1])

    def decode(self, logits, cache: KVCache, draw, max_new_tokens: int, stop_ids, pad_id: int,
               attn_ctl=None, compile: bool = False):
        """The decode loop: draw a token per row from logits (B, V), feed it through `decode_step`
        (compiled with `compile`, unless an attention controller runs Python in it), until every
        row has emitted a stop id or max_new_tokens are drawn. -> (tokens (B, max_new_tokens),
        pad_id after each row's end; lengths (B,))."""
        step = self._compiled_decode_step() if compile and attn_ctl is None else self.decode_step
        B, dev = logits.shape[0], logits.device
        stops = torch.tensor(list(stop_ids), dtype=torch.long, device=dev)
        # Asking "are all rows done?" waits for the device; on a GPU ask every 16 steps only.
        check_every = 1 if dev.type == "cpu" else 16
        out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=dev)
        lengths = torch.zeros(B, dtype=torch.long, device=dev)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        for i in range(max_new_tokens):
            out[:, i] = tok = torch.where(done, pad_id, draw(logits.float()))
            lengths += ~done
            done |= torch.isin(tok, stops)
            if i + 1 == max_new_tokens or ((i + 1) % check_every == 0 and bool(done.all())):
                break
            logits = step(tok[:, None], cache, attn_ctl)
        return out, lengths

    def decode_step(self, tok, cache: KVCache, attn_ctl=None):
        """One token per row (B, 1) through the cache -> next-token logits (B, V). No host sync and
        no changing Python state, so it compiles to one graph."""
        return self(tok, None, cache=cache, attn_ctl=attn_ctl)[:, -1]

    def _compiled_decode_step(self):
        if getattr(self, "_decode_compiled", None) is None:  # compiled once per model
            self._decode_compiled = torch.compile(self.decode_step, fullgraph=True, dynamic=False)
        return self._decode_compiled


def sample_next(logits, temperature: float, top_p: float, gen, blocked=None):
    """One token per row from logits (B, V) (float32): greedy at temperature 0, else top-p sampling.
    blocked (V,) bool: ids never drawn."""
    if blocked is not None:
        logits = logits.masked_fill(blocked, float("-inf"))
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # drop a token when the mass strictly before it already reaches top_p (keeps at least one)
        drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


def init_weights(model: Qwen2_5_VL, std: float = 0.02, seed: int = 0) -> Qwen2_5_VL:
    """Fresh weights for training from scratch: normal(0, std) matrices and embeddings, zero
    biases, unit norm weights (the initialisation of the reference). Runs where the weights are
    (build the model under `torch.device("cuda")` to initialise a large one on the GPU)."""
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.ndim == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=g)
    return model


# --------------------------------------------------------------------------------------------
# Loading and saving Hugging Face checkpoints
# --------------------------------------------------------------------------------------------


def from_pretrained(path: str, dtype=torch.bfloat16, device="cpu") -> Qwen2_5_VL:
    """Build the model from a Hugging Face folder (config.json + safetensors, single or sharded),
    or from a training run's folder (its `latest` checkpoint).

    The module tree is created on the meta device (no memory), then each tensor is read from disk,
    cast to `dtype` if it differs, moved to `device` and put in place: host memory peaks near one
    copy of the checkpoint. Missing, unexpected and mis-shaped names are an error that lists them.
    """
    path = check_model_folder(path)
    try:
        cfg = Config.from_json(os.path.join(path, "config.json"))
    except (ValueError, TypeError, KeyError) as e:  # not JSON, or not a Qwen2.5-VL config
        raise UserError(f"{path}/config.json: {e}") from None
    files = checkpoint_files(path)
    names = tensor_table(files)
    if "lm_head.weight" not in names:  # the rule of the reference: no lm_head in the files means tied
        cfg.tie_word_embeddings = True
    with torch.device("meta"):
        model = Qwen2_5_VL(cfg)
    expected = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight")
        names.pop("lm_head.weight", None)  # a tied file may still carry a copy; the embedding wins
    check_tensor_table(path, names, expected)
    modules = dict(model.named_modules())
    for fp in files:
        for name, t in iter_safetensors(fp):
            name = normalise_name(name)
            if name not in expected:
                continue
            mod_name, _, leaf = name.rpartition(".")
            t = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
            modules[mod_name]._parameters[leaf] = nn.Parameter(t, requires_grad=t.is_floating_point())
            del t
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def save_pretrained(model: Qwen2_5_VL, path: str, max_shard_bytes: int = 5 * 2**30, state_dict=None,
                    dtype=None):
    """Write config.json and safetensors in the hub layout (`visual.*`, `model.*`, `lm_head.weight`
    unless tied), sharded with an index above `max_shard_bytes`. Floating tensors are written in
    `dtype` (default: as they are) and config.json states it (`dtype`, and `torch_dtype` for
    transformers 4.x readers). Writes into a temporary folder first and renames it into place, so a
    crash never leaves a half-written checkpoint at `path`."""
    sd = state_dict if state_dict is not None else model.state_dict()
    if model.cfg.tie_word_embeddings:
        sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}
    if dtype is None:
        dtype = next((t.dtype for t in sd.values() if t.is_floating_point()), torch.float32)
    write_model_folder(path, model.cfg.to_dict(), sd, dtype, max_shard_bytes)


Qwen2_5_VL.from_pretrained = staticmethod(from_pretrained)
Qwen2_5_VL.save_pretrained = save_pretrained
