"""Shared fixtures: tiny random Qwen2.5-VL checkpoints written by transformers (the reference)."""

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(1, os.path.join(ROOT, "experiments"))  # the toy world: `import toy`

# Tiny token ids (the real ones are 151643..; a tiny vocabulary keeps the same names).
TINY_IDS = dict(bos_token_id=256, eos_token_id=258, image_token_id=268, video_token_id=269,
                vision_start_token_id=265, vision_end_token_id=266)


def tiny_hf_config(tie=False, vision_depth=4, layers=3, vocab=300, nested=False):
    from transformers import Qwen2_5_VLConfig

    text = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6},
                tie_word_embeddings=tie, **{k: v for k, v in TINY_IDS.items() if k in ("bos_token_id", "eos_token_id")})
    vision = dict(depth=vision_depth, hidden_size=32, num_heads=2, intermediate_size=48, patch_size=14,
                  temporal_patch_size=2, spatial_merge_size=2, window_size=112,
                  fullatt_block_indexes=[1, 3], in_channels=3, out_hidden_size=64)
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie,
                           image_token_id=TINY_IDS["image_token_id"], video_token_id=TINY_IDS["video_token_id"],
                           vision_start_token_id=TINY_IDS["vision_start_token_id"],
                           vision_end_token_id=TINY_IDS["vision_end_token_id"])
    return cfg


def make_hf_model(tie=False, seed=0, **kw):
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    cfg = tiny_hf_config(tie=tie, **kw)
    m = Qwen2_5_VLForConditionalGeneration._from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
    # random init of transformers leaves norms at 1 and biases at 0: perturb everything so a
    # swapped or skipped weight cannot hide
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


@pytest.fixture(scope="session")
def hf_untied(tmp_path_factory):
    m = make_hf_model(tie=False)
    d = tmp_path_factory.mktemp("untied")
    m.save_pretrained(d)
    return m, str(d)


@pytest.fixture(scope="session")
def hf_tied(tmp_path_factory):
    m = make_hf_model(tie=True, seed=1)
    d = tmp_path_factory.mktemp("tied")
    m.save_pretrained(d)
    return m, str(d)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine they lose a lot:
    a module that asks for it (pytestmark) runs on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tensorboard_events(folder):
    """TensorBoard's own reader over the event files of `folder`: ({tag: [(step, value)]}, its
    hparams plugin data as {tag: HParamsPluginData})."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    ea = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    ea.Reload()
    scalars = {t: [(e.step, e.value) for e in ea.Scalars(t)] for t in ea.Tags()["scalars"]}
    hparams = {t: HParamsPluginData.FromString(c) for t, c in ea.PluginTagToContent("hparams").items()}
    return scalars, hparams


def assert_scalars_are_metrics(scalars, rows):
    """Every number of every metrics.jsonl row at its step, once, as float32 (TensorBoard's type),
    and nothing else (booleans as 0 / 1; None, text and lists are not scalars)."""
    import numpy as np

    expected = {}
    for row in rows:
        for k, v in row.items():
            if k != "step" and isinstance(v, (bool, int, float)):
                expected.setdefault(k, []).append((row["step"], float(np.float32(v))))
    assert sorted(scalars) == sorted(expected)
    for k in expected:
        assert scalars[k] == expected[k], k
