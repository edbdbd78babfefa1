"""Data for Qwen2.5-VL: tokenizer and chat format, image processor, token roles, datasets.

Every token of a conversation gets exactly one role while the sequence is assembled (never
recovered from decoded text); the formulas of vas.py select tokens by these roles:

    SYSTEM   (S) the whole system turn `<|im_start|>system ... <|im_end|>\\n`
    IMAGE    (V) the `<|image_pad|>` slots that receive the vision features
    USER     (U) every other prompt token: user turns with their markers, <|vision_start|>,
                 <|vision_end|>, the `<|im_start|>assistant\\n` header, the `\\n` after a reply
    RESPONSE (R) the assistant's content and the `<|im_end|>` closing it (what SFT trains on)

The image processor reproduces transformers' Qwen2VLImageProcessor (PIL path) exactly:
`ImageProcessor(min_pixels, max_pixels)(images) -> (pixel_values (N, 1176), image_grid_thw (n, 3))`.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import torch
from PIL import Image

SYSTEM, IMAGE, USER, RESPONSE = 0, 1, 2, 3
PAD_ROLE = -1  # padding positions in a batch
ROLE_NAMES = {SYSTEM: "system", IMAGE: "image", USER: "user", RESPONSE: "response"}
IGNORE = -100  # label of tokens that are not trained on

DEFAULT_SYSTEM = "You are a helpful assistant."
QWEN_SPECIAL_TOKENS = [  # ids 151643.. in Qwen2 / Qwen2.5-VL; the toy tokenizer keeps their order
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


class Tokenizer:
    """Qwen's byte-level BPE from `tokenizer.json` (the `tokenizers` library); no BOS is added."""

    NEEDED = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>")

    def __init__(self, path: str):
        from tokenizers import Tokenizer as HFTokenizer

        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.exists(file):
            raise FileNotFoundError(f"{file}: no tokenizer.json")
        self.tok = HFTokenizer.from_file(file)
        self.path = file
        ids = {}
        for name in self.NEEDED:
            i = self.tok.token_to_id(name)
            if i is None:
                raise ValueError(f"{file}: the tokenizer lacks the special token {name}")
            ids[name] = i
        self.endoftext_id = ids["<|endoftext|>"]
        self.im_start_id = ids["<|im_start|>"]
        self.im_end_id = ids["<|im_end|>"]
        self.vision_start_id = ids["<|vision_start|>"]
        self.vision_end_id = ids["<|vision_end|>"]
        self.image_pad_id = ids["<|image_pad|>"]
        self.pad_id = self.endoftext_id
        self.stop_ids = (self.im_end_id, self.endoftext_id)
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str):
        enc = self.tok.encode(text, add_special_tokens=False)
        return enc.ids, [o[0] for o in enc.offsets]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)


