"""Training data in the forms other tools write (LLaMA-Factory .json arrays, OpenAI/TRL content
parts, EasyR1 RL records), read by SFTDataset and train_grpo.PromptDataset; token ids checked against
transformers' rendering of Qwen2.5-VL's chat template."""

import base64
import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_data import QWEN_TOKENIZER, reference_ids

from data import DataError, ImageProcessor, SFTDataset, Tokenizer, build_prompt, normalize_record
from train_grpo import PromptDataset


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(QWEN_TOKENIZER)


@pytest.fixture
def folder(tmp_path):
    """A data folder with two 56x56 images (4 image tokens each) under img/."""
    (tmp_path / "img").mkdir()
    rng = np.random.default_rng(0)
    for name in ("1.png", "2.png"):
        Image.fromarray(rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)).save(tmp_path / "img" / name)
    return tmp_path


def write_json(path, records):  # as LLaMA-Factory ships data/mllm_demo.json
    path.write_text(json.dumps(records, indent=2, ensure_ascii=False), encoding="utf-8")
    return str(path)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return str(path)


def text(t):
    return {"type": "text", "text": t}


IMG = {"type": "image"}


def test_llama_factory_json_array(folder, tok):
    """mllm_demo.json style (messages, role/content, images; with and without <image>) and ShareGPT
    (conversations, from/value, a system message first) in one .json array."""
    path = write_json(folder / "mllm.json", [
        {"messages": [{"content": "Who are they?", "role": "user"},
                      {"content": "They're Kane and Gretzka.", "role": "assistant"},
                      {"content": "What are they doing?", "role": "user"},
                      {"content": "They are celebrating.", "role": "assistant"}],
         "images": ["img/1.png"]},
        {"messages": [{"content": "Compare <image> and <image>.", "role": "user"},
                      {"content": "他们在足球场上庆祝。", "role": "assistant"}],
         "images": ["img/1.png", "img/2.png"]},
        {"conversations": [{"from": "system", "value": "Be brief."},
                           {"from": "human", "value": "<image>\nWhat is shown?"},
                           {"from": "gpt", "value": "Noise."}],
         "images": ["img/2.png"]},
    ])
    ds = SFTDataset(path, tok, ImageProcessor())
    assert len(ds) == 3 and ds.stats["bad"] == 0
    expected = [
        ([{"role": "user", "content": [IMG, text("Who are they?")]},
          {"role": "assistant", "content": "They're Kane and Gretzka."},
          {"role": "user", "content": "What are they doing?"},
          {"role": "assistant", "content": "They are celebrating."}], [4]),
        ([{"role": "user", "content": [text("Compare "), IMG, text(" and "), IMG, text(".")]},
          {"role": "assistant", "content": "他们在足球场上庆祝。"}], [4, 4]),
        ([{"role": "system", "content": "Be brief."},
          {"role": "user", "content": [IMG, text("\nWhat is shown?")]},
          {"role": "assistant", "content": "Noise."}], [4]),
    ]
    for i, (messages, pads) in enumerate(expected):
        assert ds[i]["input_ids"].tolist() == reference_ids(messages, pads, False), i
    opening = [n for n, line in enumerate(open(path).read().split("\n"), 1) if line == "  {"]  # each record's "{"
    assert [r.where for r in ds.records] == [f"{path}:{n} (record {i})" for i, n in enumerate(opening)]


def test_openai_trl_content_parts_name_their_images(folder, tok):
    """image_url parts with a relative path, a file:// URL and a data: URL; {"type": "image", "path"}
    and {"type": "image", "image"} parts; TRL's {"type": "image"} with a top-level `images`. Every
    form gives the pixels of the same file."""
    png = (folder / "img" / "1.png").read_bytes()
    data_url = "data:image/png;base64," + base64.b64encode(png).decode()
    sources = [
        {"type": "image_url", "image_url": {"url": "img/1.png"}},
        {"type": "image_url", "image_url": {"url": (folder / "img" / "1.png").as_uri()}},
        {"type": "image_url", "image_url": {"url": data_url}},
        {"type": "image", "path": "img/1.png"},
        {"type": "image", "image": "img/1.png"},
        {"type": "image", "image": data_url},
    ]
    records = [{"messages": [{"role": "user", "content": [text("Describe "), part, text(" briefly.")]},
                             {"role": "assistant", "content": [text("Noise.")]}]} for part in sources]
    records.append({"messages": [{"role": "user", "content": [text("Describe "), IMG, text(" briefly.")]},
                                 {"role": "assistant", "content": [text("Noise.")]}], "images": ["img/1.png"]})
    ds = SFTDataset(write_jsonl(folder / "openai.jsonl", records), tok, ImageProcessor())
    want_pv, _ = ImageProcessor()([str(folder / "img" / "1.png")])
    want_ids = reference_ids([{"role": "user", "content": [text("Describe "), IMG, text(" briefly.")]},
                              {"role": "assistant", "content": [text("Noise.")]}], [4], False)
    for i in range(len(records)):
        assert torch.equal(ds[i]["pixel_values"], want_pv), i
        assert ds[i]["input_ids"].tolist() == want_ids, i


