"""Data for Qwen2.5-VL: user errors, tokenizer and chat format with token roles, the prompt
format, image processor, training records, the SFT dataset and its batches. Imports nothing from
the project: every other module builds on it.

Every token of a conversation gets exactly one role while the sequence is assembled (never
recovered from decoded text); the formulas of vas.py select tokens by these roles:

    SYSTEM   (S) the whole system turn `<|im_start|>system ... <|im_end|>\\n`
    IMAGE    (V) the `<|image_pad|>` slots that receive the vision features
    USER     (U) every other prompt token: user turns with their markers, <|vision_start|>,
                 <|vision_end|>, the `<|im_start|>assistant\\n` header, the `\\n` after a reply
    RESPONSE (R) the assistant's content and the `<|im_end|>` closing it (what SFT trains on)

The prompt format (`build_prompt`: question, "A. text" option lines, answer instruction) is the one
user turn that evaluation, GRPO, the toy world and the cold-start synthesis share. The image
processor reproduces transformers' Qwen2VLImageProcessor (PIL path) exactly, transparent images
composited on white as its convert_to_rgb does (`to_rgb`):
`ImageProcessor(min_pixels, max_pixels)(images) -> (pixel_values (N, 1176), image_grid_thw (n, 3))`.
"""

from __future__ import annotations

import base64
import bisect
import functools
import io
import json
import math
import os
import re
import sys
import urllib.parse
import urllib.request

import numpy as np
import torch
from PIL import Image
from tokenizers import AddedToken, Tokenizer as HFTokenizer


# --------------------------------------------------------------------------------------------
# User errors: a message, not a traceback
# --------------------------------------------------------------------------------------------


class UserError(ValueError):
    """A problem with what the user gave (a file, a folder, an argument), not a bug of this code:
    the scripts print its message, which names the file (and line), without a traceback."""


def run_cli(main):
    """Run a script's main(): a UserError ends it with `error: <message>` on stderr and exit
    status 1 (argparse keeps 2 for a bad command line); any other exception (a bug) keeps its traceback."""
    try:
        main()
        return
    except UserError as e:
        message = f"error: {e}"
    # Printed after the except block has freed the traceback, so that objects of the failed run
    # (a progress bar closing itself) have written their last line and the message comes last.
    print(message, file=sys.stderr, flush=True)
    sys.exit(1)


SYSTEM, IMAGE, USER, RESPONSE = 0, 1, 2, 3
PAD_ROLE = -1  # padding positions in a batch
ROLE_NAMES = {SYSTEM: "system", IMAGE: "image", USER: "user", RESPONSE: "response"}
IGNORE = -100  # label of tokens that are not trained on

