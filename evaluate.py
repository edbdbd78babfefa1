"""Benchmark evaluation of the Qwen2.5-VL / AVAR models: accuracy, VAS, intervention sweeps.

Benchmark files are read by benchmarks.py (VLMEvalKit TSV and the project's jsonl; its docstring
describes the records) and answers graded by grading.py (extract_answer, grade, format_ok; its
docstring has the rules). read_benchmark and grade are re-exported here. This file holds:

  evaluate_benchmark(model, tok, proc, records, out_path, weights=..., setting=Setting(), ...) -> row
  evaluate(model, tok, proc, benchmarks, out_dir, settings, weights=..., ...) -> rows; summary.md/.json
  correlate(paths) -> {"r", "p", "n", "files"}: Pearson r between mean VAS and accuracy

Each batch of questions is encoded, answered by batched generation (KV cache, the intervention
`Setting` in every decode step: attention logits to image keys times (1 + a_img), to system keys
times (1 - a_sys), method section 3), its prompts measured for VAS (vas.py, equation 1; bands by
vas.band: "narrow" < 10 <= "wide" <= 15 < "panoramic"), and graded. Across checkpoints, correlate
gives Pearson r between mean VAS and accuracy, with its p-value from Student's t.

Predictions file out/predictions/<benchmark>__<setting>.jsonl, one line per question:
  {"id", "benchmark", "weights": {folder, sha256} (the checkpoint that answered: hub.model_identity),
   "setting": {a_img, a_sys, layers}, "config": {max_new_tokens, temperature,
   top_p, seed, min_pixels, max_pixels, vas, vas_layers}, "answer" (gold), "answer_type", "response",
   "extracted", "correct", "stopped" (ended on a stop token rather than at max_new_tokens),
   "new_tokens", "prompt_tokens", "vas", "vas_per_layer" (VAS of each layer in "vas_layers"),
   and "groups" (the record's category / task / skills) where the benchmark has them}
VAS is null for a prompt it does not count (no image or no system turn); "answer" and "correct"
are null on a test split without answers (predicted, not scored).
Beside it, <benchmark>__<setting>.tsv: the VLMEvalKit-style table (index, question, answer,
prediction, hit, extracted), rewritten when the benchmark is done.
Lines are appended and flushed batch by batch. A rerun skips the ids already in the file when they
were made by the same weights (the same sha256 fingerprint, wherever the folder now is), setting and
config; the half-written last line a crash may leave is cut off and redone. A file made by other
weights (another checkpoint, or a run folder whose `latest` has moved on), another setting or
config is refused before anything is generated or written, rather than mixed: one error naming it.
summary.md / summary.json name the checkpoint of every row; summary.json also holds the command
line, config and provenance (provenance.py: weights, code version, torch, device, dtype, threads).

Run:

    python evaluate.py --model DIR --bench MathVista_MINI.tsv my.jsonl --out results/
    python evaluate.py --model DIR --bench b.tsv --out sweep/ --a-img 0 0.15 --a-sys 0 0.05 0.4
    python evaluate.py --correlate ckpt1/predictions/*.jsonl ckpt2/predictions/*.jsonl --out corr/
"""

import argparse
import csv
import dataclasses
import json
import math
import os
from pathlib import Path

import torch

from benchmarks import IMAGE_ERRORS, encode_record, read_benchmark, read_benchmark_file
from data import PAD_ROLE, DataError, ImageProcessor, Tokenizer, UserError, run_cli
from grading import extract_answer, grade
from hub import check_model_folder
from model import from_pretrained
from provenance import provenance
from release import read_format_prompt
from vas import Intervention, band, measure_vas, parse_layers, pearson
from vas import vas as vas_of_stats

# ---- evaluation loop ----

