"""The conventions of the paper's release (lrlbbzl/Qwen-AVAR), which trains with LLaMA-Factory (SFT)
and EasyR1 (GRPO), read here so that its files work unchanged:

    sft_settings         LLaMA-Factory's SFT YAML (the release's avar_sft.yaml) as train_sft.py
                         settings, for train_sft.py --config
    dataset_records      the records of `dataset:` names through LLaMA-Factory's dataset_info.json
                         (train_sft.py --data DIR/dataset_info.json:NAME[,NAME...])
    read_format_prompt   EasyR1's `format_prompt` (a jinja file such as the release's math.jinja or
                         r1v.jinja), for train_grpo.py and evaluate.py --format-prompt

The YAML as LLaMA-Factory 0.9.3 (the version the release vendors) reads it. A key it does not
state takes LLaMA-Factory's or transformers' default, so that a file means here what it meant
there: no freeze_vision_tower freezes the vision tower, no learning_rate is 5e-5, no
use_avar_attn_guide is plain SFT, no lr_scheduler_type is transformers' linear decay (refused:
this trainer has only warmup + cosine). The per-device batch x gradient accumulation x processes
(WORLD_SIZE) is the global batch. `new_special_tokens` is the release's spelling (LLaMA-Factory up
to 0.9.2; 0.9.3 renamed it `add_special_tokens`: both are read). A key that changes what is trained
and that this trainer does not implement (LoRA, packing, a validation split, ...), or a value of it
other than the one this trainer matches, is refused with its line; a key that cannot change the
result here (DeepSpeed, flash-attention, caches, workers, logging) is listed once as ignored.

What stays different (none is a key): records longer than cutoff_len are dropped and counted
(LLaMA-Factory truncates them); the label mask ends at each reply's <|im_end|> (LLaMA-Factory's
qwen2_vl template also trains the "\n" after it); images are resized once, by smart_resize within
image_max_pixels (LLaMA-Factory first shrinks them with PIL to that area, then the processor
resizes again); the first warmup update runs at lr / w (transformers' at 0); the data order is
this trainer's own (its seed, length-grouped batches only with group_by_length: true).

EasyR1's format prompt (verl/utils/dataset.py, _build_messages): the file's text, stripped, is a
jinja2 template rendered with one variable, `content`, the record's prompt string (its `<image>`
placeholders included); the rendered text is then cut at each `<image>` into the user turn's
image and text parts. math.jinja, for one, renders "{{ content | trim }} You FIRST think about ...".
Here `content` is the question with its "A. text" option lines (data.build_prompt), and the
rendered text replaces this project's answer instruction.

pyyaml (--config) and jinja2 (--format-prompt) are imported only when asked for.
"""

from __future__ import annotations

import json
import os
import re

from data import IMAGE_PLACEHOLDER, ImageProcessor, UserError, read_records
from hub import check_model_folder


class FormatPrompt:
    """An EasyR1 format prompt: `fp(content)` is the user turn's text; `source` its template text."""

    def __init__(self, path: str, source: str, template):
        self.path, self.source, self.template = path, source, template

    def __call__(self, content: str) -> str:
        return self.template.render(content=content)