DEFAULT_SYSTEM = "You are a helpful assistant."
QWEN_SPECIAL_TOKENS = [  # ids 151643.. in Qwen2 / Qwen2.5-VL; the toy tokenizer keeps their order
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
# The markers the chat format and the vision inputs give meaning to. encode_chat never matches them
# inside record text: there they are plain text (see encode_chat).
CONTROL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")

# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


class Tokenizer:
    """Qwen's byte-level BPE from `tokenizer.json` (the `tokenizers` library); no BOS is added."""

    NEEDED = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>")

    def __init__(self, path: str):
        """path: a model folder holding tokenizer.json (the caller resolves a run folder), or the file."""
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.exists(file):
            raise UserError(f"{file}: no tokenizer.json (the model folder needs its tokenizer)")
        try:
            self.tok = HFTokenizer.from_file(file)
        except Exception as e:  # the tokenizers library raises a bare Exception on a bad file
            raise UserError(f"{file}: not a readable tokenizer.json ({e})") from None
        self.path = file
        ids = [self.tok.token_to_id(name) for name in self.NEEDED]
        if None in ids:
            raise UserError(f"{file}: the tokenizer lacks the special token {self.NEEDED[ids.index(None)]}")
        (self.endoftext_id, self.im_start_id, self.im_end_id, self.vision_start_id, self.vision_end_id,
         self.image_pad_id) = ids
        self.pad_id = self.endoftext_id
        self.stop_ids = (self.im_end_id, self.endoftext_id)
        self.added_special, self.added_ids = [], []  # add_special_tokens: what this run asked for, new ids
        self._derive()

    def add_special_tokens(self, tokens: list[str]) -> list[int]:
        """Add `tokens` as special tokens, as LLaMA-Factory's `new_special_tokens` (transformers'
        add_special_tokens, extending the additional special tokens): a token not yet in the vocabulary
        takes the id after the last one, one already there keeps its id. Returns the new ids
        (hub.write_special_tokens writes the tokens into a folder's files)."""
        new = [t for t in dict.fromkeys(tokens) if self.tok.token_to_id(t) is None]
        self.tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])
        self.added_special = list(dict.fromkeys(self.added_special + list(tokens)))
        self.added_ids += [self.tok.token_to_id(t) for t in new]
        self._derive()
        return self.added_ids[len(self.added_ids) - len(new):]

    def _derive(self):
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        # for record text: the same tokenizer (same ids) in which only the control tokens are
        # "special", encoded with encode_special_tokens (tokenizers' split_special_tokens): those
        # are split into ordinary pieces, every other added token is still matched
        spec = json.loads(self.tok.to_str())
        for t in spec["added_tokens"]:
            t["special"] = t["content"] in CONTROL_TOKENS
        self.text_tok = HFTokenizer.from_str(json.dumps(spec))
        self.text_tok.encode_special_tokens = True

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str):
        """Record text -> (ids, start offsets); CONTROL_TOKENS in it stay plain text."""
        enc = self.text_tok.encode(text, add_special_tokens=False)
        return enc.ids, [o[0] for o in enc.offsets]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_response(self, ids) -> str:
        """The text of a generated response: drops the turn markers (<|im_start|>, <|im_end|>) and the
        end-of-text / padding token, keeps every other token. skip_special_tokens=True would also drop
        <think>, </think>, <answer>, </answer> where a tokenizer adds them as special tokens (the
        paper's released tokenizer does), and with them every answer and every format reward."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        drop = {self.im_start_id, self.im_end_id, self.endoftext_id, self.pad_id}
        return self.tok.decode([i for i in ids if i not in drop], skip_special_tokens=False)


# --------------------------------------------------------------------------------------------
# Chat format with token roles
# --------------------------------------------------------------------------------------------


def encode_chat(tok: Tokenizer, messages: list[dict], image_tokens: list[int] | None = None,
                add_generation_prompt: bool = False, system: str | None = DEFAULT_SYSTEM) -> dict:
    """Render Qwen2.5-VL's chat template directly into ids, labels and roles.

    messages: [{"role": "system"|"user"|"assistant", "content": str | [{"type": "text", "text": ...},
              {"type": "image"}, ...]}]; a default system turn is inserted (as the template does)
              when the first message is not a system message and `system` is not None.
    image_tokens: number of <|image_pad|> slots for each image in order (t*h*w/4 of its grid).
    Returns LongTensors input_ids, labels (assistant content + <|im_end|>, else -100) and roles,
    each (T,): equal to `apply_chat_template` + the Qwen tokenizer on the same messages.

    Record text is data, never control: the CONTROL_TOKENS markers come only from the structure
    built here; inside a message's text they are ordinary BPE pieces (transformers'
    `split_special_tokens=True`), so a question quoting "<|image_pad|>" cannot add an image slot,
    nor an answer holding "<|im_end|>" end its turn. Every other added token (<think>, ...) is
    matched as the tokenizer defines it, keeping the ids the released checkpoints were trained with.
    Text between two special tokens is tokenized as one string (as the reference tokenizes the whole
    prompt, merges across "assistant\\n" + reply kept); each token takes the role of the piece its
    first character came from.
    """
    pieces: list[tuple[str | int, int, bool]] = []  # (text or special id, role, trained)
    image_tokens = list(image_tokens or [])
    n_img = 0

    def turn(role_name: str, content, role: int):
        nonlocal n_img
        trained = role == RESPONSE
        head_role = SYSTEM if role == SYSTEM else USER
        pieces.extend([(tok.im_start_id, head_role, False), (role_name + "\n", head_role, False)])
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        for part in parts:
            if part.get("type") == "image" or "image" in part or "image_url" in part:
                if n_img >= len(image_tokens):
                    raise ValueError(f"messages hold more images than the {len(image_tokens)} given")
                pad = [(tok.image_pad_id, IMAGE, False)] * image_tokens[n_img]
                pieces.extend([(tok.vision_start_id, USER, False), *pad, (tok.vision_end_id, USER, False)])
                n_img += 1
            elif "text" in part:
                pieces.append((part["text"], role, trained))
            else:
                raise ValueError(f"unknown content part {part!r}")
        pieces.extend([(tok.im_end_id, role, trained), ("\n", head_role, False)])

    if messages and messages[0]["role"] != "system" and system is not None:
        turn("system", system, SYSTEM)
    for i, m in enumerate(messages):
        r = m["role"]
        if r == "system" and i != 0:
            raise ValueError("a system message is only allowed first")
        turn(r, m["content"], {"system": SYSTEM, "user": USER, "assistant": RESPONSE}[r])
    if add_generation_prompt:
        pieces.extend([(tok.im_start_id, USER, False), ("assistant\n", USER, False)])
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
            # the last piece starting at or before the token (never an empty piece: a later piece
            # with the same start would come after it)
            k = bisect.bisect_right(starts, off) - 1
            ids.append(tid); roles.append(pieces[i + k][1]); trained.append(pieces[i + k][2])
        i = j
    input_ids = torch.tensor(ids, dtype=torch.long)
    labels = torch.where(torch.tensor(trained, dtype=torch.bool), input_ids, torch.full_like(input_ids, IGNORE))
    return {"input_ids": input_ids, "labels": labels, "roles": torch.tensor(roles, dtype=torch.long)}


# --------------------------------------------------------------------------------------------
# The prompt format: one user turn for training, evaluation, GRPO, the toy world and synthesis
# --------------------------------------------------------------------------------------------

ANSWER_INSTRUCTION = "Reason inside <think> </think>, then give the final answer inside <answer> </answer>."
MC_INSTRUCTION = "Answer with the option letter."


def option_letter(i):
    return chr(ord("A") + i)


def format_question(question, options=None, instruction=MC_INSTRUCTION):
    """The prompt text: the question, then for multiple choice one "A. text" line per option and
    the instruction. Options already written into the question (a line starting "A.") are not
    repeated."""
    question = question.strip()
    if not options:
        return question
    if re.search(r"(?m)^\s*\(?A[.):]\s", question):
        return question if instruction in question else f"{question}\n{instruction}"
    lines = [f"{option_letter(i)}. {opt}" for i, opt in enumerate(options)]
    return "\n".join([question, *lines, instruction])


def build_prompt(record: dict, format_prompt=None) -> str:
    """The user-turn text: question, "A. text" option lines, then the answer instruction; or, with
    `format_prompt` (release.FormatPrompt: EasyR1's jinja), its rendering of the question and the
    option lines in place of the instruction. (Image placeholders come from the chat template.)"""
    options = [] if record.get("options_in_question") else record.get("options") or []
    lines = [f"{option_letter(i)}. {opt}" for i, opt in enumerate(options)]
    if format_prompt is not None:
        return format_prompt("\n".join([record["question"].strip() if lines else record["question"], *lines]))
    lines = [record["question"].strip(), *lines]
    instruction = ANSWER_INSTRUCTION
    if record.get("options") or record.get("answer_type") == "multi_choice":
        instruction += " " + MC_INSTRUCTION
    return "\n".join(lines) + "\n" + instruction


def prompt_content(record: dict, format_prompt=None) -> list[dict]:
    """The user turn's content parts: the record's images, then build_prompt(record). A training
    record whose question places its images with `<image>` (`image_placeholders` true, set by
    train_grpo's reader) keeps each image where its placeholder is."""
    text = build_prompt(record, format_prompt)
    if record.get("image_placeholders"):
        return split_placeholders(text)
    return [{"type": "image"} for _ in record["images"]] + [{"type": "text", "text": text}]


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


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as transformers' `convert_to_rgb` makes it: an image with an alpha band or a
    `transparency` entry (RGBA, LA, PA; P, L or RGB with a PNG tRNS chunk or GIF transparency) is
    composited on white (dropping the alpha would show the hidden colours of transparent pixels,
    the background of most chart PNGs); every other mode is PIL's plain convert("RGB"). As in
    transformers, "has alpha" goes by the band names, so opaque LAB (bands L, A, B) is composited
    too, which gives its plain conversion."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(src, name: str | None = None) -> Image.Image:
    """Open and fully decode an image -> RGB (`to_rgb`). src: a file path, the file's bytes, or a
    PIL image. Unreadable, empty or truncated data raise a ValueError naming it (`name`, else the
    path); a missing file is a FileNotFoundError."""
    if isinstance(src, Image.Image):
        return to_rgb(src)
    if isinstance(src, (bytes, bytearray)):
        name = name or "image bytes"
        if not src:
            raise ValueError(f"{name}: image data is empty")
        fp = io.BytesIO(src)
    else:
        fp = os.fspath(src)
        name = name or fp
        if not os.path.exists(fp):
            raise FileNotFoundError(f"{name}: image file does not exist")
        if os.path.getsize(fp) == 0:
            raise ValueError(f"{name}: image file is empty")
    try:
        with Image.open(fp) as im:
            im.load()  # decodes now: a truncated file fails here, not later in a batch
            return to_rgb(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"{name}: cannot decode image ({e})") from e


class ImageProcessor:
    def __init__(self, min_pixels: int = 3136, max_pixels: int = 12845056, patch_size: int = 14,
                 temporal_patch_size: int = 2, merge_size: int = 2):
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.patch, self.tpatch, self.merge = patch_size, temporal_patch_size, merge_size

    @classmethod
    def from_pretrained(cls, path: str, **overrides) -> "ImageProcessor":
        """Read the model folder's `preprocessor_config.json` if it has one (hub defaults otherwise);
        the caller resolves a run folder to its checkpoint."""
        kw = {}
        file = os.path.join(path, "preprocessor_config.json")
        if os.path.exists(file):
            with open(file) as f:
                c = json.load(f)
            size = c.get("size") or {}
            kw = dict(min_pixels=c.get("min_pixels", size.get("shortest_edge", 3136)),
                      max_pixels=c.get("max_pixels", size.get("longest_edge", 12845056)),
                      patch_size=c.get("patch_size", 14), temporal_patch_size=c.get("temporal_patch_size", 2),
                      merge_size=c.get("merge_size", 2))
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
        image = to_rgb(image)
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
        """images: PIL images, file paths or encoded image bytes
        -> (pixel_values (N, 1176) float32, image_grid_thw (n, 3))."""
        rows, grids = [], []
        for i, im in enumerate(images):
            name = names[i] if names else (os.fspath(im) if isinstance(im, (str, os.PathLike)) else f"image {i}")
            if not isinstance(im, Image.Image):
                im = load_image(im, name)
            px, g = self.process_one(im, name)
            rows.append(px)
            grids.append(g)
        if not rows:
            return None, None
        return torch.from_numpy(np.concatenate(rows)), torch.tensor(grids, dtype=torch.long)


# --------------------------------------------------------------------------------------------
# Datasets: records, validation, batching
# --------------------------------------------------------------------------------------------
#
# A training file is JSON lines or one JSON array of records (LLaMA-Factory's .json; a file whose
# first character is "[" is an array whatever its name). Every record form becomes one internal
# `Record(messages, images, where)`: messages as encode_chat takes them (content a list of text /
# image parts, in order) and image sources (paths resolved against the data file's folder, or the
# bytes of an inline image).
#
#   (a) chat (OpenAI / TRL / transformers)
#         {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q"}]},
#                       {"role": "assistant", "content": "A"}], "images": ["a.png"]}
#         {"prompt": [user message(s)], "completion": [assistant message], "images": [...]}  (TRL)
#       an image part may name its image (then no top-level `images`): {"type": "image", "image" |
#       "path" | "url": SRC}, {"type": "image", "base64": B64}, {"type": "image_url", "image_url": {"url": SRC}}
#   (b) LLaMA-Factory: {"messages": [{"role": "user", "content": "<image>Q"}, ...], "images": ["a.png"]},
#         {"conversations": [{"from": "human" | "gpt", "value": "<image>Q"}], "images", "system"?}  (ShareGPT)
#         {"instruction": "Q", "input"?, "output": "A", "history"?: [["q0", "a0"]], "images"?, "system"?}  (Alpaca)
#   (c) flat / EasyR1: {"images" | "image", "question" | "problem" | "prompt": "Q", "response" | "solution": "A",
#         "answer"?, "system"?}; `answer` (a string or a number) is the response only when there is no
#         response/solution (the paper's responses hold their own <answer>...</answer>)
#
# An image SRC: see image_source; remote (http) URLs are refused. `<image>` in any text is a
# placeholder: the image goes exactly there (placeholders and images must match in number); images
# with neither placeholder nor image part open the first user turn (as in LLaMA-Factory). Text-only
# records are first-class (the paper compares text-only and multimodal cold-start). A top-level
# "system" becomes the system turn; without one, encode_chat inserts Qwen's default system prompt.

IMAGE_PLACEHOLDER = "<image>"
_ROLE_ALIASES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
                 "model": "assistant", "bot": "assistant", "system": "system"}
RECORD_FORMS = ('{"messages": [{"role", "content"}], "images"?} (OpenAI/TRL/LLaMA-Factory), {"prompt", "completion"} '
                '(TRL), {"conversations": [{"from", "value"}], "images"?} (ShareGPT), {"instruction", "input"?, '
                '"output", "images"?} (Alpaca), {"question" or "problem", "response" or "answer", "images"?} '
                '(flat/EasyR1)')


class DataError(UserError):
    """A problem with the training data; the message names the file and line."""


class Record:
    __slots__ = ("messages", "images", "where")

    def __init__(self, messages: list[dict], images: list, where: str):
        self.messages, self.images, self.where = messages, images, where

    def __repr__(self):
        return f"Record({self.where}, {len(self.messages)} messages, {len(self.images)} images)"


def read_records(path: str):
    """The records of a data file, in order: yields (where, obj, error) with `where` naming the file
    and line ("f.jsonl:7", or "f.json:12 (record 3)" in an array) and either the parsed JSON value
    or, for a line that is not JSON / not UTF-8, the error. An array that is not valid JSON as a
    whole cannot be read past the fault: that raises a DataError naming the line."""
    with open(path, "rb") as f:
        data = f.read()
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark, as some editors write
        data = data[3:]
    if data.lstrip()[:1] != b"[":  # JSON lines
        for lineno, raw in enumerate(data.split(b"\n"), 1):
            if raw.strip():
                where = f"{path}:{lineno}"
                try:
                    yield where, json.loads(raw.decode("utf-8")), None
                except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
                    hint = " (a data file is JSON lines, one record a line, or one JSON array of records)" \
                        if isinstance(e, json.JSONDecodeError) and lineno == 1 else ""
                    yield where, None, ValueError(f"bad JSON line: {e}{hint}")
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 ({e.reason})") from None
    decoder, pos, n = json.JSONDecoder(), text.index("[") + 1, 0
    space = re.compile(r"\s*")
    while True:
        pos = space.match(text, pos).end()
        if n == 0 and text.startswith("]", pos):
            pos += 1
            break
        line = text.count("\n", 0, pos) + 1
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: bad JSON in record {n} of the array: {e.msg} "
                            f"(column {e.colno})") from None
        yield f"{path}:{line} (record {n})", obj, None
        n += 1
        pos = space.match(text, pos).end()
        if text.startswith(",", pos):
            pos += 1
        elif text.startswith("]", pos):
            pos += 1
            break
        else:
            raise DataError(f"{path}:{text.count(chr(10), 0, pos) + 1}: expected ',' or ']' after record {n - 1}")
    if text[pos:].strip():
        raise DataError(f"{path}:{text.count(chr(10), 0, pos) + 1}: text after the end of the JSON array")