@dataclasses.dataclass(frozen=True)
class Setting:
    """The training-free intervention (method section 3): logits to image keys times (1 + a_img),
    to system keys times (1 - a_sys), in `layers` (None: all). a_img = a_sys = 0 is the model as is."""
    a_img: float = 0.0
    a_sys: float = 0.0
    layers: tuple[int, ...] | None = None

    @property
    def active(self) -> bool:
        return self.a_img != 0 or self.a_sys != 0

    @property
    def tag(self) -> str:
        """File-name tag: "base", or e.g. "aimg0.15_asys0.05" (+ "_L0-1-2" for chosen layers)."""
        if not self.active:
            return "base"
        tag = f"aimg{self.a_img:g}_asys{self.a_sys:g}"
        return tag + ("_L" + "-".join(map(str, self.layers)) if self.layers is not None else "")

    def to_dict(self) -> dict:
        return {"a_img": self.a_img, "a_sys": self.a_sys,
                "layers": list(self.layers) if self.layers is not None else None}


def _concat_images(encs: list[dict]):
    pv = [e["pixel_values"] for e in encs if e["pixel_values"] is not None]
    grids = [e["image_grid_thw"] for e in encs if e["image_grid_thw"] is not None]
    return (torch.cat(pv), torch.cat(grids)) if pv else (None, None)


# ---- VAS and the intervention (vas.py) ----

def _ctl_factory(encs: list[dict], setting: Setting):
    """attn_ctl_factory for model.generate: the intervention over the left-padded prompt keys (roles
    from encode_chat) and the generated keys (RESPONSE)."""
    return Intervention.for_generation([e["roles"] for e in encs], setting.a_img, setting.a_sys, setting.layers)


def _nan_to_none(x: float):
    return None if x != x else float(x)


def _measure_vas(model, encs: list[dict], setting: Setting, layers=None) -> list[tuple]:
    """(VAS, per-layer VAS list, layer ids) of each prompt, by vas.measure_vas in one no-grad
    forward over the right-padded batch, user-turn queries (Q = U + V), under the same intervention as
    generation. (None, None, None) for a prompt that VAS does not count (no image or no system turn)."""
    dev = next(model.parameters()).device
    B, T = len(encs), max(len(e["input_ids"]) for e in encs)
    ids = torch.zeros(B, T, dtype=torch.long)  # the pad id is never read: attention_mask is 0 there
    mask = torch.zeros(B, T, dtype=torch.long)
    roles = torch.full((B, T), PAD_ROLE, dtype=torch.long)
    for b, e in enumerate(encs):
        n = len(e["input_ids"])
        ids[b, :n], roles[b, :n], mask[b, :n] = e["input_ids"], e["roles"], 1
    pv, grids = _concat_images(encs)
    batch = {"input_ids": ids.to(dev), "attention_mask": mask.to(dev), "roles": roles.to(dev),
             "pixel_values": pv.to(dev) if pv is not None else None,
             "image_grid_thw": grids.to(dev) if grids is not None else None}
    interv = Intervention(batch["roles"], setting.a_img, setting.a_sys, setting.layers) if setting.active else None
    res = measure_vas(model, batch, "user", layers, interv)
    # per sample and layer: VAS restricted to one recorded layer (vas.vas on the same masses)
    per_layer = torch.stack([vas_of_stats(res.stats, layers=[l]).per_sample for l in res.layers], 1)  # (B, L)
    out = []
    for b in range(B):
        if not bool(res.counted[b]):
            out.append((None, None, None))
        else:
            out.append((_nan_to_none(float(res.per_sample[b])), [_nan_to_none(float(v)) for v in per_layer[b]],
                        list(res.layers)))
    return out


# ---- the predictions file ----

