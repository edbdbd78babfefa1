"""Hugging Face model folders on disk, without the model: what a checkpoint is made of.

A model folder, as the hub has it and transformers writes it:

    config.json                         the architecture, and the weights' dtype (`config_dtype`)
    model.safetensors                   the weights, or, above a shard size, several files
    model-0000i-of-0000n.safetensors      listed by model.safetensors.index.json (`checkpoint_files`)
    tokenizer.json, chat_template.jinja, generation_config.json, preprocessor_config.json, ...
                                        carried along unchanged (`HUB_FILES`, `read_hub_files`,
                                          `write_hub_files`)

A .safetensors file is an 8-byte little-endian header length n, n bytes of JSON
{name: {dtype, shape, data_offsets: [start, end]}} (plus an optional "__metadata__"), then the raw
tensor bytes, `start` and `end` counted from the end of the header. `read_safetensors_header`
reads the table, `iter_safetensors` one tensor at a time, `write_safetensors` writes a state dict
in shards, `write_model_folder` a whole folder. Newer transformers name the weights `model.visual.*` / `model.language_model.*`;
`normalise_name` maps them to the hub layout `visual.*` / `model.*`.

A training run's folder (train_sft.py's or train_grpo.py's --out) holds step_N checkpoints, each a
model folder, and a file `latest` naming the newest: `resolve_checkpoint` turns either kind of
folder into a model folder, `check_model_folder` also checks that it is one. `replace_dir` puts a
completely written folder in place of an old one. `model_identity` names the weights a result came
from: the folder and a sha256 fingerprint of its config.json and weight files.

model.py builds the model from what this module reads (`from_pretrained`) and writes its state
through it (`save_pretrained`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import torch
from safetensors.torch import save_file

from data import UserError

# the dtype names of the safetensors format, and those config.json states
_ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# hub files carried from the source folder into every checkpoint, where it has them
HUB_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
             "added_tokens.json", "chat_template.json", "chat_template.jinja", "generation_config.json",
             "preprocessor_config.json")


# --------------------------------------------------------------------------------------------
# Model folders and training runs
# --------------------------------------------------------------------------------------------


def resolve_checkpoint(path: str) -> str:
    """A model folder, or a training run's folder whose `latest` file names its newest checkpoint."""
    latest = os.path.join(path, "latest")
    if not os.path.exists(os.path.join(path, "config.json")) and os.path.isfile(latest):
        with open(latest) as f:
            return os.path.join(path, f.read().strip())
    return path


def check_model_folder(path: str) -> str:
    """resolve_checkpoint(path), which must be a model folder (config.json); a UserError otherwise."""
    d = resolve_checkpoint(path)
    if not os.path.isdir(d):
        raise UserError(f"{path}: no such model folder")
    if not os.path.exists(os.path.join(d, "config.json")):
        raise UserError(f"{d}: not a model folder (no config.json) nor a training run's folder (no `latest`)")
    return d


def config_dtype(path: str) -> torch.dtype:
    """The weights' dtype a hub folder states in config.json: `dtype` (transformers 5) or
    `torch_dtype` (4.x), top level first, then `text_config`; float32 when it states none (as
    transformers reads such a folder)."""
    with open(os.path.join(path, "config.json")) as f:
        d = json.load(f)
    for c in (d, d.get("text_config") or {}):
        for key in ("dtype", "torch_dtype"):
            if c.get(key) is not None:
                name = str(c[key]).removeprefix("torch.")
                if name not in DTYPES:
                    raise UserError(f"{path}/config.json: {key} {c[key]!r} is none of {sorted(DTYPES)}")
                return DTYPES[name]
    return torch.float32