def split_placeholders(text: str) -> list[dict]:
    """"Look: <image> and <image>" -> [text "Look: ", image, text " and ", image] (empty text dropped)."""
    parts = []
    for i, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if i > 0:
            parts.append({"type": "image"})
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def _decode_b64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except ValueError as e:
        raise ValueError(f"{what} is not valid base64 ({e})") from None


def image_source(src, base_dir: str):
    """One image reference of a record -> a file path (str) or the image's bytes. src: a path
    (relative to base_dir), a file:// URL, a base64 data: URL, or a dict {"bytes", "path"} as EasyR1
    and Hugging Face datasets store images (bytes: base64 or a data: URL, used when given)."""
    if isinstance(src, dict):  # EasyR1 / Hugging Face datasets' Image: bytes first, else the path
        if src.get("bytes") is not None:
            b = src["bytes"]
            if isinstance(b, list) and all(isinstance(x, int) and 0 <= x < 256 for x in b):
                return bytes(b)
            if not isinstance(b, str):
                raise ValueError("an image's `bytes` must be base64 text or a data: URL")
            return image_source(b, base_dir) if b.startswith("data:") else _decode_b64(b, "an image's `bytes`")
        if isinstance(src.get("path"), str):
            return image_source(src["path"], base_dir)
        raise ValueError(f"an image dict needs `bytes` or `path`, not keys {sorted(src)}")
    if not isinstance(src, str) or not src:
        raise ValueError(f"an image must be a path, a file:// or data: URL, or a {{bytes, path}} dict, not {src!r:.80}")
    if src.startswith("data:"):
        head, sep, body = src.partition(",")
        if not sep or not head.endswith(";base64"):
            raise ValueError(f"a data: URL image must be base64 (data:image/png;base64,...), not {src[:40]!r}")
        return _decode_b64(body, "a data: URL image")
    if src.startswith("file://"):
        src = urllib.request.url2pathname(urllib.parse.urlparse(src).path)
    elif re.match(r"[a-z][a-z0-9+.-]*://", src, re.I):
        raise ValueError(f"remote image {src[:80]!r}: download the images first and name the files")
    return os.path.join(base_dir, os.path.expanduser(src))