def make_byte_tokenizer(out_dir: str) -> str:
    """Write a byte-level tokenizer (256 byte tokens, no merges, then Qwen's special tokens in
    Qwen's order) in the `tokenizer.json` form, for tiny models trained from scratch: every
    character's bytes are tokens, so any text round-trips. Returns the file path."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()  # the 256 printable stand-ins for raw bytes
    byte_chars = _bytes_to_unicode()
    vocab = {byte_chars[b]: b for b in range(256)}
    assert set(vocab) == set(alphabet)
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    from tokenizers import AddedToken
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in QWEN_SPECIAL_TOKENS])
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "tokenizer.json")
    tok.save(path)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:  # lets transformers load it too
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>",
                   "pad_token": "<|endoftext|>", "model_max_length": 32768}, f, indent=2)
    return path


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


# --------------------------------------------------------------------------------------------
# Chat format with token roles
# --------------------------------------------------------------------------------------------


def _is_image_part(part: dict) -> bool:
    return part.get("type") == "image" or "image" in part or "image_url" in part


def encode_chat(tok: Tokenizer, messages: list[dict], image_tokens: list[int] | None = None,
                add_generation_prompt: bool = False, system: str | None = DEFAULT_SYSTEM) -> dict:
    """Render Qwen2.5-VL's chat template directly into ids, labels and roles.

    messages: [{"role": "system"|"user"|"assistant", "content": str | [{"type": "text", "text": ...},
              {"type": "image"}, ...]}]. A default system turn is inserted (as the template does)
              when the first message is not a system message and `system` is not None.
    image_tokens: number of <|image_pad|> slots for each image in order (t*h*w/4 of its grid).
    Returns LongTensors input_ids (T,), labels (T,) (assistant content + <|im_end|>, else -100)
    and roles (T,). Equal to `apply_chat_template` + the Qwen tokenizer on the same messages.

    Text between two special tokens is tokenized as one string (as the reference tokenizes the
    whole rendered prompt), so BPE merges across e.g. "assistant\\n" + reply are kept; each token
    then takes the role of the piece its first character came from.
    """
    pieces: list[tuple[str | int, int, bool]] = []  # (text or special id, role, trained)
    image_tokens = list(image_tokens or [])
    n_img = 0

    def turn(role_name: str, content, role: int):
        nonlocal n_img
        trained = role == RESPONSE
        head_role = SYSTEM if role == SYSTEM else USER
        pieces.append((tok.im_start_id, head_role, False))
        pieces.append((role_name + "\n", head_role, False))
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        for part in parts:
            if _is_image_part(part):
                if n_img >= len(image_tokens):
                    raise ValueError(f"messages hold more images than the {len(image_tokens)} given")
                pieces.append((tok.vision_start_id, USER, False))
                pieces.extend([(tok.image_pad_id, IMAGE, False)] * image_tokens[n_img])
                pieces.append((tok.vision_end_id, USER, False))
                n_img += 1
            elif "text" in part:
                pieces.append((part["text"], role, trained))
            else:
                raise ValueError(f"unknown content part {part!r}")
        pieces.append((tok.im_end_id, role, trained))
        pieces.append(("\n", SYSTEM if role == SYSTEM else USER, False))

    if messages and messages[0]["role"] != "system" and system is not None:
        turn("system", system, SYSTEM)
    for i, m in enumerate(messages):
        r = m["role"]
        if r == "system" and i != 0:
            raise ValueError("a system message is only allowed first")
        turn(r, m["content"], {"system": SYSTEM, "user": USER, "assistant": RESPONSE}[r])
    if add_generation_prompt:
        pieces.append((tok.im_start_id, USER, False))
        pieces.append(("assistant\n", USER, False))
    if n_img != len(image_tokens):
        raise ValueError(f"{len(image_tokens)} images given but the messages hold {n_img}")

    ids, roles, trained = [], [], []
    i = 0
    while i < len(pieces):
        if isinstance(pieces[i][0], int):
            ids.append(pieces[i][0]); roles.append(pieces[i][1]); trained.append(pieces[i][2])
            i += 1
            continue
        j, text, starts = i, "", []  # a run of text pieces between special tokens
        while j < len(pieces) and isinstance(pieces[j][0], str):
            starts.append(len(text))
            text += pieces[j][0]
            j += 1
        span_ids, offsets = tok.encode_with_offsets(text)
        for tid, off in zip(span_ids, offsets):
            k = max(n for n in range(len(starts)) if starts[n] <= off)
            while k > 0 and starts[k] == starts[k - 1]:  # skip empty pieces
                k -= 1
            ids.append(tid); roles.append(pieces[i + k][1]); trained.append(pieces[i + k][2])
        i = j
    input_ids = torch.tensor(ids, dtype=torch.long)
    labels = torch.where(torch.tensor(trained, dtype=torch.bool), input_ids, torch.full_like(input_ids, IGNORE))
    return {"input_ids": input_ids, "labels": labels, "roles": torch.tensor(roles, dtype=torch.long)}


# --------------------------------------------------------------------------------------------
# Image processor (transformers' Qwen2VLImageProcessor, PIL path)
# --------------------------------------------------------------------------------------------

IMAGE_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
IMAGE_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def smart_resize(h: int, w: int, factor: int = 28, min_pixels: int = 3136, max_pixels: int = 12845056,
                 name: str = "image") -> tuple[int, int]:
    """Nearest size with both sides multiples of `factor` and area within [min_pixels, max_pixels]."""
    if min(h, w) <= 0:
        raise ValueError(f"{name}: empty image ({w}x{h})")
    if max(h, w) / min(h, w) > 200:
        raise ValueError(f"{name}: aspect ratio {max(h, w) / min(h, w):.1f} is over 200 ({w}x{h})")
    hb, wb = round(h / factor) * factor, round(w / factor) * factor  # Python round: halves to even
    if hb * wb > max_pixels:
        beta = math.sqrt(h * w / max_pixels)
        hb = max(factor, math.floor(h / beta / factor) * factor)
        wb = max(factor, math.floor(w / beta / factor) * factor)
    elif hb * wb < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        hb = math.ceil(h * beta / factor) * factor
        wb = math.ceil(w * beta / factor) * factor
    return hb, wb


def load_image(path: str) -> Image.Image:
    """Open and fully decode an image file; unreadable, empty or truncated files raise naming it."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: image file does not exist")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path}: image file is empty")
    try:
        with Image.open(path) as im:
            im.load()  # decodes now: a truncated file fails here, not later in a batch
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{path}: cannot decode image ({e})") from e