def read_predictions(path: str | Path, repair: bool = False) -> list[dict]:
    """The records of a predictions jsonl. A last line that is cut short (no newline, or not valid
    JSON: a crash during the write) is ignored, and with `repair` removed from the file so that
    appending can continue. A bad line anywhere else is a UserError naming file and line."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    good_end, preds = 0, []  # byte offset just after the last good line
    offset = 0
    for n, line in enumerate(lines, 1):
        last = n == len(lines) or (n == len(lines) - 1 and lines[-1] == b"")
        end = offset + len(line) + (1 if n < len(lines) else 0)
        if line.strip():
            try:
                obj = json.loads(line.decode("utf-8"))
                if not isinstance(obj, dict) or "id" not in obj:
                    raise ValueError("not a prediction record")
                if n == len(lines):  # complete JSON but no newline: the write may have stopped there
                    raise ValueError("no newline")
            except (ValueError, UnicodeDecodeError) as e:
                if not last:
                    raise UserError(f"{path}: line {n}: bad prediction record ({e})") from None
                break
            preds.append(obj)
        good_end = end
        offset = end
    if repair and good_end < len(data):
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return preds


def _short(weights) -> str:
    """A checkpoint as tables and messages name it: its folder and the first 12 hex digits of its
    fingerprint ("-" for predictions that do not name their weights)."""
    if not isinstance(weights, dict):
        return "-"
    return f"{weights.get('folder')} (sha256 {str(weights.get('sha256'))[:12]})"


def _check_same_run(path, pred: dict, weights: dict, setting: dict, config: dict) -> None:
    """A UserError unless prediction `pred` of file `path` was made by the same weights (fingerprint),
    setting and config as this run."""
    again = f"choose another --out folder, or delete {path} to start afresh"
    was = pred.get("weights")
    if not isinstance(was, dict) or was.get("sha256") != weights["sha256"]:
        made = (f"by the weights of {_short(was)}" if isinstance(was, dict)
                else "by weights it does not name (an older evaluate.py)")
        raise UserError(f"{path}: id {pred.get('id')!r} was made {made}; this run evaluates {_short(weights)}: "
                        f"{again}")
    for key, want in (("setting", setting), ("config", config)):
        if pred.get(key) != want:
            raise UserError(f"{path}: id {pred.get('id')!r} was made with {key} {pred.get(key)}, this run "
                            f"uses {want}: {again}")


# ---- the sweep, and one benchmark in batches ----

def evaluate(model, tok: Tokenizer, proc: ImageProcessor, benchmarks, out_dir: str | Path,
             settings=(Setting(),), limit: int | None = None, info: dict | None = None, **kw) -> list[dict]:
    """Every benchmark under every intervention setting (a sweep: one predictions file each); writes
    out_dir/summary.md and out_dir/summary.json ({"rows", **info}: main() puts the config and
    provenance there) and returns the rows. `kw` goes to evaluate_benchmark (`weights` included).
    benchmarks: file paths, or record lists already read by read_benchmark. All benchmark files are
    read, and all predictions files already in out_dir checked, before the first generation."""
    out_dir = Path(out_dir)
    benches = []
    for bench in benchmarks:
        records = bench if isinstance(bench, list) else read_benchmark(bench)
        if not records:
            raise UserError(f"{bench if not isinstance(bench, list) else 'a benchmark record list'}: no questions")
        name = records[0]["benchmark"]
        if name in [b[0] for b in benches]:
            raise UserError(f"{bench if not isinstance(bench, list) else name}: a second benchmark named "
                             f"{name!r} (predictions files are named by the file stem)")
        benches.append((name, records[:limit] if limit is not None else records))
    jobs = [(setting, records, out_dir / "predictions" / f"{name}__{setting.tag}.jsonl")
            for setting in settings for name, records in benches]
    for setting, records, path in jobs:  # another model's (or setting's) file: refused before any write
        evaluate_benchmark(model, tok, proc, records, path, setting=setting, check_only=True, **kw)
    rows = []
    write_summary(rows, out_dir, info)
    for setting, records, path in jobs:
        rows.append(evaluate_benchmark(model, tok, proc, records, path, setting=setting, **kw))
        rows[-1]["setting_detail"] = setting.to_dict()
        write_summary(rows, out_dir, info)  # after each file, so an interrupted sweep keeps its table
    return rows


def evaluate_benchmark(model, tok: Tokenizer, proc: ImageProcessor, records: list[dict], out_path: str | Path, *,
                       weights: dict, setting: Setting = Setting(), batch_size: int = 8, max_new_tokens: int = 512,
                       temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, vas: bool = True,
                       vas_layers=None, progress: bool = True, on_batch=None, compile: bool = False,
                       skip_bad: bool = False, format_prompt=None, check_only: bool = False) -> dict | None:
    """Answer `records` (one benchmark) with `model` and grade them; returns the summary row.

    `weights` names the checkpoint `model` holds ({"folder", "sha256"}: hub.model_identity of the
    folder it was loaded from); every prediction carries it. Predictions go to `out_path` (a jsonl,
    appended batch by batch; ids already there, made by the same weights, setting and config, are
    skipped; a file made otherwise is a UserError). check_only: that check alone, nothing written.
    Each batch: encode the prompts, generate (KV cache, intervention `setting` in every decode step),
    measure VAS on the prompts (user-turn queries, the same intervention) unless `vas` is False, and
    grade. Sampling (temperature > 0) draws from seed + the batch's first record index, so a resumed
    run repeats the batches it had not finished. on_batch(preds) is called after each batch is written.

    format_prompt (release.FormatPrompt): EasyR1's jinja renders the question (data.build_prompt).
    A question whose image passed the reader's check but does not decode (a truncated file) stops
    the run with DataError naming it (the predictions written so far are kept, a rerun continues);
    with skip_bad it is left out, logged and counted in the row's "skipped" (a rerun tries it again).
    """
    out_path = Path(out_path)
    weights = {"folder": weights["folder"], "sha256": weights["sha256"]}
    config = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "seed": seed,
              "min_pixels": proc.min_pixels, "max_pixels": proc.max_pixels, "vas": vas,
              "vas_layers": sorted(int(l) for l in vas_layers) if vas_layers is not None else None,
              "format_prompt": format_prompt.source if format_prompt is not None else None}
    done = _resume(out_path, records, weights, setting, config, repair=not check_only)  # id -> prediction
    if check_only:
        return None
    out_path.parent.mkdir(parents=True, exist_ok=True)
    todo = [(i, r) for i, r in enumerate(records) if r["id"] not in done]
    bar = _progress_bar(records, todo, out_path, setting) if progress else None
    log = bar.write if bar is not None else print
    skipped = []
    with open(out_path, "a", encoding="utf-8") as f:
        for start in range(0, len(todo), batch_size):
            chunk, encs, bad = _encode_batch(tok, proc, todo[start:start + batch_size], out_path, skip_bad,
                                             format_prompt)
            for rid, err in bad:
                skipped.append(rid)
                log(f"skipped (--skip-bad): {err}")
                if bar is not None:
                    bar.update(1)
            if not chunk:
                continue
            outs = _generate(model, tok, encs, setting, seed=seed + chunk[0][0], max_new_tokens=max_new_tokens,
                             temperature=temperature, top_p=top_p, compile=compile)
            vas_values = _measure_vas(model, encs, setting, vas_layers) if vas else [(None, None, None)] * len(encs)
            preds = [_prediction(tok, rec, enc, out, v, weights, setting, config)
                     for (_, rec), enc, out, v in zip(chunk, encs, outs, vas_values)]
            _append(f, preds)
            done.update((p["id"], p) for p in preds)
            if bar is not None:
                bar.update(len(preds))
            if on_batch is not None:
                on_batch(preds)
    if bar is not None:
        bar.close()
    kept = [r for r in records if r["id"] in done]  # a question skipped under skip_bad has no prediction
    write_prediction_table(kept, [done[r["id"]] for r in kept], out_path.with_suffix(".tsv"))
    row = summarize([done[r["id"]] for r in kept])
    row.update(benchmark=records[0].get("benchmark") if records else out_path.stem, setting=setting.tag,
               weights=weights, predictions=str(out_path), skipped=len(skipped))
    return row


def _resume(out_path: Path, records: list[dict], weights: dict, setting: Setting, config: dict,
            repair: bool = True) -> dict:
    """{id: prediction} of the predictions already in out_path (with `repair`, a cut last line is
    removed), each checked to come from these weights, this setting and config."""
    ids = [r["id"] for r in records]
    if len(set(ids)) != len(ids):
        raise UserError(f"{out_path}: the records repeat ids")
    done = {}
    for p in read_predictions(out_path, repair=repair):
        _check_same_run(out_path, p, weights, setting.to_dict(), config)
        done[p["id"]] = p
    return done


def _progress_bar(records: list[dict], todo: list, out_path: Path, setting: Setting):
    from tqdm import tqdm  # imported only when a bar is shown

    name = records[0].get("benchmark", out_path.stem) if records else out_path.stem
    return tqdm(total=len(records), initial=len(records) - len(todo), desc=f"{name} [{setting.tag}]",
                unit="q", dynamic_ncols=True)


def _encode_batch(tok: Tokenizer, proc: ImageProcessor, batch: list, out_path: Path, skip_bad: bool,
                  format_prompt=None):
    """Encode: the (index, record) pairs of `batch` whose images decode, their encodings
    (encode_record), and (id, message) of those that do not (DataError unless skip_bad)."""
    chunk, encs, bad = [], [], []
    for i, rec in batch:
        try:
            encs.append(encode_record(tok, proc, rec, format_prompt))
            chunk.append((i, rec))
        except IMAGE_ERRORS as e:
            files = ", ".join(str(p) for p in rec["images"] if isinstance(p, Path)) or "base64 cell"
            err = f"{rec.get('benchmark')}: id {rec['id']!r}: cannot decode image ({files}): {e}"
            if not skip_bad:
                raise DataError(f"{err}; the predictions so far are kept in {out_path} (a rerun "
                                f"continues; --skip-bad skips such questions)") from None
            bad.append((rec["id"], err))
    return chunk, encs, bad


def _generate(model, tok: Tokenizer, encs: list[dict], setting: Setting, *, seed: int, max_new_tokens: int,
              temperature: float, top_p: float, compile: bool) -> list[list[int]]:
    """Generate: each prompt's new token ids (up to and including its stop token), by
    model.generate under the intervention `setting`."""
    pixel_values, grids = _concat_images(encs)
    dev = next(model.parameters()).device
    if pixel_values is not None:
        pixel_values, grids = pixel_values.to(dev), grids.to(dev)
    gen_kw = {"compile": True} if compile else {}  # model.generate's compiled decode step (GPU)
    tokens, lengths = model.generate(
        [e["input_ids"] for e in encs], pixel_values, grids, max_new_tokens=max_new_tokens,
        temperature=temperature, top_p=top_p, seed=seed, stop_ids=list(tok.stop_ids),
        pad_id=tok.pad_id, vocab_limit=tok.vocab_size,
        attn_ctl_factory=_ctl_factory(encs, setting) if setting.active else None, **gen_kw)
    return [row[:n].tolist() for row, n in zip(tokens.cpu(), lengths.cpu().tolist())]


def _grade_record(rec: dict, extracted: str | None) -> bool | None:
    """Grade: the extracted answer against the record's gold one (grading.grade); None on
    a test split without answers (predicted, not scored)."""
    if rec["answer"] is None:
        return None
    return grade(extracted, rec["answer"], rec.get("options"), rec.get("answer_type"),
                 precision=rec.get("precision"), unit=rec.get("unit"))


def _prediction(tok: Tokenizer, rec: dict, enc: dict, out: list[int], vas_value: tuple, weights: dict,
                setting: Setting, config: dict) -> dict:
    """One line of the predictions file (its fields are listed in the module docstring)."""
    v, v_layers, v_ids = vas_value
    response = tok.decode_response(out)
    extracted = extract_answer(response)
    return {
        "id": rec["id"], "benchmark": rec.get("benchmark"), "weights": weights, "setting": setting.to_dict(),
        "config": config, "answer": rec["answer"], "answer_type": rec.get("answer_type"),
        "response": response, "extracted": extracted, "correct": _grade_record(rec, extracted),
        "stopped": bool(out) and out[-1] in tok.stop_ids, "new_tokens": len(out),
        "prompt_tokens": len(enc["input_ids"]), "vas": v,
        "vas_per_layer": v_layers, "vas_layers": v_ids,
        **({"groups": rec["groups"]} if rec.get("groups") else {})}


def _append(f, preds: list[dict]) -> None:
    """One write per batch, then flush to disk: a crash leaves whole batches plus at most a cut line."""
    f.write("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in preds))
    f.flush()
    os.fsync(f.fileno())


# ---- the prediction table and the summaries ----

def write_prediction_table(records: list[dict], preds: list[dict], path: str | Path) -> None:
    """The predictions as VLMEvalKit writes them beside its results: a TSV with columns index,
    question, answer, prediction (the whole response), hit (1 or 0; empty when unscored), plus our
    extracted answer. Cells with tabs, newlines or quotes are quoted as pandas.to_csv quotes them."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(["index", "question", "answer", "prediction", "hit", "extracted"])
        for rec, p in zip(records, preds):
            hit = "" if p.get("correct") is None else int(p["correct"])
            w.writerow([rec["id"], rec["question"], "" if rec["answer"] is None else rec["answer"],
                        p["response"], hit, "" if p["extracted"] is None else p["extracted"]])