def _image_part_source(part: dict):
    """The image an image part names itself (None when it names none: `images` then supplies it)."""
    if part.get("type") == "image_url" or "image_url" in part:
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
        if not isinstance(url, str):
            raise ValueError('an image_url part must be {"type": "image_url", "image_url": {"url": ...}}')
        return url
    for key in ("image", "path", "url"):
        if part.get(key) is not None:
            return part[key]
    if part.get("base64") is not None:
        return "data:;base64," + part["base64"]
    return None


def _as_parts(content, inline: list) -> list[dict]:
    """A message's content (str or list of parts) -> a list of text/image parts. Image parts that name
    their image append it to `inline`; `<image>` in any text is a placeholder (LLaMA-Factory form)."""
    if isinstance(content, str):
        return split_placeholders(content)
    if not isinstance(content, list):
        raise ValueError(f"message content must be a string or a list of parts, not {type(content).__name__}")
    parts = []
    for part in content:
        if not isinstance(part, dict):
            raise ValueError(f"content part {part!r:.80} is not an object")
        if part.get("type") in ("image", "image_url") or "image" in part or "image_url" in part:
            src = _image_part_source(part)
            if src is not None:
                inline.append(src)
            parts.append({"type": "image"})
        elif part.get("type", "text") == "text" and isinstance(part.get("text"), str):
            parts.extend(split_placeholders(part["text"]))
        else:
            raise ValueError(f"unsupported content part {part!r:.80} (want type text, image or image_url)")
    return parts