class ImageProcessor:
    def __init__(self, min_pixels: int = 3136, max_pixels: int = 12845056, patch_size: int = 14,
                 temporal_patch_size: int = 2, merge_size: int = 2):
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.patch, self.tpatch, self.merge = patch_size, temporal_patch_size, merge_size

    @classmethod
    def from_pretrained(cls, path: str, **overrides) -> "ImageProcessor":
        """Read `preprocessor_config.json` if the folder has one (hub defaults otherwise)."""
        kw = {}
        file = os.path.join(path, "preprocessor_config.json")
        if os.path.exists(file):
            with open(file) as f:
                c = json.load(f)
            size = c.get("size") or {}
            kw["min_pixels"] = c.get("min_pixels", size.get("shortest_edge", 3136))
            kw["max_pixels"] = c.get("max_pixels", size.get("longest_edge", 12845056))
            kw["patch_size"] = c.get("patch_size", 14)
            kw["temporal_patch_size"] = c.get("temporal_patch_size", 2)
            kw["merge_size"] = c.get("merge_size", 2)
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kw)

    def save(self, path: str):
        with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
            json.dump({"image_processor_type": "Qwen2VLImageProcessor", "min_pixels": self.min_pixels,
                       "max_pixels": self.max_pixels, "patch_size": self.patch,
                       "temporal_patch_size": self.tpatch, "merge_size": self.merge,
                       "size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels},
                       "image_mean": IMAGE_MEAN.tolist(), "image_std": IMAGE_STD.tolist(),
                       "do_resize": True, "do_rescale": True, "do_normalize": True,
                       "do_convert_rgb": True}, f, indent=2)

    def grid(self, image: Image.Image, name: str = "image") -> tuple[int, int, int]:
        """(t, h, w) in patches for an image, without processing its pixels."""
        hb, wb = smart_resize(image.height, image.width, self.patch * self.merge, self.min_pixels,
                              self.max_pixels, name)
        return 1, hb // self.patch, wb // self.patch

    def num_tokens(self, image: Image.Image, name: str = "image") -> int:
        t, h, w = self.grid(image, name)
        return t * h * w // self.merge ** 2

    def process_one(self, image: Image.Image, name: str = "image"):
        image = image.convert("RGB")
        _, gh, gw = self.grid(image, name)
        hb, wb = gh * self.patch, gw * self.patch
        arr = np.asarray(image.resize((wb, hb), resample=Image.BICUBIC))  # uint8 (H, W, 3)
        arr = (arr.astype(np.float64) * (1 / 255)).astype(np.float32)
        arr = (arr - IMAGE_MEAN) / IMAGE_STD
        x = np.repeat(arr.transpose(2, 0, 1)[None], self.tpatch, axis=0)  # (2, 3, H, W): one frame twice
        m, p = self.merge, self.patch
        x = x.reshape(1, self.tpatch, 3, gh // m, m, p, gw // m, m, p)
        x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # patches in 2x2 merge-block order
        return x.reshape(gh * gw, 3 * self.tpatch * p * p), (1, gh, gw)

    def __call__(self, images, names=None):
        """images: PIL images or file paths -> (pixel_values (N, 1176) float32, image_grid_thw (n, 3))."""
        rows, grids = [], []
        for i, im in enumerate(images):
            name = names[i] if names else (im if isinstance(im, str) else f"image {i}")
            if isinstance(im, str):
                im = load_image(im)
            px, g = self.process_one(im, name)
            rows.append(px)
            grids.append(g)
        if not rows:
            return None, None
        return torch.from_numpy(np.concatenate(rows)), torch.tensor(grids, dtype=torch.long)


# ---- datasets: records, validation, batching ----
#
# A training file is JSON lines, one record a line, in any of the forms people already have; all
# are normalised into one internal form, `Record(messages, images, where)`: chat messages as
# encode_chat takes them (content a list of {"type": "text", "text"} / {"type": "image"} parts, in
# order) and the image paths, resolved against the folder of the jsonl file.
#
#   (a) chat           {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q"}]},
#                                    {"role": "assistant", "content": "A"}], "images": ["a.png"]}
#                      (content a str or a list of parts; an image part may also name its file:
#                       {"type": "image", "image": "a.png"}, then without a top-level `images`)
#   (b) LLaMA-Factory  {"messages": [{"role": "user", "content": "<image>Q"}, ...], "images": ["a.png"]}
#                      {"conversations": [{"from": "human", "value": "<image>Q"}, {"from": "gpt", "value": "A"}],
#                       "images": ["a.png"], "system": "S"}
#   (c) flat           {"image": "a.png" (or "images": [...]), "question" (or "problem"): "Q",
#                       "response" (or "solution"): "A", "answer": "...", "system": "S"}
#                      Images go before the question unless it places them with `<image>`. `answer`
#                      is the response only when there is no response/solution (the paper's responses
#                      hold their own <answer>...</answer>); otherwise it is ignored.
#
# Text-only records (no images) are first-class: the paper compares text-only and multimodal
# cold-start data. A top-level "system" (any form) becomes the system turn; without one, encode_chat
# inserts Qwen's default system prompt as the chat template does.
#
# SFTDataset reads the file once and validates every record before training starts: parsed,
# normalised, every image found and its header readable (its size gives the number of image tokens
# without decoding the pixels), placeholders == images, at least one assistant turn, and the
# tokenized length (image tokens expanded) within max_len. Only text and paths are kept in memory;
# images are decoded when a batch is built (`dataset[i]`).

IMAGE_PLACEHOLDER = "<image>"
_ROLE_ALIASES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
                 "model": "assistant", "bot": "assistant", "system": "system"}