def test_easyr1_records_for_grpo_and_sft(folder, tok):
    """EasyR1 RL records: `problem` with <image> placeholders (one mid-question), a numeric
    `answer`, `images` as paths or {"path"} / {"bytes"} dicts."""
    png = (folder / "img" / "2.png").read_bytes()
    path = write_jsonl(folder / "rl.jsonl", [
        {"problem": "<image>Find x.", "answer": 3, "images": ["img/1.png"]},
        {"problem": "Is <image> the same as <image>?", "answer": 0.5,
         "images": [{"path": "img/1.png"}, {"bytes": base64.b64encode(png).decode(), "path": None}]},
        {"problem": "How many?", "answer": "4", "images": [{"bytes": "data:image/png;base64,"
                                                           + base64.b64encode(png).decode()}]},
    ])
    improc = ImageProcessor()
    ds = PromptDataset(path, tok, improc)
    assert [r["answer"] for r in ds.records] == ["3", "0.5", "4"]
    # the prompt evaluation would build for the same question, images where the record put them
    instruction = build_prompt({"question": "", "options": []}).strip()
    want = [([IMG, text("Find x.\n" + instruction)], [4]),
            ([text("Is "), IMG, text(" the same as "), IMG, text("?\n" + instruction)], [4, 4]),
            ([IMG, text("How many?\n" + instruction)], [4])]
    for i, (content, pads) in enumerate(want):
        assert ds[i]["input_ids"].tolist() == reference_ids([{"role": "user", "content": content}], pads, True), i
    pv, _ = improc([str(folder / "img" / "1.png"), str(folder / "img" / "2.png")])
    assert torch.equal(ds[1]["pixel_values"], pv)
    sft = SFTDataset(path, tok, improc)  # the same file as SFT data: the answer is the response
    assert sft[0]["input_ids"].tolist() == reference_ids(
        [{"role": "user", "content": [IMG, text("Find x.")]}, {"role": "assistant", "content": "3"}], [4], False)


def test_control_strings_in_a_record_do_not_add_image_slots(folder, tok):
    """A question quoting <|image_pad|> (the crash of "68 image features for 69 tokens")."""
    path = write_jsonl(folder / "q.jsonl", [{"images": ["img/1.png"], "question": "What is <|image_pad|>?",
                                             "response": "A marker.<|im_end|>"}])
    item = SFTDataset(path, tok, ImageProcessor())[0]
    n_features = int(item["image_grid_thw"].prod()) // 4
    assert (item["input_ids"] == tok.image_pad_id).sum() == n_features == 4
    assert (item["input_ids"] == tok.im_end_id).sum() == 3


@pytest.mark.parametrize("record,message", [
    ({"text": "hello"}, r"unknown record form .*expected .*messages.*conversations.*instruction.*question"),
    ({"question": "Q", "response": "A", "images": ["http://example.com/a.png"]}, "download the images first"),
    ({"question": "Q", "response": "A", "images": ["data:image/png,abc"]}, "must be base64"),
    ({"question": "Q", "response": "A", "images": [{"url": "a.png"}]}, "needs `bytes` or `path`"),
    ({"question": "Q", "answer": True}, "string or a number"),
    ({"question": "<image> and <image>", "response": "A", "images": ["a.png"]}, "2 image placeholders but 1 images"),
    ({"messages": [{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}]},
                   {"role": "assistant", "content": "A"}]}, "want type text, image or image_url"),
    ({"instruction": "Q", "output": "A", "history": [["q"]]}, "pairs"),
    ({"messages": [{"role": "user", "content": "<video>Q"}, {"role": "assistant", "content": "A"}],
      "videos": ["a.mp4"]}, "`videos` are not supported"),
])
def test_other_forms_are_refused_naming_file_and_line(tmp_path, tok, record, message):
    lines = [json.dumps({"question": "Q", "response": "A"}), json.dumps(record)]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=message) as e:
        SFTDataset(str(path), tok, ImageProcessor())
    assert f"{path}:2: " in str(e.value)
    arr = write_json(tmp_path / "bad.json", [{"question": "Q", "response": "A"}, record])
    with pytest.raises(DataError, match=message) as e:
        SFTDataset(arr, tok, ImageProcessor())
    assert f"{arr}:" in str(e.value) and "(record 1)" in str(e.value)


def test_json_array_with_byte_order_mark(tmp_path, tok):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([{"question": "Q", "response": "A"}]).encode())
    assert len(SFTDataset(str(path), tok, ImageProcessor())) == 1


def test_broken_json_array_names_the_line(tmp_path, tok):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"question": "Q", "response": "A"},\n  {"question": "Q" "response": "A"}\n]\n')
    with pytest.raises(DataError, match=rf"{path}:3: bad JSON in record 1"):
        SFTDataset(str(path), tok, ImageProcessor())


def test_trl_prompt_completion_records():
    """TRL's prompt-completion forms, conversational (with a vision dataset's `images`) and plain."""
    conv = normalize_record({"prompt": [{"role": "user", "content": [IMG, text("What color?")]}],
                             "completion": [{"role": "assistant", "content": [text("Red.")]}],
                             "images": ["a.png"]}, "/d")
    assert conv.messages == [{"role": "user", "content": [IMG, text("What color?")]},
                             {"role": "assistant", "content": [text("Red.")]}] and conv.images == ["/d/a.png"]
    plain = normalize_record({"prompt": "2+2=", "completion": "4"}, "/d")
    assert plain.messages == [{"role": "user", "content": [text("2+2=")]},
                              {"role": "assistant", "content": [text("4")]}] and plain.images == []


def test_alpaca_record():
    rec = normalize_record({"instruction": "Describe", "input": "<image>", "output": "Noise.",
                            "history": [["Hi", "Hello"]], "images": ["a.png"], "system": "S"}, "/d")
    assert rec.messages == [{"role": "system", "content": [text("S")]},
                            {"role": "user", "content": [text("Hi")]}, {"role": "assistant", "content": [text("Hello")]},
                            {"role": "user", "content": [text("Describe\n"), IMG]},
                            {"role": "assistant", "content": [text("Noise.")]}]
    assert rec.images == ["/d/a.png"]