def read_format_prompt(path: str) -> FormatPrompt:
    """The jinja file at `path` as EasyR1 reads it (UTF-8, stripped, jinja2's default Template). A
    missing file, a syntax error (file:line) or a template that uses anything but `content` (EasyR1
    renders only that: the question would be lost, or a name left empty) is a UserError."""
    try:
        import jinja2
        import jinja2.meta
    except ImportError:
        raise UserError("--format-prompt needs jinja2 (pip install jinja2)") from None
    if not os.path.isfile(path):
        raise UserError(f"{path}: format prompt file does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read().strip()
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 ({e.reason})") from None
    env = jinja2.Environment()  # the settings of jinja2.Template(source), which EasyR1 calls
    try:
        names = jinja2.meta.find_undeclared_variables(env.parse(source))
    except jinja2.TemplateSyntaxError as e:
        raise UserError(f"{path}:{e.lineno}: jinja syntax error: {e.message}") from None
    if names != {"content"}:
        raise UserError(f"{path}: a format prompt renders {{{{ content }}}} (the question) and nothing else; "
                        f"this one uses {sorted(names) or 'no variable'}")
    return FormatPrompt(path, source, jinja2.Template(source))


# --------------------------------------------------------------------------------------------
# LLaMA-Factory's SFT YAML
# --------------------------------------------------------------------------------------------

# keys that cannot change what is trained here: accepted and listed once as ignored
IGNORED = {
    "trust_remote_code", "deepspeed", "flash_attn", "ddp_timeout", "ddp_backend", "ddp_find_unused_parameters",
    "overwrite_cache", "preprocessing_num_workers", "preprocessing_batch_size", "dataloader_num_workers",
    "dataloader_pin_memory", "dataloader_persistent_workers", "dataloader_prefetch_factor", "cache_dir",
    "logging_steps", "logging_dir", "logging_strategy", "logging_first_step", "plot_loss", "report_to", "run_name",
    "disable_tqdm", "include_num_input_tokens_seen", "include_tokens_per_second",
    "include_effective_tokens_per_second", "save_only_model", "save_safetensors", "push_to_hub", "hf_hub_token",
    "use_fast_tokenizer", "low_cpu_mem_usage", "use_swanlab", "swanlab_project", "swanlab_run_name",
    "swanlab_workspace", "swanlab_mode", "swanlab_api_key", "swanlab_logdir",
    "skip_special_tokens",  # a decoding setting of LLaMA-Factory's chat and predict: training does not decode
    "video_max_pixels", "video_min_pixels", "video_fps", "video_maxlen",  # videos are refused when read
    "resize_vocab",  # the embedding grows whenever added tokens need it, as LLaMA-Factory then sets it
    "data_seed",  # the data order is this trainer's own either way
    "per_device_eval_batch_size", "eval_steps",  # no evaluation runs (do_eval, val_size must be off)
}

# keys accepted at these values (what this trainer does), refused at any other
FIXED = {
    "stage": ("sft",), "do_train": (True,), "finetuning_type": ("full",), "template": ("qwen2_vl",),
    "optim": ("adamw_torch", "adamw_torch_fused"), "adam_epsilon": (1e-8,), "train_on_prompt": (False,),
    "mask_history": (False,), "packing": (None, False), "neat_packing": (False,), "streaming": (False,),
    "mix_strategy": ("concat",), "max_samples": (None,), "val_size": (0, 0.0), "eval_dataset": (None,),
    "do_eval": (False,), "do_predict": (False,), "eval_strategy": ("no",), "warmup_steps": (0,),
    "label_smoothing_factor": (0, 0.0), "freeze_language_model": (False,), "fp16": (False,), "pure_bf16": (False,),
    "adapter_name_or_path": (None,), "quantization_bit": (None,), "add_tokens": (None,), "default_system": (None,),
    "tokenized_path": (None,), "split_special_tokens": (False,), "save_strategy": ("steps", "no"),
    "lr_scheduler_type": ("cosine", "cosine_with_min_lr"), "disable_shuffling": (False,),
}

MAPPED = {  # key: (LLaMA-Factory's or transformers' default, its type, the train_sft setting it becomes)
    "model_name_or_path": (None, str, "model"), "image_max_pixels": (768 * 768, int, "max_pixels"),
    "image_min_pixels": (32 * 32, int, None), "cutoff_len": (2048, int, "max_len"),
    "learning_rate": (5e-5, float, "lr"), "num_train_epochs": (3.0, float, "epochs"), "max_steps": (-1, int, None),
    "warmup_ratio": (0.0, float, "warmup_ratio"), "per_device_train_batch_size": (8, int, "micro_batch"),
    "gradient_accumulation_steps": (1, int, None), "weight_decay": (0.0, float, "weight_decay"),
    "adam_beta1": (0.9, float, None), "adam_beta2": (0.999, float, None), "max_grad_norm": (1.0, float, "grad_clip"),
    "seed": (42, int, "seed"), "save_steps": (500, int, "save_every"), "save_total_limit": (None, int, None),
    "output_dir": (None, str, "out"), "freeze_vision_tower": (True, bool, None),
    "freeze_multi_modal_projector": (True, bool, None), "bf16": (False, bool, None),
    "use_avar_attn_guide": (False, bool, None), "avar_attn_alpha": (0.15, float, None),
    "avar_attn_beta": (0.15, float, None), "avar_attn_epsilon": (1e-6, float, "agto_eps"),
    "avar_attn_layers": (None, None, None), "new_special_tokens": (None, None, None),
    "add_special_tokens": (None, None, None), "resume_from_checkpoint": (None, None, None),
    "overwrite_output_dir": (False, bool, None), "dataset": (None, None, None), "dataset_dir": ("data", str, None),
    "media_dir": (None, str, None), "gradient_checkpointing": (False, bool, None),
    "disable_gradient_checkpointing": (False, bool, None), "lr_scheduler_kwargs": (None, dict, None),
    "group_by_length": (False, bool, None),
}


def _read_yaml(path: str):
    """The file's mapping and each top-level key's line."""
    try:
        import yaml
    except ImportError:
        raise UserError("--config needs pyyaml (pip install pyyaml)") from None
    if not os.path.isfile(path):
        raise UserError(f"{path}: config file does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        cfg = yaml.safe_load(text)
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 ({e.reason})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise UserError(f"{path}:{mark.line + 1 if mark else 1}: not YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path}: a LLaMA-Factory config is a mapping of keys to values")
    return cfg, {k.value: k.start_mark.line + 1 for k, _ in node.value}


def sft_settings(path: str, world_size: int | None = None) -> tuple[dict, list[str]]:
    """LLaMA-Factory's SFT YAML at `path` -> ({train_sft.py setting: value}, the keys ignored).
    world_size: the processes of the run (default: WORLD_SIZE, 1 without torchrun)."""
    cfg, lines = _read_yaml(path)

    def refuse(key, why):
        raise UserError(f"{path}:{lines.get(key, 1)}: {key}: {why}")

    for key, value in cfg.items():
        if key in FIXED and value not in FIXED[key]:
            shown = " or ".join(repr(v) for v in FIXED[key])
            refuse(key, f"{value!r} is not implemented here (this trainer does {shown})")
        elif key not in FIXED and key not in MAPPED and key not in IGNORED:
            refuse(key, "not implemented here (a setting of LLaMA-Factory this trainer does not have)")

    def get(key):
        """The file's value (else the default) as its type: "1e-5", which YAML reads as a string, is 1e-5."""
        default, typ, _ = MAPPED[key]
        value = cfg[key] if cfg.get(key) is not None else default
        if value is None or typ is None or (isinstance(value, typ) and not (typ is int and isinstance(value, bool))):
            return value
        try:
            if typ in (int, float) and not isinstance(value, bool) and float(value) == typ(float(value)):
                return typ(float(value))
        except (TypeError, ValueError):
            pass
        refuse(key, f"{value!r} is not {'an' if typ is int else 'a'} {typ.__name__}")

    out = {dest: get(key) for key, (_, _, dest) in MAPPED.items() if dest and get(key) is not None}
    if "model" not in out:
        refuse("model_name_or_path", "the model folder is needed")
    out["max_steps"] = max(0, int(get("max_steps")))
    world = world_size or int(os.environ.get("WORLD_SIZE", 1))
    out["batch_size"] = get("per_device_train_batch_size") * get("gradient_accumulation_steps") * world
    out["betas"] = (get("adam_beta1"), get("adam_beta2"))
    out["keep_last"] = get("save_total_limit") or 0
    if cfg.get("save_strategy") == "no":
        out["save_every"] = 0
    if "lr_scheduler_type" not in cfg:
        refuse("lr_scheduler_type", "absent: transformers' default, linear decay, is not implemented here "
                                    "(this trainer warms up linearly, then decays by cosine: set cosine)")
    kw = get("lr_scheduler_kwargs") or {}
    if cfg["lr_scheduler_type"] == "cosine_with_min_lr":
        if "min_lr_rate" not in kw and "min_lr" not in kw:
            refuse("lr_scheduler_kwargs", "cosine_with_min_lr needs min_lr_rate or min_lr")
        out["min_lr_ratio"] = kw.get("min_lr_rate", kw.get("min_lr", 0) / out["lr"])
    elif kw:
        refuse("lr_scheduler_kwargs", f"{kw!r} is not implemented for {cfg['lr_scheduler_type']}")
    vt, proj = bool(get("freeze_vision_tower")), bool(get("freeze_multi_modal_projector"))
    if vt != proj:
        refuse("freeze_vision_tower", f"{vt} with freeze_multi_modal_projector {proj}: this trainer freezes the "
                                      "vision tower with its merger, or neither (both true or both false)")
    out["freeze_vision"] = vt
    out["dtype"] = "bf16" if get("bf16") else "fp32"
    out["grad_ckpt"] = bool(get("gradient_checkpointing")) or not get("disable_gradient_checkpointing")
    out["no_group_by_length"] = not get("group_by_length")
    if get("use_avar_attn_guide"):
        out["agto_alpha"], out["agto_beta"] = get("avar_attn_alpha"), get("avar_attn_beta")
        if get("avar_attn_layers") is not None:
            out["agto_layers"] = str(get("avar_attn_layers")).replace(" ", "")
    else:
        out["agto_alpha"] = out["agto_beta"] = 0.0
    tokens = get("new_special_tokens") or get("add_special_tokens")
    if tokens is not None:
        out["new_special_tokens"] = ",".join(tokens) if isinstance(tokens, list) else str(tokens)
    resume = cfg.get("resume_from_checkpoint")
    if resume is None and not get("overwrite_output_dir"):
        resume = True  # LLaMA-Factory resumes from the newest checkpoint in output_dir, if there is one
    if resume:
        out["resume"] = "auto" if resume is True else str(resume)
    dataset = get("dataset")
    if get("media_dir") is not None and os.path.normpath(get("media_dir")) != os.path.normpath(get("dataset_dir")):
        refuse("media_dir", "image paths are read relative to dataset_dir here")
    out["data"] = (os.path.join(get("dataset_dir"), "dataset_info.json") + ":" + ",".join(
        n.strip() for n in (dataset if isinstance(dataset, list) else str(dataset).split(",")))) if dataset else None
    if "image_min_pixels" in cfg:  # LLaMA-Factory enlarges smaller images to it before the processor's own floor
        floor = ImageProcessor.from_pretrained(check_model_folder(out["model"])).min_pixels
        if get("image_min_pixels") > floor:
            out["min_pixels"] = get("image_min_pixels")
    return out, sorted(k for k in cfg if k in IGNORED)


# --------------------------------------------------------------------------------------------
# LLaMA-Factory's dataset_info.json
# --------------------------------------------------------------------------------------------

DATASET_SPEC = re.compile(r"(?P<info>.*dataset_info\.json):(?P<names>.+)")
ALPACA = dict(prompt="instruction", query="input", response="output", history=None, system=None, images=None,
              videos=None, audios=None)
SHAREGPT = dict(messages="conversations", system=None, images=None, videos=None, audios=None, role_tag="from",
                content_tag="value", user_tag="human", assistant_tag="gpt", observation_tag="observation",
                function_tag="function_call", system_tag="system")


def is_dataset_spec(data: str) -> bool:
    return DATASET_SPEC.fullmatch(data) is not None


def resolve_datasets(spec: str) -> list[tuple[str, list[str], dict]]:
    """`DIR/dataset_info.json:NAME[,NAME...]` -> [(name, its files, its attributes)], as LLaMA-Factory's
    get_dataset_list and _load_single_dataset read them: `file_name` (a file, or a folder: its
    files) in the file's folder, `formatting` alpaca or sharegpt, `columns` and `tags` over their
    defaults. Entries that download (hub, script, cloud) or are not SFT data are refused."""
    m = DATASET_SPEC.fullmatch(spec)
    info_path, names = m["info"], [n.strip() for n in m["names"].split(",")]
    if not os.path.isfile(info_path):
        raise UserError(f"{info_path}: no such file (the datasets' descriptions, in dataset_dir)")
    try:
        with open(info_path, encoding="utf-8") as f:
            info = json.load(f)
    except ValueError as e:
        raise UserError(f"{info_path}: not JSON ({e})") from None
    out = []
    for name in names:
        where = f"{info_path}: dataset {name!r}"
        entry = info.get(name)
        if not isinstance(entry, dict):
            raise UserError(f"{info_path}: no dataset {name!r} (it describes {', '.join(sorted(info)[:20])})")
        remote = [k for k in ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name") if k in entry]
        if remote:
            raise UserError(f"{where}: {remote[0]} (a download) is not read here: give it a local file_name")
        if "file_name" not in entry:
            raise UserError(f"{where}: no file_name")
        formatting = entry.get("formatting", "alpaca")
        if formatting not in ("alpaca", "sharegpt"):
            raise UserError(f"{where}: formatting {formatting!r} (alpaca or sharegpt)")
        for key, ok in (("ranking", (False, None)), ("num_samples", (None,)), ("split", ("train", None))):
            if entry.get(key) not in ok:
                raise UserError(f"{where}: {key} {entry[key]!r} is not implemented here")
        attr = dict(ALPACA if formatting == "alpaca" else SHAREGPT, formatting=formatting)
        for group in ("columns", "tags"):
            for key, value in (entry.get(group) or {}).items():
                if key in ("tools", "chosen", "rejected", "kto_tag"):
                    raise UserError(f"{where}: {group}.{key}: tool use and preference data are not SFT records here")
                if key not in attr:
                    raise UserError(f"{where}: {group}.{key} is not a {formatting} {group[:-1]}")
                attr[key] = value
        path = os.path.join(os.path.dirname(info_path), entry["file_name"])
        files = sorted(os.path.join(path, f) for f in os.listdir(path)) if os.path.isdir(path) else [path]
        for f in files:
            if not os.path.isfile(f):
                raise UserError(f"{where}: {f} not found")
            if not f.endswith((".json", ".jsonl")):
                raise UserError(f"{where}: {f}: only .json and .jsonl files are read here")
        out.append((name, files, attr))
    return out


def dataset_records(spec: str):
    """The (where, record, error) of every file of every dataset of `spec` (resolve_datasets), each
    record turned into the chat form data.normalize_record reads, as LLaMA-Factory's converters do.
    Image paths are looked up in dataset_dir first, else taken as given (from the working folder)."""
    datasets = resolve_datasets(spec)  # every entry checked before the first record
    media_dir = os.path.dirname(DATASET_SPEC.fullmatch(spec)["info"])
    for _, files, attr in datasets:
        for f in files:
            for where, obj, error in read_records(f):
                if error is None:
                    try:
                        obj = convert_record(obj, attr, media_dir)
                    except (ValueError, TypeError, KeyError) as e:
                        obj, error = None, ValueError(str(e))
                yield where, obj, error


def convert_record(obj, attr: dict, media_dir: str) -> dict:
    """One LLaMA-Factory record -> {"messages", "images", "system"?} (data.normalize_record's chat form).
    Alpaca: `history` pairs, then "prompt\\nquery" and `response`; ShareGPT: the messages under
    role_tag/content_tag, a first message with system_tag as the system prompt, user and assistant
    turns alternating and ending on the assistant. A record LLaMA-Factory would drop or fail on is
    a ValueError here (listed, or counted under --skip-bad)."""
    if not isinstance(obj, dict):
        raise ValueError(f"a record must be a JSON object, not {type(obj).__name__}")
    col = lambda key: obj.get(attr[key]) if attr.get(key) else None  # noqa: E731
    system = col("system") or ""
    if attr["formatting"] == "alpaca":
        messages = []
        for pair in col("history") or []:
            if not (isinstance(pair, list) and len(pair) == 2):
                raise ValueError(f"`{attr['history']}` holds [prompt, response] pairs")
            messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
        messages.append({"role": "user", "content": "\n".join(x for x in (col("prompt"), col("query")) if x)})
        if not isinstance(col("response"), str):
            raise ValueError(f"no response: `{attr['response']}` is not a string")
        messages.append({"role": "assistant", "content": col("response")})
    else:
        raw = col("messages")
        if not isinstance(raw, list) or not all(isinstance(m, dict) for m in raw):
            raise ValueError(f"`{attr['messages']}` must be a list of messages")
        if raw and attr["system_tag"] and raw[0].get(attr["role_tag"]) == attr["system_tag"]:
            system, raw = raw[0].get(attr["content_tag"]) or "", raw[1:]
        messages = []
        for i, m in enumerate(raw):
            role = m.get(attr["role_tag"])
            if role in (attr["observation_tag"], attr["function_tag"]):
                raise ValueError(f"message {i}: role {role!r}: tool use is not implemented here")
            want = attr["user_tag"] if i % 2 == 0 else attr["assistant_tag"]
            if role != want:
                raise ValueError(f"message {i}: role {role!r} where {want!r} is due (turns alternate from "
                                 f"{attr['user_tag']!r}); LLaMA-Factory drops such records")
            messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": m.get(attr["content_tag"])})
        if not messages or len(messages) % 2:
            raise ValueError(f"{len(messages)} turns: a record ends on an assistant turn; LLaMA-Factory drops it")
    out = {"messages": messages}
    if system:
        out["system"] = system
    for key in ("videos", "audios"):
        if col(key):
            out[key] = col(key)  # refused by normalize_record, by name
    images = col("images")
    images = [] if images is None else images if isinstance(images, list) else [images]
    out["images"] = [_media_path(p, media_dir) for p in images]
    n_slots = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages if isinstance(m["content"], str))
    if images and n_slots == 0:
        raise ValueError(f"{len(images)} images but no {IMAGE_PLACEHOLDER} placeholder (LLaMA-Factory needs one "
                         "per image)")
    return out


def _media_path(p, media_dir: str):
    """LLaMA-Factory's _find_medias: a path inside media_dir if there is such a file, else as given
    (relative to the working folder); made absolute, so the reader takes it as it is."""
    if not isinstance(p, str) or p.startswith(("data:", "file://", "http://", "https://")):
        return p
    return os.path.abspath(os.path.join(media_dir, p) if os.path.isfile(os.path.join(media_dir, p)) else p)