class DataError(ValueError):
    """A problem with the training data; the message names the file and line."""


class Record:
    __slots__ = ("messages", "images", "where")

    def __init__(self, messages: list[dict], images: list[str], where: str):
        self.messages, self.images, self.where = messages, images, where

    def __repr__(self):
        return f"Record({self.where}, {len(self.messages)} messages, {len(self.images)} images)"


def _split_placeholders(text: str) -> list[dict]:
    """"Look: <image> and <image>" -> [text "Look: ", image, text " and ", image] (empty text dropped)."""
    parts = []
    for i, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if i > 0:
            parts.append({"type": "image"})
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def _as_parts(content, inline: list) -> list[dict]:
    """A message's content (str or list of parts) -> a list of text/image parts. Image parts that name
    their file append it to `inline`; `<image>` in any text is a placeholder (LLaMA-Factory form)."""
    if isinstance(content, str):
        return _split_placeholders(content)
    if not isinstance(content, list):
        raise ValueError(f"message content must be a string or a list of parts, not {type(content).__name__}")
    parts = []
    for part in content:
        if not isinstance(part, dict):
            raise ValueError(f"content part {part!r} is not an object")
        if part.get("type") == "image" or "image" in part:
            src = part.get("image")
            if src is not None:
                if not isinstance(src, str):
                    raise ValueError("an image part's `image` must be a file path")
                inline.append(src)
            parts.append({"type": "image"})
        elif part.get("type", "text") == "text" and isinstance(part.get("text"), str):
            parts.extend(_split_placeholders(part["text"]))
        else:
            raise ValueError(f"unsupported content part {part!r} (want type text or image)")
    return parts