def _accuracy(preds: list[dict]) -> float | None:
    scored = [p["correct"] for p in preds if p.get("correct") is not None]
    return 100.0 * sum(map(bool, scored)) / len(scored) if scored else None


def summarize(preds: list[dict]) -> dict:
    """n, accuracy (%, over the scored predictions; None when none is: a test split without
    answers), unscored, mean VAS (over the predictions that have one) and its band, and, where the
    benchmark has group columns (benchmarks.GROUP_COLUMNS), "groups": {column: {value: {"n", "accuracy"}}}."""
    n = len(preds)
    vas = [p["vas"] for p in preds if p.get("vas") is not None]
    mean_vas = sum(vas) / len(vas) if vas else None
    row = {"n": n, "accuracy": _accuracy(preds), "unscored": sum(p.get("correct") is None for p in preds),
           "mean_vas": mean_vas, "band": band(mean_vas),
           "no_answer": sum(p.get("extracted") is None for p in preds)}
    members = {}  # column -> value -> predictions
    for p in preds:
        for col, values in (p.get("groups") or {}).items():
            for v in dict.fromkeys(values):
                members.setdefault(col, {}).setdefault(v, []).append(p)
    if members:
        row["groups"] = {col: {v: {"n": len(ps), "accuracy": _accuracy(ps)} for v, ps in sorted(by.items())}
                         for col, by in members.items()}
    return row


