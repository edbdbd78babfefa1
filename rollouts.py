"""GRPO's rollouts: G sampled completions of every prompt, and the parameters gathered for them.

    generate_rollouts  G completions per prompt with model.generate (KV cache; each prompt prefilled
                       once and its cache copied G times; temperature, top-p; ids >= the tokenizer
                       size never drawn), decoded, with the lengths the sampler gave (never derived
                       from token values: in Qwen the pad token equals eos)
    rollout_seed       a sampling seed from (seed, step, rank): the same when a resumed run redoes a step
    generation_mode    under FSDP2 every unit unsharded once for the whole decode, so processes whose
                       samples stop at different lengths issue no per-token collectives

train_grpo.py packs a Rollout into the training layout (pack_sequences) for the rewards and the update.
"""

import contextlib
import hashlib
from dataclasses import dataclass

import torch



@dataclass
class Rollout:
    """N = prompts x G sampled sequences of one process; a prompt's samples are consecutive."""
    prompts: list  # N 1-D LongTensors (shared between a prompt's samples)
    roles: list  # N 1-D role tensors of the prompts
    pixel_values: list  # N tensors (n_i, 1176) or None
    image_grid_thw: list  # N tensors (k_i, 3) or None
    records: list  # N evaluate.py records (gold answers)
    completions: torch.Tensor  # (N, max_new_tokens) sampled ids, pad after each row's end
    lengths: torch.Tensor  # (N,) completion lengths, the stop token included
    group_ids: torch.Tensor  # (N,) one exact id per prompt
    texts: list  # N decoded completions (special tokens dropped)
    stopped: torch.Tensor  # (N,) bool: ended on a stop token (not cut at max_new_tokens)


def rollout_seed(seed, step, rank):
    """A 63-bit sampling seed from (seed, step, rank): distinct for every process and step, and
    the same when a resumed run redoes a step."""
    h = hashlib.sha256(f"grpo/{seed}/{step}/{rank}".encode()).digest()
    return int.from_bytes(h[:8], "little") & (2 ** 63 - 1)


def cat_images(pvs, grids, device):
    pv = [x for x in pvs if x is not None]
    gr = [g for g in grids if g is not None]
    if not pv:
        return None, None
    return torch.cat(pv).to(device), torch.cat(gr).to(device)


def _model_device(model):
    return next(model.parameters()).device


def generate_rollouts(model, tok, encs, group_ids, G, *, max_new_tokens, temperature, top_p, seed,
                      gen_batch=0):
    """Sample G completions of every encoded prompt in `encs` (dataset items); no grad.

    group_ids: one id per prompt (its G samples share it). gen_batch: sequences per generate call
    (0: all), rounded down to whole groups. Each prompt is prefilled once and its KV cache copied
    G times (generate's num_samples). Chunk c is sampled with seed + c. Vision placeholders are
    never sampled (generate bans them), so every completion can be fed back as text. Returns a
    Rollout (tensors on the CPU).
    """
    dev = _model_device(model)
    prompts, roles, pvs, grids, records, gids = [], [], [], [], [], []
    for enc, gid in zip(encs, group_ids):
        for _ in range(G):
            prompts.append(enc["input_ids"])
            roles.append(enc["roles"])
            pvs.append(enc["pixel_values"])
            grids.append(enc["image_grid_thw"])
            records.append(enc["record"])
            gids.append(int(gid))
    N = len(prompts)
    per_call = max(1, gen_batch // G) if gen_batch > 0 else len(encs)  # prompts per generate call
    toks, lens = [], []
    for c, s in enumerate(range(0, len(encs), per_call)):
        chunk = encs[s:s + per_call]
        pv, grid = cat_images([e["pixel_values"] for e in chunk], [e["image_grid_thw"] for e in chunk], dev)
        t, n = model.generate([e["input_ids"] for e in chunk], pv, grid, max_new_tokens=max_new_tokens,
                              temperature=temperature, top_p=top_p, seed=(seed + c) % 2 ** 63, num_samples=G,
                              stop_ids=tok.stop_ids, pad_id=tok.pad_id, vocab_limit=tok.vocab_size)
        toks.append(t.cpu())
        lens.append(n.cpu())
    completions, lengths = torch.cat(toks), torch.cat(lens)
    stops = torch.tensor(list(tok.stop_ids))
    last = completions.gather(1, (lengths - 1).clamp(min=0)[:, None]).squeeze(1)
    stopped = (lengths > 0) & torch.isin(last, stops)
    texts = [tok.decode_response(completions[i, :int(lengths[i])]) for i in range(N)]
    return Rollout(prompts, roles, pvs, grids, records, completions, lengths,
                   torch.tensor(gids, dtype=torch.long), texts, stopped)



@contextlib.contextmanager
def generation_mode(model, dctx):
    """Run model.generate on the full parameters.

    Without FSDP: nothing to do. With FSDP2 every unit is unsharded once here (one collective each,
    in the same order on every process) and kept unsharded through all forwards (reshard after
    forward off), so the decode steps issue no collectives: processes may stop decoding at
    different steps. training.run_vision_on_text_batches's patch (a collective trick for training
    forwards) is lifted meanwhile, so decode steps do not run the vision tower.
    """
    if not dctx.fsdp:
        yield
        return
    from torch.distributed.fsdp import FSDPModule
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    # the setting to restore: the root keeps its parameters after forward (FSDP's own default for
    # the root), the other units follow what they were given (read from the unit's param group)
    before = []
    for m in units:
        groups = m._get_fsdp_state()._fsdp_param_groups
        before.append(False if m is model else any(g.post_forward_mesh_info is not None for g in groups))
    patched = model.__dict__.pop("embed", None)
    for m in units:
        m.set_reshard_after_forward(False, recurse=False)
    for m in units:
        m.unshard()
    try:
        yield
    finally:
        for m, r in zip(units, before):
            m.set_reshard_after_forward(r, recurse=False)
            m.reshard()
        if patched is not None:
            model.embed = patched
