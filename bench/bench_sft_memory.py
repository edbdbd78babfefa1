"""Peak memory of one SFT training step with AVAR's attention-guided objective, against two baselines.

    python bench/bench_sft_memory.py [--tokens 2048 --hidden 1024 --layers 6 --heads 8 --device auto]

One sequence of --tokens tokens (system turn, two images, a question, a long response), the same
random weights in all three, each measured in a fresh subprocess (forward + backward, gradients
kept; no optimizer step, which costs the same in all three):

  sft       train_sft.forward_backward, LM loss only (SDPA attention, logits in chunks)
  avar      the same + vas.AttentionGuidedLoss (eq. 4b over all layers): attention of the query
            rows recomputed in chunks, again in backward; no T x T matrix kept
  hf_eager  transformers, attn_implementation="eager", output_attentions=True: the same loss
            (LM loss by the same chunked head, L_enhance and L_suppress summed from the returned
            full attention matrices), which keeps every layer's (H, T, T) probabilities

Memory: on CUDA torch.cuda.max_memory_allocated; on CPU the process's peak resident set (VmHWM,
reset through /proc/self/clear_refs just before the step). Reported: the peak during the step, and
the step's part (peak minus what was resident before it: weights, batch). Targets: avar / sft
<= 1.3 on the peak. The three losses are printed too: avar and hf_eager compute the same number.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(1, os.path.join(ROOT, "experiments"))  # the byte tokenizer of the toy world

IMG, VS, VE = 268, 265, 266  # the byte tokenizer's special ids (experiments/toy.py's make_byte_tokenizer)


def build(args, path):
    """Random model in the hub layout (transformers writes it), byte tokenizer, one batch."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from data import ImageProcessor, Tokenizer, collate, encode_chat
    from toy import make_byte_tokenizer

    head_dim = args.hidden // args.heads
    text = dict(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                max_position_embeddings=8192, bos_token_id=256, eos_token_id=258,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                 "mrope_section": [head_dim // 8, head_dim * 3 // 16, head_dim * 3 // 16]})
    vision = dict(depth=args.vision_depth, hidden_size=args.vision_hidden, num_heads=args.vision_hidden // 64,
                  intermediate_size=args.vision_hidden * 3, fullatt_block_indexes=[args.vision_depth - 1],
                  out_hidden_size=args.hidden, window_size=112)
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=IMG, video_token_id=269,
                           vision_start_token_id=VS, vision_end_token_id=VE)
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration._from_config(cfg, dtype=torch.float32).save_pretrained(path)
    make_byte_tokenizer(path)

    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (args.image_side, args.image_side, 3), dtype=np.uint8))
              for _ in range(2)]
    tok = Tokenizer(path)
    pv, grid = ImageProcessor(max_pixels=args.image_side ** 2)(images)
    n_img = (grid.prod(-1) // 4).tolist()
    user = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare the two figures and solve."}]
    prompt = len(encode_chat(tok, [{"role": "user", "content": user}, {"role": "assistant", "content": ""}],
                             n_img)["input_ids"])
    words = " ".join(["looking back at the image, the triangle"] * (args.tokens // 8))
    reply = words[: args.tokens - prompt]  # byte tokenizer: one token per ASCII character
    enc = encode_chat(tok, [{"role": "user", "content": user}, {"role": "assistant", "content": reply}], n_img)
    assert len(enc["input_ids"]) == args.tokens, len(enc["input_ids"])
    batch = collate([dict(enc, pixel_values=pv, image_grid_thw=grid)], tok.pad_id)
    torch.save(batch, os.path.join(path, "batch.pt"))
    return batch


def resident():
    with open("/proc/self/status") as f:
        d = dict(l.split(":", 1) for l in f)
    return int(d["VmRSS"].split()[0]) * 1024, int(d["VmHWM"].split()[0]) * 1024


def reset_peak(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    import gc
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak resident set to the current one
        f.write("5")
    return resident()[0]


def peak(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return resident()[1]


def attention_terms_from_full(attentions, roles, eps=1e-6):
    """Eq. 4b from full attention matrices [(B, H, T, T)] per layer: L_enhance, L_suppress of one sample."""
    from data import IMAGE, SYSTEM
    from vas import query_mask
    q = query_mask(roles, "user").float()  # (B, T)
    kv, ks = (roles == IMAGE).float(), (roles == SYSTEM).float()
    enh, sup = 0.0, 0.0
    for a in attentions:
        a = a.float()
        mass_v = (a * kv[:, None, None, :]).sum(-1)  # (B, H, T): attention of each query on the image
        mass_s = (a * ks[:, None, None, :]).sum(-1)
        mean_v = (mass_v * q[:, None]).sum(-1) / (q.sum(-1) * kv.sum(-1))[:, None]  # (B, H)
        mean_s = (mass_s * q[:, None]).sum(-1) / (q.sum(-1) * ks.sum(-1))[:, None]
        enh = enh - torch.log(mean_v).mean(-1)
        sup = sup + torch.log(mean_s + eps).mean(-1)
    return enh.sum() / len(attentions), sup.sum() / len(attentions)


def worker(mode, path, device, dtype_name):
    import train_sft
    import vas

    dev = torch.device(device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    batch = torch.load(os.path.join(path, "batch.pt"))
    b = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    alpha = beta = 0.15
    n_tok = int((b["labels"][:, 1:] != -100).sum())
    if mode in ("sft", "avar"):
        from model import from_pretrained
        model = from_pretrained(path, dtype=dtype, device=dev).train()
        factory = vas.AttentionGuidedLoss if mode == "avar" else None
        before = reset_peak(dev)
        t0 = time.time()
        r = train_sft.forward_backward(model, [b], alpha if factory else 0.0, beta if factory else 0.0, factory,
                                       2048, dev)
        loss, lm = r["loss"], r["lm_loss"]
    else:
        from transformers import Qwen2_5_VLForConditionalGeneration
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=dtype, attn_implementation="eager")
        model = model.to(dev).train()
        with torch.no_grad():  # own the weights (a loader may leave them mapped from the file): same baseline
            for prm in model.parameters():
                prm.data = prm.data.clone()
        before = reset_peak(dev)
        t0 = time.time()
        out = model.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"],
                          image_grid_thw=b["image_grid_thw"], mm_token_type_ids=(b["input_ids"] == IMG).int(),
                          output_attentions=True)
        assert out.attentions is not None and len(out.attentions) == model.config.text_config.num_hidden_layers
        lm_sum = train_sft.chunked_cross_entropy(out.last_hidden_state, model.lm_head.weight, b["labels"], 2048)
        enh, sup = attention_terms_from_full(out.attentions, b["roles"])
        total = lm_sum / n_tok + alpha * enh + beta * sup
        total.backward()
        loss, lm = float(total), float(lm_sum) / n_tok
    top = peak(dev)
    print(json.dumps(dict(mode=mode, before=before, peak=top, step=top - before, loss=loss, lm_loss=lm,
                          seconds=time.time() - t0)))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--vision-hidden", type=int, default=256)
    p.add_argument("--vision-depth", type=int, default=4)
    p.add_argument("--image-side", type=int, default=448, help="two images of this side: (side/28)^2 tokens each")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--path", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if args.worker:
        return worker(args.worker, args.path, device, args.dtype)

    print(f"config: {vars(args)}  device={device}")
    with tempfile.TemporaryDirectory() as path:
        batch = build(args, path)
        roles = batch["roles"][0]
        print(f"sequence: {args.tokens} tokens, {int((roles == 1).sum())} image, {int((roles == 0).sum())} system, "
              f"{int((batch['labels'] != -100).sum())} response")
        res = {}
        for mode in ("sft", "avar", "hf_eager"):
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", mode, "--path", path, "--device", device,
                   "--dtype", args.dtype]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(f"{mode} failed:\n{out.stderr[-3000:]}")
            res[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    gib = 2 ** 30
    print(f"{'mode':10s} {'before step':>12s} {'peak':>10s} {'step part':>10s} {'loss':>10s} {'lm loss':>9s} {'time':>7s}")
    for mode, r in res.items():
        print(f"{mode:10s} {r['before'] / gib:10.3f}G {r['peak'] / gib:9.3f}G {r['step'] / gib:9.3f}G "
              f"{r['loss']:10.5f} {r['lm_loss']:9.5f} {r['seconds']:6.1f}s")
    s, a, h = res["sft"], res["avar"], res["hf_eager"]
    print(f"peak ratio avar / sft      = {a['peak'] / s['peak']:.3f}  (target <= 1.3)   step part {a['step'] / s['step']:.3f}")
    print(f"peak ratio hf_eager / avar = {h['peak'] / a['peak']:.3f}                    step part {h['step'] / a['step']:.3f}")
    print(f"loss avar {a['loss']:.6f} vs hf_eager {h['loss']:.6f} (same objective, |diff| {abs(a['loss'] - h['loss']):.2e})")


if __name__ == "__main__":
    main()
