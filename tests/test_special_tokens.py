"""train_sft.py --new-special-tokens: the release's `new_special_tokens: <think>,</think>,<answer>,</answer>`.

The base tokenizer here is the byte tokenizer, where `<think>` is seven pieces, as it is several in
Qwen2.5-VL's. Checked against transformers: the tokenizer files as its add_special_tokens +
save_pretrained write them, its AutoTokenizer (and the loader its processor uses) on the saved
folder, its model class on the saved weights; the new rows against LLaMA-Factory's rule (mean of
the old rows plus noise of std 1/sqrt(D), the matrix padded to a multiple of 64).
"""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate as E
import train_grpo as tg
import train_sft
import training
from conftest import make_hf_model
from data import IMAGE, ImageProcessor, SFTDataset, Tokenizer, UserError, collate
from model import from_pretrained
from toy import make_byte_tokenizer

TAGS = ["<think>", "</think>", "<answer>", "</answer>"]
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def make_model_dir(path, vocab, tie=False):
    make_hf_model(tie=tie, layers=2, vision_depth=2, vocab=vocab).save_pretrained(path)
    make_byte_tokenizer(str(path))
    ImageProcessor(max_pixels=112 * 112).save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two model folders (300 embedding rows, room for the tags; 272 rows, too few) and 8 records
    whose responses use the tags, 6 with an image."""
    root = tmp_path_factory.mktemp("tags")
    os.makedirs(root / "img")
    records = []
    for i in range(8):
        rec = {"question": f"Which color {i}?", "response": f"<think>It looks red {i}.</think><answer>red</answer>"}
        if i < 6:
            Image.fromarray(np.full((56, 56, 3), 40 * i, dtype=np.uint8)).save(root / "img" / f"{i}.png")
            rec["image"] = f"img/{i}.png"
        records.append(rec)
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return {"root": root, "data": str(root / "sft.jsonl"), "roomy": make_model_dir(root / "roomy", 300),
            "tight": make_model_dir(root / "tight", 272), "tight_tied": make_model_dir(root / "tight_tied", 272, True)}


def sft(world, model, out, steps=2, *extra):
    return train_sft.main(["--data", world["data"], "--model", model, "--out", str(out), "--batch-size", "4",
                           "--micro-batch", "4", "--max-steps", str(steps), "--lr", "2e-3", "--num-workers", "0",
                           "--dtype", "fp32", "--device", "cpu", "--new-special-tokens", ",".join(TAGS), *extra])


@pytest.fixture(scope="module")
def roomy_run(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("roomy_run")
    return sft(world, world["roomy"], out)


def transformers_saved(src, dst):
    """What transformers writes for the same addition: LLaMA-Factory's call on its tokenizer."""
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(src)
    t.add_special_tokens({"additional_special_tokens": TAGS}, replace_extra_special_tokens=False)
    t.save_pretrained(dst)
    return t


def test_tags_get_new_ids_after_the_last(world):
    tok = Tokenizer(world["roomy"])
    assert all(len(tok.encode(t)) > 1 for t in TAGS)  # several pieces before
    assert tok.add_special_tokens(TAGS) == [270, 271, 272, 273] and tok.vocab_size == 274
    assert [tok.encode(t) for t in TAGS] == [[270], [271], [272], [273]]
    # in record text too (encode_with_offsets), and decoded back by evaluation's decoder
    ids, _ = tok.encode_with_offsets("<think>a</think><answer>b</answer>")
    assert ids[0] == 270 and ids[-1] == 273 and len(ids) == 6
    assert tok.decode_response(ids) == "<think>a</think><answer>b</answer>"
    # adding them again, or a token the tokenizer has, is a no-op: no second id
    assert tok.add_special_tokens(TAGS + ["<|im_end|>"]) == [] and tok.vocab_size == 274
    assert tok.encode("<|im_end|>") == [tok.im_end_id]


def test_empty_token_is_refused(world, tmp_path):
    with pytest.raises(UserError, match="--new-special-tokens '<think>,,</think>': an empty token"):
        train_sft.main(["--data", world["data"], "--model", world["roomy"], "--out", str(tmp_path),
                        "--new-special-tokens", "<think>,,</think>", "--device", "cpu"])