def checkpoint_files(path: str):
    """The safetensors files of a model folder: the shards its index lists, or model.safetensors."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return [os.path.join(path, s) for s in sorted(set(weight_map.values()))]
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(single):
        return [single]
    raise UserError(f"{path}: neither model.safetensors nor model.safetensors.index.json")


def read_hub_files(src: str) -> dict:
    """{name: bytes} of the HUB_FILES the folder has: read once when a run starts, so that its
    checkpoints carry them even after the folder is gone (a resumed run's own older checkpoint,
    removed by --keep-last)."""
    files = {}
    for name in HUB_FILES:
        if os.path.exists(os.path.join(src, name)):
            with open(os.path.join(src, name), "rb") as f:
                files[name] = f.read()
    return files


def write_hub_files(files: dict, dst: str, image_processor=None, tokenizer=None):
    """The hub files read by read_hub_files, into folder `dst`; the special tokens the run added to
    `tokenizer` (data.Tokenizer) written in (write_special_tokens); the preprocessor's pixel bounds
    set to those of this run (for evaluation and RL to match)."""
    for name, content in files.items():
        with open(os.path.join(dst, name), "wb") as f:
            f.write(content)
    if tokenizer is not None and tokenizer.added_special:
        write_special_tokens(dst, tokenizer)
    if image_processor is None:
        return
    pre = os.path.join(dst, "preprocessor_config.json")
    if not os.path.exists(pre):
        image_processor.save(dst)
        return
    with open(pre) as f:
        c = json.load(f)
    c["size"] = dict(c.get("size") or {}, shortest_edge=image_processor.min_pixels,
                     longest_edge=image_processor.max_pixels)
    for key in ("min_pixels", "max_pixels"):  # older files state the bounds twice
        if key in c:
            c[key] = getattr(image_processor, key)
    with open(pre, "w") as f:
        json.dump(c, f, indent=2)


def _read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def write_special_tokens(folder: str, tok):
    """The special tokens added to `tok` (data.Tokenizer.add_special_tokens) in a model folder's
    tokenizer files, as transformers' add_special_tokens + save_pretrained leave them: tokenizer.json
    is `tok`'s own (its added_tokens list them, special, at their ids); tokenizer_config.json lists
    them among the extra special tokens (transformers 5's `extra_special_tokens`, or 4.x's
    `additional_special_tokens` where the file uses that name) and, where it has one, in its
    `added_tokens_decoder`; special_tokens_map.json and added_tokens.json, where present, likewise."""
    tok.tok.save(os.path.join(folder, "tokenizer.json"))
    tags = tok.added_special
    ids = {t: tok.tok.token_to_id(t) for t in tags}

    def extend(lst):
        have = {x["content"] if isinstance(x, dict) else x for x in lst}
        return lst + [t for t in tags if t not in have]

    path = os.path.join(folder, "tokenizer_config.json")
    if os.path.exists(path):
        c = _read_json(path)
        extra = c.get("extra_special_tokens")
        if isinstance(extra, list) or (extra is None and "additional_special_tokens" not in c):
            c["extra_special_tokens"] = extend(extra or [])
        else:  # 4.x's name (its extra_special_tokens, if any, is a dict of named tokens)
            c["additional_special_tokens"] = extend(c.get("additional_special_tokens") or [])
        if isinstance(c.get("added_tokens_decoder"), dict):
            for t, i in ids.items():
                c["added_tokens_decoder"][str(i)] = dict(content=t, lstrip=False, normalized=False, rstrip=False,
                                                         single_word=False, special=True)
        _write_json(path, c)
    path = os.path.join(folder, "special_tokens_map.json")
    if os.path.exists(path):
        m = _read_json(path)
        m["additional_special_tokens"] = extend(m.get("additional_special_tokens") or [])
        _write_json(path, m)
    path = os.path.join(folder, "added_tokens.json")
    if os.path.exists(path):
        _write_json(path, dict(_read_json(path), **ids))


def replace_dir(src: str, dst: str):
    """Move folder `src` to `dst`, replacing an old `dst` only after `src` is complete."""
    if os.path.exists(dst):
        old = dst.rstrip("/") + ".old"
        if os.path.exists(old):
            shutil.rmtree(old)
        os.rename(dst, old)
        os.rename(src, dst)
        shutil.rmtree(old)
    else:
        os.rename(src, dst)


# --------------------------------------------------------------------------------------------
# The identity of a model folder's weights
# --------------------------------------------------------------------------------------------


def file_sha256(path: str, block: int = 8 << 20) -> str:
    """sha256 of a whole file, read in 8 MiB blocks (what `sha256sum` prints, and what the hub
    lists for a file it stores with LFS)."""
    h, buf = hashlib.sha256(), bytearray(block)
    view = memoryview(buf)
    with open(path, "rb") as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def fingerprint_files(path: str) -> list[str]:
    """The files that make a model folder's weights, in name order: config.json, the index if
    there is one, and the safetensors files (`checkpoint_files`)."""
    names = ["config.json", *[os.path.basename(f) for f in checkpoint_files(path)]]
    if os.path.exists(os.path.join(path, "model.safetensors.index.json")):
        names.append("model.safetensors.index.json")
    return sorted(names)


def model_identity(path: str) -> dict:
    """{"folder": absolute path, "sha256": the fingerprint, "files": {name: sha256}} of a model
    folder (or a run folder's `latest`). The fingerprint is the sha256 of the `sha256sum` listing
    of `fingerprint_files`, so every byte of every weight file is in it:

        cd FOLDER && sha256sum config.json model*.safetensors* | sha256sum   # (LC_ALL=C order)

    Each file is read once in full, the files in parallel threads (hashlib releases the GIL): on
    one core about as long as reading the weights to load them (`bench/bench_fingerprint.py`)."""
    folder = os.path.abspath(check_model_folder(path))
    names = fingerprint_files(folder)
    with ThreadPoolExecutor(max_workers=min(len(names), os.cpu_count() or 1)) as pool:
        digests = list(pool.map(file_sha256, [os.path.join(folder, n) for n in names]))
    listing = "".join(f"{d}  {n}\n" for n, d in zip(names, digests))
    return {"folder": folder, "sha256": hashlib.sha256(listing.encode()).hexdigest(),
            "files": dict(zip(names, digests))}


# --------------------------------------------------------------------------------------------
# safetensors files
# --------------------------------------------------------------------------------------------


def normalise_name(name: str) -> str:
    """Newer files name `model.visual.*` / `model.language_model.*`; the hub layout is `visual.*` / `model.*`."""
    if name.startswith("model.visual."):
        return name[len("model."):]
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    return name


def read_safetensors_header(path: str):
    """The tensor table of a .safetensors file and where its data starts; a file that is not one,
    or ends before its last tensor (an interrupted download or copy), is a UserError."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        try:
            if n > size - 8:
                raise ValueError(f"header of {n} bytes in a file of {size}")
            header = json.loads(f.read(n))
        except ValueError as e:
            raise UserError(f"{path}: not a safetensors file ({e})") from None
    header.pop("__metadata__", None)
    end = max((meta["data_offsets"][1] for meta in header.values()), default=0)
    if 8 + n + end > size:
        raise UserError(f"{path}: truncated: {size} bytes, its tensors need {8 + n + end}"
                        " (an interrupted download or copy?)")
    return header, 8 + n


def tensor_table(files) -> dict:
    """{hub-layout name: {dtype, shape, data_offsets}} over the safetensors files of one checkpoint."""
    table = {}
    for fp in files:
        table.update({normalise_name(n): meta for n, meta in read_safetensors_header(fp)[0].items()})
    return table


def check_tensor_table(path: str, table: dict, expected: dict):
    """A UserError listing the missing, unexpected and mis-shaped names of checkpoint `path`'s
    tensor table against the shapes {name: shape} a model expects."""
    missing = sorted(set(expected) - set(table))
    unexpected = sorted(set(table) - set(expected))
    mismatched = sorted(f"{n}: file {tuple(table[n]['shape'])} vs model {expected[n]}"
                        for n in set(table) & set(expected) if tuple(table[n]["shape"]) != expected[n])
    if missing or unexpected or mismatched:
        raise UserError(f"{path}: checkpoint does not match config.json\n  missing: {missing}\n"
                        f"  unexpected: {unexpected}\n  shape mismatch: {mismatched}")


def iter_safetensors(path: str):
    """Yield (name, tensor) from one .safetensors file, reading each tensor straight into its own
    buffer with plain file reads: no memory map, no float32 detour, one tensor in flight at a time."""
    header, base = read_safetensors_header(path)
    with open(path, "rb") as f:
        for name, meta in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            start, end = meta["data_offsets"]
            dtype = _ST_DTYPES.get(meta["dtype"])
            if dtype is None:
                raise ValueError(f"{path}: tensor {name} has unsupported dtype {meta['dtype']}")
            t = torch.empty(meta["shape"], dtype=dtype)
            buf = t.view(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
            if buf.numel() != end - start:
                raise ValueError(f"{path}: tensor {name} has {end - start} bytes, expected {buf.numel()}")
            f.seek(base + start)
            if end > start and f.readinto(memoryview(buf.numpy())) != end - start:
                raise ValueError(f"{path}: file ends inside tensor {name}")
            yield name, t


def write_safetensors(folder: str, tensors: dict, dtype: torch.dtype, max_shard_bytes: int):
    """Write `tensors` {name: tensor} into `folder` as the hub does: model.safetensors, or, above
    `max_shard_bytes`, shards model-0000i-of-0000n.safetensors (names in sorted order) and
    model.safetensors.index.json. Floating tensors are written in `dtype`."""
    shards, cur, size = [], {}, 0
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        if t.is_floating_point():
            t = t.to(dtype)
        nbytes = t.numel() * t.element_size()
        if cur and size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[name] = t
        size += nbytes
    shards.append(cur)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(folder, fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in shard})
        total += sum(t.numel() * t.element_size() for t in shard.values())
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def write_model_folder(path: str, config: dict, tensors: dict, dtype: torch.dtype, max_shard_bytes: int):
    """config.json (stating `dtype`, and `torch_dtype` for transformers 4.x readers) and the
    weights (`write_safetensors`), written into PATH.tmp and renamed into place (`replace_dir`):
    a crash never leaves a half-written folder at `path`."""
    tmp = path.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # left by a crashed earlier save
    os.makedirs(tmp)
    config = dict(config)
    config["dtype"] = config["torch_dtype"] = {v: k for k, v in DTYPES.items()}[dtype]
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    write_safetensors(tmp, tensors, dtype, max_shard_bytes)
    replace_dir(tmp, path)