def normalize_record(obj, base_dir: str, where: str = "record") -> Record:
    """One parsed JSON record in any supported form -> Record. Raises ValueError saying what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError(f"a record must be a JSON object, not {type(obj).__name__}")
    images = obj.get("images", obj.get("image"))
    if images is None:
        images = []
    elif isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise ValueError("`images` must be a list of file paths (or `image` one path)")
    system = obj.get("system")
    if system is not None and not isinstance(system, str):
        raise ValueError("`system` must be a string")

    inline: list[str] = []
    if "messages" in obj or "conversations" in obj:
        raw = obj["messages"] if "messages" in obj else obj["conversations"]
        if not isinstance(raw, list) or not raw:
            raise ValueError("`messages` / `conversations` must be a non-empty list")
        messages = []
        for m in raw:
            if not isinstance(m, dict):
                raise ValueError(f"message {m!r} is not an object")
            role = m.get("role", m.get("from"))
            content = m["content"] if "content" in m else m.get("value")
            if role not in _ROLE_ALIASES:
                raise ValueError(f"unsupported message role {role!r} (want user/human, assistant/gpt, system)")
            if content is None:
                raise ValueError(f"a {role} message has no content")
            messages.append({"role": _ROLE_ALIASES[role], "content": _as_parts(content, inline)})
    else:
        question = next((obj[k] for k in ("question", "problem", "prompt") if k in obj), None)
        response = next((obj[k] for k in ("response", "solution") if k in obj), obj.get("answer"))
        if not isinstance(question, str):
            raise ValueError("no `messages`, `conversations` or `question`/`problem` string: unknown record form")
        if not isinstance(response, str):
            raise ValueError("flat record without a `response`/`solution` (or `answer`) string")
        parts = _split_placeholders(question)
        if IMAGE_PLACEHOLDER not in question:  # no placement given: images first, as Qwen's examples do
            parts = [{"type": "image"} for _ in images] + parts
        messages = [{"role": "user", "content": parts},
                    {"role": "assistant", "content": [{"type": "text", "text": response}]}]

    if system is not None:
        if messages[0]["role"] == "system":
            raise ValueError("a system prompt is given twice (top-level `system` and a system message)")
        messages.insert(0, {"role": "system", "content": [{"type": "text", "text": system}]})
    if any(m["role"] == "system" for m in messages[1:]):
        raise ValueError("a system message is only allowed first")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant turn: nothing to train on")
    if inline:
        if images:
            raise ValueError("images named both in content parts and in `images`")
        images = inline
    n_slots = sum(p["type"] == "image" for m in messages for p in m["content"])
    if n_slots != len(images):
        raise ValueError(f"{n_slots} image placeholders but {len(images)} images")
    paths = [os.path.join(base_dir, os.path.expanduser(p)) for p in images]
    return Record(messages, paths, where)


class SFTDataset(torch.utils.data.Dataset):
    """Validated SFT records of one jsonl file; `dataset[i]` tokenizes record i and decodes its images.

    max_len:     longest allowed sequence (image tokens included); None = no limit.
    on_long:     "drop" (count and drop records over max_len) or "error". A record is never cut:
                 a cut could fall inside an image's tokens or drop the answer.
    skip_bad:    drop invalid records and count them, instead of stopping with the list of errors.
    max_errors:  how many errors the message lists (all are counted).
    check_images "header" (size from the header, fast) or "full" (decode every image now).
    """

    def __init__(self, path: str, tok: Tokenizer, improc: ImageProcessor, max_len: int | None = None,
                 on_long: str = "drop", skip_bad: bool = False, max_errors: int = 20,
                 check_images: str = "header"):
        assert on_long in ("drop", "error") and check_images in ("header", "full")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: data file does not exist")
        self.path, self.tok, self.improc = path, tok, improc
        self.records: list[Record] = []
        self.lengths: list[int] = []  # tokens per record, image tokens included
        self.n_images: list[int] = []
        errors, long_errors = [], []
        self.stats = {"lines": 0, "kept": 0, "bad": 0, "too_long": 0, "with_images": 0, "text_only": 0}
        base = os.path.dirname(os.path.abspath(path))
        sizes: dict[str, int] = {}  # image path -> tokens (an image shared by records is read once)
        with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is an error of that line
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                self.stats["lines"] += 1
                where = f"{path}:{lineno}"
                try:
                    rec = normalize_record(json.loads(raw.decode("utf-8")), base, where)
                    n_tok = [self._image_tokens(p, sizes, check_images) for p in rec.images]
                    length = len(encode_chat(tok, rec.messages, n_tok)["input_ids"])
                except (ValueError, TypeError, OSError) as e:  # JSONDecodeError, UnicodeDecodeError: ValueError
                    self.stats["bad"] += 1
                    errors.append(f"{where}: {e}")
                    continue
                if max_len is not None and length > max_len:
                    self.stats["too_long"] += 1
                    if on_long == "error":
                        long_errors.append(f"{where}: {length} tokens (with {sum(n_tok)} image tokens) "
                                           f"is over --max-len {max_len}")
                    continue
                self.records.append(rec)
                self.lengths.append(length)
                self.n_images.append(len(rec.images))
        self.stats["kept"] = len(self.records)
        self.stats["with_images"] = sum(n > 0 for n in self.n_images)
        self.stats["text_only"] = len(self.records) - self.stats["with_images"]
        self.errors = errors
        for kind, errs, fatal in (("invalid", errors, not skip_bad), ("too long", long_errors, True)):
            if errs and fatal:
                shown = "\n  ".join(errs[:max_errors])
                more = f"\n  ... and {len(errs) - max_errors} more" if len(errs) > max_errors else ""
                hint = " (--skip-bad drops them)" if kind == "invalid" else " (--on-long drop drops them)"
                raise DataError(f"{path}: {len(errs)} {kind} record(s){hint}:\n  {shown}{more}")
        if not self.records:
            raise DataError(f"{path}: no usable records ({self.stats})")

    def _image_tokens(self, path: str, cache: dict, check: str) -> int:
        if path not in cache:
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path}: image file does not exist")
            if check == "full":
                im = load_image(path)
            else:
                try:
                    im = Image.open(path)  # reads the header only: size, mode; pixels stay on disk
                    im.close()
                except Exception as e:  # OSError, SyntaxError, DecompressionBombError, ...
                    raise ValueError(f"{path}: cannot read image header ({e})") from e
            cache[path] = self.improc.num_tokens(im, path)
        return cache[path]

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        """Record i as tensors: input_ids, labels, roles (T,), pixel_values (N, 1176) or None,
        image_grid_thw (n, 3) or None. Images are decoded here, not before."""
        rec = self.records[i]
        pixel_values, grid = self.improc(rec.images) if rec.images else (None, None)
        n_tok = (grid.prod(-1) // self.improc.merge ** 2).tolist() if grid is not None else []
        out = encode_chat(self.tok, rec.messages, n_tok)
        if len(out["input_ids"]) != self.lengths[i]:  # an image changed on disk since validation
            raise DataError(f"{rec.where}: {len(out['input_ids'])} tokens now, {self.lengths[i]} at validation")
        out.update(pixel_values=pixel_values, image_grid_thw=grid, index=i)
        return out

    def summary(self) -> str:
        s = self.stats
        return (f"{self.path}: {s['kept']} records ({s['with_images']} with images, {s['text_only']} text-only)"
                f" of {s['lines']}; dropped {s['bad']} invalid, {s['too_long']} too long;"
                f" tokens/record mean {sum(self.lengths) / len(self.lengths):.0f}, max {max(self.lengths)}")


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int, group_by_length: bool = True,
                  bucket_batches: int = 16) -> list[list[int]]:
    """The global batches (lists of record indices) of one epoch, the same on every process.

    A seeded shuffle (seed, epoch) of all records is cut into buckets of `bucket_batches` batches;
    each bucket is sorted by length and cut into batches, and the batches are shuffled again. So a
    batch holds records of similar length (little padding), and the epoch's order stays random.
    Within a batch, records stay sorted, so consecutive micro-batches are similar too. The last
    incomplete batch is dropped (different records each epoch); with group_by_length=False the
    batches are plain consecutive slices of the shuffle.
    """
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
    """This process's micro-batches of one global batch: cut into micro-batches of `micro_batch`
    consecutive (similar-length) records; micro-batch j goes to process j % world_size, so every
    process gets long and short ones alike. One process with A micro-batches sees exactly the
    micro-batches that A processes would see one each."""
    assert len(batch) % (micro_batch * world_size) == 0, (len(batch), micro_batch, world_size)
    mbs = [batch[i:i + micro_batch] for i in range(0, len(batch), micro_batch)]
    return mbs[rank::world_size]


def collate(samples: list[dict], pad_id: int) -> dict:
    """Right-pad a micro-batch: input_ids (B, T) with pad_id, attention_mask (B, T) 0 on padding,
    labels (B, T) with IGNORE, roles (B, T) with PAD_ROLE; pixel_values (N, 1176) and image_grid_thw
    (n, 3) of the batch's images in row order (None if none). Labels are not shifted here."""
    B, T = len(samples), max(len(s["input_ids"]) for s in samples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(B, T, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    roles = torch.full((B, T), PAD_ROLE, dtype=torch.long)
    for b, s in enumerate(samples):
        n = len(s["input_ids"])
        input_ids[b, :n], labels[b, :n], roles[b, :n] = s["input_ids"], s["labels"], s["roles"]
        attention_mask[b, :n] = 1
    pv = [s["pixel_values"] for s in samples if s.get("pixel_values") is not None]
    grid = [s["image_grid_thw"] for s in samples if s.get("image_grid_thw") is not None]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "roles": roles,
            "pixel_values": torch.cat(pv) if pv else None, "image_grid_thw": torch.cat(grid) if grid else None,
            "index": [s.get("index") for s in samples]}