def test_saved_tokenizer_files_are_those_transformers_writes(world, roomy_run, tmp_path):
    from transformers import AutoTokenizer, Qwen2_5_VLProcessor

    ck = roomy_run["checkpoint"]
    ref = transformers_saved(world["roomy"], tmp_path / "ref")
    ours = json.load(open(os.path.join(ck, "tokenizer.json")))["added_tokens"]
    theirs = json.load(open(tmp_path / "ref" / "tokenizer.json"))["added_tokens"]
    assert ours == theirs and [t["id"] for t in ours[-4:]] == [270, 271, 272, 273]
    cfg = json.load(open(os.path.join(ck, "tokenizer_config.json")))
    assert cfg["extra_special_tokens"] == json.load(open(tmp_path / "ref" / "tokenizer_config.json"))["extra_special_tokens"]
    ours_tok = Tokenizer(ck)
    loaded = AutoTokenizer.from_pretrained(ck)
    # AutoProcessor's tokenizer is loaded by this classmethod (building the processor itself needs
    # torchvision for its video processor)
    proc_tok = Qwen2_5_VLProcessor._load_tokenizer_from_pretrained("tokenizer", ck)
    for t in loaded, proc_tok:
        assert [t.encode(x, add_special_tokens=False) for x in TAGS] == [[ours_tok.tok.token_to_id(x)] for x in TAGS]
        assert t.extra_special_tokens == ref.extra_special_tokens == TAGS
        text = "<think>it is red</think><answer>red</answer>"
        assert t.encode(text, add_special_tokens=False) == ours_tok.encode(text)
        assert t.decode(ours_tok.encode(text), skip_special_tokens=True) == "it is redred"  # special, as LF makes them


def test_qwen_style_tokenizer_config_keeps_its_names(world, tmp_path):
    """A 4.x-written tokenizer_config.json (Qwen's on the hub: additional_special_tokens and
    added_tokens_decoder) gets the tags under those names, and transformers reads them as it reads
    its own save."""
    from transformers import AutoTokenizer

    src = tmp_path / "qwen_style"
    shutil.copytree(world["roomy"], src)
    added = json.load(open(src / "tokenizer.json"))["added_tokens"]
    json.dump({"added_tokens_decoder": {str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip",
                                                                        "single_word", "special")} for t in added},
               "additional_special_tokens": [t["content"] for t in added[1:]], "eos_token": "<|im_end|>",
               "pad_token": "<|endoftext|>", "model_max_length": 32768, "tokenizer_class": "Qwen2Tokenizer",
               "split_special_tokens": False}, open(src / "tokenizer_config.json", "w"))
    json.dump({t["content"]: t["id"] for t in added}, open(src / "added_tokens.json", "w"))
    tok = Tokenizer(str(src))
    tok.add_special_tokens(TAGS)
    dst = tmp_path / "dst"
    os.makedirs(dst)
    from hub import read_hub_files, write_hub_files
    write_hub_files(read_hub_files(str(src)), str(dst), tokenizer=tok)
    cfg = json.load(open(dst / "tokenizer_config.json"))
    assert cfg["additional_special_tokens"][-4:] == TAGS and "extra_special_tokens" not in cfg
    assert [cfg["added_tokens_decoder"][str(i)]["content"] for i in range(270, 274)] == TAGS
    assert json.load(open(dst / "added_tokens.json"))["</answer>"] == 273
    ref = transformers_saved(str(src), tmp_path / "ref")
    loaded = AutoTokenizer.from_pretrained(dst)
    assert loaded.extra_special_tokens == ref.extra_special_tokens and loaded.all_special_ids == ref.all_special_ids
    assert [loaded.convert_tokens_to_ids(t) for t in TAGS] == [270, 271, 272, 273]


def test_roomy_embedding_is_not_grown_and_loads_in_transformers(world, roomy_run):
    from transformers import Qwen2_5_VLForConditionalGeneration

    ck = roomy_run["checkpoint"]
    ours = from_pretrained(ck, dtype=torch.float32).eval()
    assert ours.cfg.vocab_size == 300  # 274 tokens fit the 300 rows: nothing grows
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(ck, dtype=torch.float32).eval()
    assert hf.get_input_embeddings().weight.shape[0] == 300
    tok, proc = Tokenizer(ck), ImageProcessor.from_pretrained(ck)
    ds = SFTDataset(world["data"], tok, proc)
    b = collate([ds[0], ds[7]], tok.pad_id)
    assert (b["labels"] == 270).sum() == 2 and (b["input_ids"] == 273).sum() == 2  # one id per tag in each
    with torch.no_grad():
        a = ours(b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_grid_thw"])
        r = hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"],
               image_grid_thw=b["image_grid_thw"], mm_token_type_ids=(b["roles"] == IMAGE).int()).logits
    m = b["attention_mask"].bool()
    assert (a[m] - r[m]).abs().max() < 1e-4


