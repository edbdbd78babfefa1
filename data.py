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