def _fmt(x, digits=2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def summary_table(rows: list[dict]) -> str:
    """Markdown table, one row per (benchmark, setting), naming the checkpoint; with several
    benchmarks, a "mean" row per setting (unweighted mean over benchmarks, as the paper's "avg" column)."""
    lines = ["| benchmark | setting | n | accuracy | mean VAS | band | checkpoint |", "|---|---|---|---|---|---|---|"]
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    for s in settings:
        group = [r for r in rows if r["setting"] == s]
        for r in group:
            lines.append(f"| {r['benchmark']} | {s} | {r['n']} | {_fmt(r['accuracy'])} | {_fmt(r['mean_vas'])} | "
                         f"{r['band']} | {_short(r.get('weights'))} |")
        if len(group) > 1:
            acc = [r["accuracy"] for r in group if r["accuracy"] is not None]
            vas = [r["mean_vas"] for r in group if r["mean_vas"] is not None]
            mean_vas = sum(vas) / len(vas) if len(vas) == len(group) else None
            names = {_short(r.get("weights")) for r in group}
            lines.append(f"| mean | {s} | {sum(r['n'] for r in group)} | "
                         f"{_fmt(sum(acc) / len(acc) if len(acc) == len(group) else None)} | "
                         f"{_fmt(mean_vas)} | {band(mean_vas)} | {names.pop() if len(names) == 1 else 'mixed'} |")
    grouped = [r for r in rows if r.get("groups")]
    if grouped:  # accuracy per category / task / skill, as VLMEvalKit's score files list it
        lines += ["", "| benchmark | setting | column | group | n | accuracy |", "|---|---|---|---|---|---|"]
        for r in grouped:
            for col, by in r["groups"].items():
                lines += [f"| {r['benchmark']} | {r['setting']} | {col} | {v} | {g['n']} | "
                          f"{_fmt(g['accuracy'])} |" for v, g in by.items()]
    return "\n".join(lines) + "\n"


def write_summary(rows: list[dict], out_dir: str | Path, info: dict | None = None) -> str:
    """out_dir/summary.md (summary_table) and out_dir/summary.json: {"rows": rows, **info}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = summary_table(rows)
    (out_dir / "summary.md").write_text(table, encoding="utf-8")
    summary = {"rows": rows, **(info or {})}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return table


# ---- VAS against accuracy ----

def correlate(paths) -> dict:
    """Accuracy and mean VAS of each predictions file (e.g. one per checkpoint), with the checkpoint
    that made it ("weights"), and Pearson r (with p) between them across the files. A file with no
    VAS, or an infinite one (a model that puts no attention at all on the system turn), is listed
    but left out of r."""
    files = []
    for path in paths:
        if not Path(path).is_file():
            raise UserError(f"{path}: predictions file does not exist")
        preds = read_predictions(path)
        if not preds:
            raise UserError(f"{path}: no predictions")
        made_by = {json.dumps(p.get("weights"), sort_keys=True) for p in preds}
        if len(made_by) > 1:  # evaluate.py never writes such a file; one put together by hand
            raise UserError(f"{path}: its predictions were made by {len(made_by)} different checkpoints")
        row = summarize(preds)
        row.update(file=str(path), weights=preds[0].get("weights"))
        files.append(row)
    used = [f for f in files if f["mean_vas"] is not None and math.isfinite(f["mean_vas"])
            and f["accuracy"] is not None]
    result = pearson([f["mean_vas"] for f in used], [f["accuracy"] for f in used])
    result["files"] = files
    return result


def correlation_table(result: dict) -> str:
    lines = ["| file | checkpoint | n | accuracy | mean VAS | band |", "|---|---|---|---|---|---|"]
    for f in result["files"]:
        lines.append(f"| {f['file']} | {_short(f.get('weights'))} | {f['n']} | {_fmt(f['accuracy'])} | "
                     f"{_fmt(f['mean_vas'])} | {f['band']} |")
    r, p = result["r"], result["p"]
    lines.append("")
    lines.append(f"Pearson r (mean VAS vs accuracy) = {_fmt(r, 4)}, p = {'-' if p is None else f'{p:.3g}'}, "
                 f"n = {result['n']} files")
    return "\n".join(lines) + "\n"


# ---- command line ----

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="Evaluate a Qwen2.5-VL checkpoint on benchmarks (accuracy, VAS, "
                                             "intervention sweeps), or correlate VAS with accuracy.")
    ap.add_argument("--model", help="model folder (config.json, safetensors, tokenizer.json)")
    ap.add_argument("--bench", nargs="+", default=[], help="benchmark files: VLMEvalKit .tsv or .jsonl")
    ap.add_argument("--out", help="output folder: predictions/, summary.md, summary.json")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-pixels", type=int, default=None, help="image processor max_pixels (default: the model's)")
    ap.add_argument("--min-pixels", type=int, default=None)
    ap.add_argument("--limit", type=int, default=None, help="only the first N questions of each benchmark")
    ap.add_argument("--format-prompt", default=None, metavar="FILE.jinja",
                    help="EasyR1's format prompt (the release's math.jinja / r1v.jinja): the user turn is its rendering "
                         "of {{ content }}, the question and its option lines, instead of our instruction (needs jinja2)")
    ap.add_argument("--a-img", type=float, nargs="+", default=[0.0], help="intervention: image-key logit gain(s)")
    ap.add_argument("--a-sys", type=float, nargs="+", default=[0.0], help="intervention: system-key logit cut(s)")
    ap.add_argument("--intervention-layers", nargs="+", default=None,
                    help="layers the intervention acts in, e.g. 0-7 or 0 3 5 (default: all)")
    ap.add_argument("--vas-layers", nargs="+", default=None, help="layers averaged in VAS, e.g. 0-7 (default: all)")
    ap.add_argument("--no-vas", action="store_true", help="skip the VAS forward pass")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="default: bfloat16 on GPU, float32 on CPU")
    ap.add_argument("--correlate", nargs="+", default=None, metavar="PREDICTIONS_JSONL",
                    help="instead of evaluating: Pearson r between mean VAS and accuracy across these files")
    ap.add_argument("--compile", action="store_true", help="torch.compile the decode step (worth it on a GPU)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--skip-bad", action="store_true",
                    help="skip (and count) questions whose image fails to decode, instead of stopping")
    args = ap.parse_args(argv)
    if args.correlate is None:
        missing = [f"--{k}" for k in ("model", "bench", "out") if not getattr(args, k)]
        if missing:
            ap.error(f"evaluation needs {' '.join(missing)} (or use --correlate)")
    if args.batch_size < 1 or args.max_new_tokens < 1 or (args.limit is not None and args.limit < 1):
        ap.error("--batch-size, --max-new-tokens and --limit must be positive")
    if not 0.0 < args.top_p <= 1.0 or args.temperature < 0:
        ap.error("--top-p must be in (0, 1] and --temperature >= 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.correlate is not None:
        return run_correlation(args.correlate, args.out)
    return run_evaluation(args)


def run_correlation(paths: list[str], out: str | None) -> dict:
    """--correlate: print the table of mean VAS and accuracy per predictions file with Pearson r;
    with --out, also write correlation.json and correlation.md there."""
    result = correlate(paths)
    print(correlation_table(result), end="")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "correlation.json").write_text(json.dumps(result, indent=2) + "\n")
        (Path(out) / "correlation.md").write_text(correlation_table(result))
    return result


def run_evaluation(args) -> list[dict]:
    """Evaluate --model on every --bench under every (--a-img, --a-sys) setting; writes --out."""
    config = vars(args).copy()
    print("config:", json.dumps(config))
    benchmarks = [read_benchmark_file(path) for path in args.bench]  # bad input fails before the model loads
    fmt = read_format_prompt(args.format_prompt) if args.format_prompt else None
    model_dir = check_model_folder(args.model)  # a run folder: its latest checkpoint
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float32 if args.device == "cpu" else torch.bfloat16)
    prov = provenance(model_dir, args.device, dtype)  # the weights' fingerprint: read once in full
    print(f"model: {model_dir}, weights sha256 {prov['model']['sha256']}")
    model, tok, proc = load_model(model_dir, args, dtype)
    settings, vas_layers = sweep_settings(args, model.cfg.num_hidden_layers)
    out = Path(args.out)
    rows = evaluate(model, tok, proc, benchmarks, out, settings, limit=args.limit,
                    info={"config": config, "provenance": prov}, weights=prov["model"],
                    batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_p=args.top_p, seed=args.seed, vas=not args.no_vas, vas_layers=vas_layers,
                    progress=not args.no_progress, compile=args.compile, skip_bad=args.skip_bad,
                    format_prompt=fmt)
    print(summary_table(rows), end="")
    return rows


def load_model(model_dir: str, args, dtype):
    """(model, tokenizer, image processor) from the model folder, in `dtype` on --device."""
    model = from_pretrained(model_dir, dtype=dtype, device=args.device).eval()
    tok = Tokenizer(model_dir)
    proc = ImageProcessor.from_pretrained(model_dir, max_pixels=args.max_pixels, min_pixels=args.min_pixels)
    return model, tok, proc


def sweep_settings(args, n_layers: int) -> tuple[list[Setting], list[int] | None]:
    """The intervention settings of the sweep (every --a-img with every --a-sys, duplicates once;
    the model as is has no layers) and the layers VAS averages (None: all)."""
    layers = parse_layers(args.intervention_layers, n_layers)
    layers = tuple(layers) if layers is not None else None
    settings = list(dict.fromkeys(Setting(a, s, layers if (a or s) else None)
                                  for a in args.a_img for s in args.a_sys))
    return settings, parse_layers(args.vas_layers, n_layers)


if __name__ == "__main__":
    run_cli(main)