@pytest.mark.parametrize("tied", [False, True])
def test_grown_rows_are_noisy_means_of_the_old_ones(world, tied):
    src = world["tight_tied" if tied else "tight"]
    tok = Tokenizer(src)
    tok.add_special_tokens(TAGS)  # 274 tokens, 272 rows
    base = from_pretrained(src, dtype=torch.float32)
    model = training.load_for_training(src, tok, torch.device("cpu"), False, False, seed=3)
    assert model.cfg.vocab_size == 320  # 274 rounded up to a multiple of 64, as LLaMA-Factory pads
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        w, w0 = dict(model.named_parameters(remove_duplicate=False))[name], dict(base.named_parameters(
            remove_duplicate=False))[name]
        assert w.shape == (320, 64) and torch.equal(w[:272], w0)
        dev = w[272:] - w0.mean(0)  # 48 x 64 draws of noise
        assert abs(dev.mean().item()) < 0.01 and dev.std().item() == pytest.approx(1 / 8, rel=0.06)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    if not tied:  # two draws, not one copied
        assert not torch.equal(model.lm_head.weight[272:], model.model.embed_tokens.weight[272:])
    again = training.load_for_training(src, tok, torch.device("cpu"), False, False, seed=3)
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)  # the same on every process



def test_folder_whose_tokenizer_outgrows_its_model_is_still_refused(world, tmp_path):
    from tokenizers import AddedToken, Tokenizer as HFTokenizer

    bad = tmp_path / "bad"
    shutil.copytree(world["tight"], bad)
    hf = HFTokenizer.from_file(str(bad / "tokenizer.json"))
    hf.add_special_tokens([AddedToken(t, special=True) for t in ("<a>", "<b>", "<c>")])  # 273 > 272 rows
    hf.save(str(bad / "tokenizer.json"))
    tok = Tokenizer(str(bad))
    tok.add_special_tokens(TAGS)
    with pytest.raises(UserError, match="the tokenizer has 273 tokens, the model's embedding 272"):
        training.load_for_training(str(bad), tok, torch.device("cpu"), False, False)


def test_grown_checkpoint_loads_in_transformers_and_grpo_and_evaluate_read_the_tags(world, tmp_path):
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    res = sft(world, world["tight"], tmp_path / "sft")
    ck = res["checkpoint"]
    assert json.load(open(os.path.join(ck, "config.json")))["vocab_size"] == 320
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(ck, dtype=torch.float32).eval()
    ours = from_pretrained(ck, dtype=torch.float32).eval()
    ids = torch.tensor([AutoTokenizer.from_pretrained(ck).encode("<think>hi</think><answer>1</answer>")])
    assert ids.tolist()[0] == Tokenizer(ck).encode("<think>hi</think><answer>1</answer>")
    with torch.no_grad():
        assert (ours(ids, torch.ones_like(ids)) - hf(input_ids=ids).logits).abs().max() < 1e-4
    # GRPO from it: the tags are single ids in its prompts and rewards, and its checkpoint keeps them
    rl = tmp_path / "rl.jsonl"
    rl.write_text(json.dumps({"image": str(world["root"] / "img" / "0.png"), "question": "Which?", "answer": "red"})
                  + "\n" + json.dumps({"question": "2+3?", "answer": "5"}) + "\n")
    g = tg.main(["--data", str(rl), "--model", str(tmp_path / "sft"), "--out", str(tmp_path / "grpo"),
                 "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "3", "--max-steps", "1",
                 "--device", "cpu", "--dtype", "fp32"])
    assert [Tokenizer(g["checkpoint"]).encode(t) for t in TAGS] == [[270], [271], [272], [273]]
    # evaluation on it: prompts built and responses decoded with the tags
    bench = tmp_path / "b.jsonl"
    bench.write_text(json.dumps({"id": "0", "images": [str(world["root"] / "img" / "1.png")], "question": "Which?",
                                 "answer": "red"}) + "\n")
    E.main(["--model", g["checkpoint"], "--bench", str(bench), "--out", str(tmp_path / "eval"),
            "--max-new-tokens", "2", "--no-progress", "--device", "cpu", "--no-vas"])
    (row,) = [json.loads(line) for line in open(tmp_path / "eval" / "predictions" / "b__base.jsonl")]
    assert row["new_tokens"] >= 1