def answer_text(value, key: str):
    """A response or answer field -> str; numbers (EasyR1 answers) are written as JSON writes them."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return str(value)
    raise ValueError(f"`{key}` must be a string or a number, not {type(value).__name__}")


def normalize_record(obj, base_dir: str, where: str = "record") -> Record:
    """One parsed JSON record in any supported form -> Record. Raises ValueError saying what is wrong
    (the callers prefix `where`)."""
    if not isinstance(obj, dict):
        raise ValueError(f"a record must be a JSON object, not {type(obj).__name__}; expected {RECORD_FORMS}")
    images = obj.get("images", obj.get("image"))
    if images is None:
        images = []
    elif isinstance(images, (str, dict)):
        images = [images]
    if not isinstance(images, list):
        raise ValueError("`images` must be a list of images (paths, URLs or {bytes, path} dicts)")
    system = obj.get("system")
    if system is not None and not isinstance(system, str):
        raise ValueError("`system` must be a string")

    for key in ("videos", "video", "audios", "audio"):
        if obj.get(key):
            raise ValueError(f"`{key}` are not supported: this project trains on images and text")

    inline: list = []
    if isinstance(obj.get("prompt"), list) and isinstance(obj.get("completion"), list):
        obj = {**obj, "messages": obj["prompt"] + obj["completion"]}  # TRL's conversational prompt-completion
    elif isinstance(obj.get("prompt"), str) and isinstance(obj.get("completion"), str):
        obj = {**obj, "question": obj["prompt"], "response": obj["completion"]}
    if "messages" in obj or "conversations" in obj:
        raw = obj["messages"] if "messages" in obj else obj["conversations"]
        if not isinstance(raw, list) or not raw:
            raise ValueError("`messages` / `conversations` must be a non-empty list")
        messages = []
        for m in raw:
            if not isinstance(m, dict):
                raise ValueError(f"message {m!r:.80} is not an object")
            role = m.get("role", m.get("from"))
            content = m["content"] if "content" in m else m.get("value")
            if role not in _ROLE_ALIASES:
                raise ValueError(f"unsupported message role {role!r} (want user/human, assistant/gpt, system)")
            if content is None:
                raise ValueError(f"a {role} message has no content")
            messages.append({"role": _ROLE_ALIASES[role], "content": _as_parts(content, inline)})
    elif "instruction" in obj:  # Alpaca: prompt "instruction\ninput", earlier turns in `history`
        if not isinstance(obj["instruction"], str) or not isinstance(obj.get("input", ""), str):
            raise ValueError("Alpaca `instruction` and `input` must be strings")
        if "output" not in obj:
            raise ValueError("Alpaca record without `output`")
        history = obj.get("history") or []
        if not isinstance(history, list) or not all(
                isinstance(h, list) and len(h) == 2 and all(isinstance(x, str) for x in h) for h in history):
            raise ValueError("Alpaca `history` must be a list of [prompt, response] string pairs")
        messages = []
        for q, a in history:
            messages += [{"role": "user", "content": split_placeholders(q)},
                         {"role": "assistant", "content": split_placeholders(a)}]
        prompt = "\n".join(x for x in (obj["instruction"], obj.get("input") or "") if x)
        messages += [{"role": "user", "content": split_placeholders(prompt)},
                     {"role": "assistant", "content": [{"type": "text", "text": answer_text(obj["output"], "output")}]}]
    else:
        key = next((k for k in ("question", "problem", "prompt") if k in obj), None)
        if key is None or not isinstance(obj[key], str):
            raise ValueError(f"unknown record form (keys {sorted(obj)[:12]}); expected {RECORD_FORMS}")
        rkey = next((k for k in ("response", "solution", "answer", "completion") if k in obj), None)
        if rkey is None:
            raise ValueError("a flat record needs a `response`/`solution` (or an `answer`)")
        messages = [{"role": "user", "content": split_placeholders(obj[key])},
                    {"role": "assistant", "content": [{"type": "text", "text": answer_text(obj[rkey], rkey)}]}]

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
    if n_slots == 0 and images:  # no placement given: the images open the first user turn
        first = next((m for m in messages if m["role"] == "user"), None)
        if first is None:
            raise ValueError("images but no user turn to show them in")
        first["content"] = [{"type": "image"} for _ in images] + first["content"]
    elif n_slots != len(images):
        raise ValueError(f"{n_slots} image placeholders but {len(images)} images")
    return Record(messages, [image_source(src, base_dir) for src in images], where)


def image_tokens(src, improc: "ImageProcessor", check: str = "header", name: str | None = None) -> int:
    """How many <|image_pad|> slots an image takes: from its header (check="header": size only, fast)
    or after decoding it fully (check="full"). src: a file path or the image's bytes."""
    name = name or (src if isinstance(src, str) else "inline image")
    if isinstance(src, str) and not os.path.exists(src):
        raise FileNotFoundError(f"{src}: image file does not exist")
    if check == "full":
        im = load_image(src, name)
    else:
        try:
            im = Image.open(src if isinstance(src, str) else io.BytesIO(src))  # the header: size, mode
            im.close()
        except Exception as e:  # OSError, SyntaxError, DecompressionBombError, ...
            raise ValueError(f"{name}: cannot read image header ({e})") from e
    return improc.num_tokens(im, name)


class SFTDataset(torch.utils.data.Dataset):
    """The SFT records of one data file (JSON lines or a JSON array, any form above), all validated
    once before training: parsed, normalised, every image found and its header readable (its size
    gives its image tokens without decoding), placeholders == images, an assistant turn, the length
    within max_len. Only text and paths (or an inline image's bytes) stay in memory: `dataset[i]`
    tokenizes record i and decodes its images.

    max_len:     longest allowed sequence (image tokens included); None = no limit.
    on_long:     "drop" (count and drop records over max_len) or "error". A record is never cut:
                 a cut could fall inside an image's tokens or drop the answer.
    skip_bad:    drop invalid records and count them, instead of stopping with the list of errors.
    max_errors:  how many errors the message lists (all are counted).
    check_images "header" (size from the header, fast) or "full" (decode every image now).
    records:     (where, obj, error) in place of read_records(path) (release.dataset_records: the
                 datasets of a dataset_info.json, `path` naming them), image paths absolute.
    """

    def __init__(self, path: str, tok: Tokenizer, improc: ImageProcessor, max_len: int | None = None,
                 on_long: str = "drop", skip_bad: bool = False, max_errors: int = 20,
                 check_images: str = "header", records=None):
        assert on_long in ("drop", "error") and check_images in ("header", "full")
        if records is None and not os.path.exists(path):
            raise DataError(f"{path}: data file does not exist")
        self.path, self.tok, self.improc = path, tok, improc
        self.records, self.lengths, self.n_images = [], [], []  # lengths: tokens, image tokens included
        errors, long_errors = [], []
        self.stats = {"lines": 0, "kept": 0, "bad": 0, "too_long": 0, "with_images": 0, "text_only": 0}
        base = os.path.dirname(os.path.abspath(path))
        tokens_of = functools.cache(lambda src: image_tokens(src, improc, check_images))  # a shared image: read once
        for where, obj, error in read_records(path) if records is None else records:  # JSON lines or an array
            self.stats["lines"] += 1
            try:
                if error is not None:
                    raise error
                rec = normalize_record(obj, base, where)
                n_tok = [tokens_of(p) for p in rec.images]
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
        with_images = sum(n > 0 for n in self.n_images)
        self.stats.update(kept=len(self.records), with_images=with_images, text_only=len(self.records) - with_images)
        self.errors = errors
        for kind, errs, fatal in (("invalid", errors, not skip_bad), ("too long", long_errors, True)):
            if errs and fatal:
                shown = "\n  ".join(errs[:max_errors])
                more = f"\n  ... and {len(errs) - max_errors} more" if len(errs) > max_errors else ""
                hint = " (--skip-bad drops them)" if kind == "invalid" else " (--on-long drop drops them)"
                raise DataError(f"{path}: {len(errs)} {kind} record(s){hint}:\n  {shown}{more}")
        if not self.records:
            raise DataError(f"{path}: no usable records ({self.stats})")

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        """Record i as tensors: input_ids, labels, roles (T,), pixel_values (N, 1176) or None,
        image_grid_thw (n, 3) or None; its images are decoded here. An image that no longer decodes
        (truncated, changed or removed since validation) gives {"index": i, "error": message naming
        record and file}, not an exception that would end the run from inside a data-loader worker:
        `collate` lists such records in "skipped", and the training loop skips or stops."""
        rec = self.records[i]
        try:
            pixel_values, grid = self.improc(rec.images) if rec.images else (None, None)
        except (ValueError, OSError) as e:  # load_image: missing, empty or undecodable file
            return {"index": i, "error": f"{rec.where}: {e}"}
        n_tok = (grid.prod(-1) // self.improc.merge ** 2).tolist() if grid is not None else []
        out = encode_chat(self.tok, rec.messages, n_tok)
        if len(out["input_ids"]) != self.lengths[i]:  # an image changed on disk since validation
            return {"index": i, "error": f"{rec.where}: {len(out['input_ids'])} tokens now, {self.lengths[i]} at "
                                         f"validation (an image changed on disk: {', '.join(rec.images)})"}
        out.update(pixel_values=pixel_values, image_grid_thw=grid, index=i)
        return out

    def summary(self) -> str:
        s = self.stats
        return (f"{self.path}: {s['kept']} records ({s['with_images']} with images, {s['text_only']} text-only)"
                f" of {s['lines']}; dropped {s['bad']} invalid, {s['too_long']} too long;"
                f" tokens/record mean {sum(self.lengths) / len(self.lengths):.0f}, max {max(self.lengths)}")


def collate(samples: list[dict], pad_id: int) -> dict:
    """Right-pad a micro-batch: input_ids (B, T) with pad_id, attention_mask (B, T) 0 on padding,
    labels (B, T) with IGNORE, roles (B, T) with PAD_ROLE; pixel_values (N, 1176) and image_grid_thw
    (n, 3) of the batch's images in row order (None if none). Labels are not shifted here.
    Records that failed to load (SFTDataset.__getitem__'s {"index", "error"}) are left out and listed
    in "skipped" as (index, message); when all failed, the batch is one padding token with no label
    ("empty": True): it trains nothing, but every process runs the same forward and backward."""
    skipped = [(s["index"], s["error"]) for s in samples if "error" in s]
    samples = [s for s in samples if "error" not in s]
    empty = not samples
    if empty:
        samples = [{"input_ids": torch.tensor([pad_id]), "labels": torch.tensor([IGNORE]),
                    "roles": torch.tensor([USER])}]
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
            "index": [] if empty else [s.get("index") for s in samples], "skipped": skipped, "empty": empty}
