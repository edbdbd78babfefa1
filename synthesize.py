"""Visual-anchored cold-start synthesis (AVAR section 4a): raw problems -> SFT records.

    python synthesize.py --input raw.jsonl --output cold_start.jsonl \
        --base-url http://localhost:8000/v1 --model Qwen2.5-VL-72B-Instruct [--api-key-env VAR]
    python synthesize.py --input raw.jsonl --output cold_start.jsonl --model DIR    # a local checkpoint

Each raw problem goes through three teacher calls:
    1. DESCRIBE_PROMPT  (+ images): structured description: global scan, element decomposition,
                                    linking, synthesis;
    2. REASON_PROMPT    (text only): reasoning with iterative self-reflection from the description,
                                    ending in <answer>..</answer>;
    3. ANCHOR_PROMPT    (+ images): the same reasoning with visual anchors inserted ("looking back
                                    at the triangle...", "let me check the image again..."),
                                    output <think>..</think><answer>..</answer>.
A record is kept only when the answer of stage 2 and of stage 3 grades equal to the gold answer
(grading.py). The output is appended and flushed record by record, in input order, so a killed run
resumes where it stopped and ends with the same file.

A teacher is any object with `chat(messages: list[dict], images: list[PIL.Image]) -> str`; the
messages are OpenAI-style {"role", "content": str} and the images belong to the last user message.
OpenAITeacher speaks to any OpenAI-compatible /chat/completions endpoint (vLLM, SGLang, hosted);
LocalTeacher runs a local Hugging Face folder with this project's generation.
"""

import argparse
import base64
import http.client
import io
import json
import logging
import os
import re
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import torch

from data import (DataError, ImageProcessor, Tokenizer, build_prompt, encode_chat, format_question, load_image, read_records,
                  run_cli, to_rgb)
from grading import extract_answer, grade
from hub import resolve_checkpoint
from model import from_pretrained

log = logging.getLogger("synthesis")


# Stage 1: a strong VLM describes the image(s). Filled with {question}. Images attached.
DESCRIBE_PROMPT = """\
Describe the image for a reader who cannot see it and must solve the question below from your description alone. Do not solve the question.
Write a structured visual description in four parts:
1. Global scan: what kind of image it is (diagram, chart, table, geometry figure, photo, ...), its overall layout, and any title, axes, legend or caption.
2. Element decomposition: every element that matters for the question, one per line, with its labels, numbers, colours, positions and sizes; copy any text in the image exactly.
3. Linking: how the elements relate: which label belongs to which part, connections, intersections, parallel or perpendicular lines, equal marks, order, what the axes measure.
4. Synthesis: a short summary of the visual facts the question depends on.
Report only what is visible; write "unclear" rather than guess.

Question:
{question}"""

# Stage 2: a reasoning LLM solves from the description. Filled with {description}, {question},
# {answer_format}. No images.
REASON_PROMPT = """\
Solve the problem below. You cannot see the image: rely on the visual description, written by someone who could.
Reason step by step. When you reach an answer, reflect: re-check every step and every visual fact you used against the description, look for a mistake or another reading of the figure, and correct yourself if needed. Repeat until the answer holds up; reflect at least once.
End with the final answer alone inside <answer></answer>: {answer_format}

Visual description:
{description}

Question:
{question}"""

# Stage 3: a third model anchors the reasoning in the image. Filled with {description},
# {question}, {reasoning}. Images attached.
ANCHOR_PROMPT = """\
Rewrite the reasoning below so that it reads as the work of a solver who looks at the image itself.
- Wherever the reasoning uses a visual fact, insert a short visual anchor that goes back to the image, such as "Looking back at the triangle, ...", "Let me check the image again: ...", "In the figure, the bar for 2019 reaches ...". Anchor the self-checks as well.
- Never mention a description; the solver sees the image.
- Keep every step, calculation and reflection, and keep the final answer exactly as it is. Add no new steps.
Output exactly: <think>the rewritten reasoning</think><answer>the same final answer</answer>

Visual description:
{description}

Question:
{question}

Reasoning:
{reasoning}"""

ANSWER_FORMAT_MC = "the option letter only."
ANSWER_FORMAT_OPEN = "a number, word or short expression only, without units."

STAGES = ("describe", "reason", "anchor")


class TeacherError(RuntimeError):
    """A teacher call failed for good (retries spent, or a request the server refuses)."""


class Teacher:
    """The teacher protocol (documentation; any object with this `chat` method will do).

    chat(messages, images) -> str
        messages: [{"role": "system" | "user" | "assistant", "content": str}, ...]
        images:   PIL images that belong to the last user message, shown before its text.
        Returns the assistant's reply text. Raises on failure (after its own retries, if any).
    """

    def chat(self, messages, images=()):
        raise NotImplementedError


class LocalTeacher(Teacher):
    """A teacher run by this project: a local Hugging Face folder loaded with model.from_pretrained
    and decoded with its own KV-cache generation (greedy unless temperature > 0)."""

    def __init__(self, path, device="cpu", dtype=None, max_new_tokens=1024, temperature=0.0, top_p=1.0, seed=0,
                 max_pixels=None):
        dtype = dtype or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
        path = resolve_checkpoint(path)  # a run folder: its latest checkpoint
        self.model = from_pretrained(path, dtype=dtype, device=device).eval()
        self.tok = Tokenizer(path)
        self.proc = ImageProcessor.from_pretrained(path, max_pixels=max_pixels)
        self.kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                       stop_ids=self.tok.stop_ids, pad_id=self.tok.pad_id, vocab_limit=self.tok.vocab_size)

    def chat(self, messages, images=()):
        images = list(images)
        msgs = [dict(m) for m in messages]
        if images:  # the images belong to the last user message, before its text
            last = max(i for i, m in enumerate(msgs) if m["role"] == "user")
            msgs[last]["content"] = [{"type": "image"}] * len(images) + [{"type": "text", "text": msgs[last]["content"]}]
        pixel_values, grid = self.proc(images) if images else (None, None)
        n_tokens = [int(g.prod()) // self.proc.merge ** 2 for g in grid] if images else []
        ids = encode_chat(self.tok, msgs, n_tokens, add_generation_prompt=True)["input_ids"]
        device = self.model.lm_head.weight.device
        if pixel_values is not None:
            pixel_values, grid = pixel_values.to(device), grid.to(device)
        out, lengths = self.model.generate([ids], pixel_values, grid, **self.kw)
        return self.tok.decode_response(out[0, :int(lengths[0])])


class _Malformed(Exception):
    pass


def image_data_url(image):
    buf = io.BytesIO()
    to_rgb(image).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class OpenAITeacher(Teacher):
    """A teacher behind an OpenAI-compatible API: POST {base_url}/chat/completions.

    Timeouts, connection errors, HTTP 429 and 5xx, and malformed JSON replies are retried up to
    max_retries times with exponential backoff (backoff * 2**attempt seconds, or the server's
    Retry-After on a 429 when given); another 4xx is a TeacherError at once. When the reply has a
    separate reasoning field (reasoning models served by vLLM/SGLang) and include_reasoning is
    true, the reasoning is returned too, as "<think>reasoning</think>\\ncontent".
    `stats` counts requests, retries and failures (thread-safe).
    """

    def __init__(self, base_url, model, api_key=None, timeout=60, max_retries=4, backoff=1.0,
                 temperature=0.7, max_tokens=4096, include_reasoning=True, extra_body=None):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key = model, api_key
        self.timeout, self.max_retries, self.backoff = timeout, max_retries, backoff
        self.temperature, self.max_tokens = temperature, max_tokens
        self.include_reasoning, self.extra_body = include_reasoning, dict(extra_body or {})
        self.stats = {"requests": 0, "retries": 0, "failures": 0}
        self._lock = threading.Lock()

    def _count(self, key):
        with self._lock:
            self.stats[key] += 1

    def _payload(self, messages, images):
        messages = [dict(m) for m in messages]
        if images:
            last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
            if last_user is None:
                raise ValueError("images need a user message to attach to")
            m = messages[last_user]
            m["content"] = ([{"type": "image_url", "image_url": {"url": image_data_url(im)}} for im in images]
                            + [{"type": "text", "text": m["content"]}])
        payload = {"model": self.model, "messages": messages,
                   "temperature": self.temperature, "max_tokens": self.max_tokens}
        payload.update(self.extra_body)
        return json.dumps(payload).encode()

    def _parse(self, body):
        try:
            message = json.loads(body)["choices"][0]["message"]
            content = message.get("content")
            if isinstance(content, list):  # content parts
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            reasoning = message.get("reasoning_content") or message.get("reasoning")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
            raise _Malformed(f"malformed reply ({type(e).__name__}: {e}): {body[:200]!r}")
        if not isinstance(content, str):
            raise _Malformed(f"reply without text content: {body[:200]!r}")
        if self.include_reasoning and isinstance(reasoning, str) and reasoning.strip():
            return f"<think>{reasoning.strip()}</think>\n{content}"
        return content

    def chat(self, messages, images=()):
        data = self._payload(messages, images)
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                self._count("retries")
            self._count("requests")
            wait = self.backoff * 2 ** attempt
            try:
                req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    body = resp.read()
                return self._parse(body)
            except urllib.error.HTTPError as e:  # before URLError/OSError: it subclasses both
                detail = e.read()[:300] if e.fp is not None else b""
                if e.code != 429 and e.code < 500:
                    self._count("failures")
                    raise TeacherError(f"HTTP {e.code} from {self.url}: {detail!r}") from None
                last = f"HTTP {e.code}: {detail!r}"
                retry_after = e.headers.get("Retry-After") if e.headers else None
                if e.code == 429 and retry_after:
                    try:
                        wait = min(float(retry_after), 60.0)
                    except ValueError:
                        pass
            except _Malformed as e:
                last = str(e)
            except (TimeoutError, socket.timeout, urllib.error.URLError, http.client.HTTPException,
                    ConnectionError, OSError) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            if attempt < self.max_retries:
                log.debug("teacher retry %d after %s (sleep %.2fs)", attempt + 1, last, wait)
                time.sleep(wait)
        self._count("failures")
        raise TeacherError(f"{self.url}: gave up after {self.max_retries + 1} attempts; last error: {last}")


# ---- reading and checking jsonl ---------------------------------------------------------------

def read_raw_problems(path):
    """Parse and check the raw problems (data.read_records: JSON lines or one JSON array):
    [(where, record, [absolute image paths])]. A bad JSON line, a missing field, a duplicate id or
    a missing image file is a DataError naming the file and line, raised before any teacher is called."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: input file does not exist")
    base = os.path.dirname(os.path.abspath(path))
    out, seen = [], {}
    for where, rec, error in read_records(path):
        if error is not None:
            raise DataError(f"{where}: {error}")
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected a JSON object")
        if "images" not in rec and "image" in rec:
            rec["images"] = rec.pop("image")
        for key in ("id", "question", "answer", "images"):
            if rec.get(key) is None:
                raise DataError(f"{where}: missing field {key!r}")
        rid = str(rec["id"])
        if rid in seen:
            raise DataError(f"{where}: duplicate id {rid!r} (first at {seen[rid]})")
        seen[rid] = where
        images = rec["images"]
        if isinstance(images, str):
            images = rec["images"] = [images]
        if not images:
            raise DataError(f"{where}: record {rid!r} has no image (synthesis anchors in images)")
        paths = []
        for p in images:
            full = p if os.path.isabs(p) else os.path.normpath(os.path.join(base, p))
            if not os.path.isfile(full):
                raise DataError(f"{where}: image file not found: {p!r} (looked at {full})")
            paths.append(full)
        out.append((where, rec, paths))
    return out


def _read_done(out_path):
    """Ids already in out_path. A last line cut short by a killed run is removed (it is redone);
    a bad line elsewhere is a ValueError naming the file and line."""
    done = set()
    if not os.path.exists(out_path):
        return done
    with open(out_path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    keep = len(data)
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
            done.add(str(rec["id"]))
        except (ValueError, KeyError, TypeError) as e:
            is_last = i == len(lines) - 1  # no newline after it: the write was interrupted
            if not is_last:
                raise ValueError(f"{out_path}:{i + 1}: bad record ({e}); fix or remove the line") from None
            keep = len(data) - len(raw)
            log.warning("%s: dropping an incomplete last line (interrupted write); it is redone", out_path)
    if keep < len(data) or (data and not data.endswith(b"\n")):
        with open(out_path, "r+b") as f:
            f.truncate(keep)
            if keep and data[keep - 1:keep] != b"\n":
                f.seek(keep)
                f.write(b"\n")
    return done


def _read_ids(path):
    """Ids in a side log (out_path + ".filtered"); a cut or bad line only means that record is tried again."""
    if not os.path.exists(path):
        return set()
    return {str(obj["id"]) for _, obj, error in read_records(path)
            if error is None and isinstance(obj, dict) and "id" in obj}


# ---- one record through the three stages ------------------------------------------------------

_RESPONSE_RE = re.compile(r"^<think>(.*?)</think>\s*<answer>(.*?)</answer>$", re.S)


def normalize_response(text):
    """Stage 3 output -> "<think>...</think><answer>...</answer>", or None when unusable.
    Tolerates code fences, text after </answer>, a missing <think> tag pair, and answer tags
    quoted inside the reasoning (their text is kept); the result passes grading.format_ok."""
    text = re.sub(r"^```[a-z]*\s*|\s*```$", "", text.strip()).strip()
    end = text.rfind("</answer>")
    if end < 0:
        return None
    text = text[:end + len("</answer>")]
    if "<think>" not in text:
        start = text.rfind("<answer>")
        text = f"<think>{text[:start].replace('</think>', '').strip()}</think>{text[start:]}"
    m = _RESPONSE_RE.match(text)
    if not m:
        return None
    # an answer tag quoted inside the reasoning would make a second answer: keep only its text
    think = re.sub(r"</?answer>", "", m.group(1)).strip()
    answer = m.group(2).strip()
    if not think or not answer or re.search(r"</?(?:think|answer)>", think + answer):
        return None
    return f"<think>{think}</think><answer>{answer}</answer>"


class _Filtered(Exception):
    def __init__(self, reason, **info):
        super().__init__(reason)
        self.reason, self.info = reason, info


def _synthesize_one(rec, image_paths, teachers, question):
    """Run the three stages on one record. Returns the response; raises _Filtered (wrong answer
    or unusable output) or TeacherError/other errors (failed)."""
    gold, options = str(rec["answer"]), rec.get("options") or None

    def right(pred):
        try:
            return grade(pred, gold, options, rec.get("answer_type"))
        except ValueError:  # an answer_type the grader does not know (e.g. "free_form"): infer it
            return grade(pred, gold, options, None)

    images = []
    for p in image_paths:  # as the model sees them: decoded, transparency composited on white
        images.append(load_image(p))

    def call(stage, prompt, imgs):
        try:
            return teachers[stage].chat([{"role": "user", "content": prompt}], imgs)
        except Exception as e:
            raise TeacherError(f"record {rec['id']!r}: stage {STAGES.index(stage) + 1} ({stage}): {e}") from e

    description = call("describe", DESCRIBE_PROMPT.format(question=question), images).strip()
    reasoning = call("reason", REASON_PROMPT.format(
        description=description, question=question,
        answer_format=ANSWER_FORMAT_MC if options else ANSWER_FORMAT_OPEN), []).strip()
    pred = extract_answer(reasoning)
    if not right(pred):  # no point anchoring a wrong chain
        raise _Filtered("wrong answer at stage 2 (reason)", pred=pred, gold=gold, response=reasoning)
    anchored = call("anchor", ANCHOR_PROMPT.format(description=description, question=question,
                                                   reasoning=reasoning), images)
    response = normalize_response(anchored)
    if response is None:
        raise _Filtered("unusable format at stage 3 (anchor)", pred=None, gold=gold, response=anchored)
    pred = extract_answer(response)
    if not right(pred):
        raise _Filtered("wrong answer at stage 3 (anchor)", pred=pred, gold=gold, response=response)
    return response


def synthesize(in_path, out_path, teacher, reason_teacher=None, anchor_teacher=None, workers=1,
               fail_fast=False, retry_filtered=False, limit=None):
    """Turn the raw problems of in_path ({"id", "images", "question", "answer", "options"?,
    "answer_type"?} jsonl, image paths relative to its folder) into cold-start SFT records
    appended to out_path: {"id", "images" (relative to out_path's folder), "question" (with the
    options written in), "response", "answer"}.

    teacher does all three stages unless reason_teacher / anchor_teacher are given. Resumable:
    ids already in out_path are skipped, and so are ids filtered out before (kept with the reason
    in out_path + ".filtered"; retry_filtered=True tries them again). A record whose teacher calls
    fail is logged and counted as failed and the run goes on, or with fail_fast=True the error is
    raised (records finished before it are kept). Records are written in input order, each
    flushed as soon as it and those before it are finished; `workers` records run at a time.
    Returns {"total", "done", "skipped", "filtered", "failed", "failed_ids"}.
    """
    in_path, out_path = os.fspath(in_path), os.fspath(out_path)
    problems = read_raw_problems(in_path)
    teachers = {"describe": teacher, "reason": reason_teacher or teacher, "anchor": anchor_teacher or teacher}
    out_dir = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(out_dir, exist_ok=True)
    filtered_path = out_path + ".filtered"
    done_ids = _read_done(out_path)
    skip_ids = done_ids | (set() if retry_filtered else _read_ids(filtered_path))
    counts = {"total": len(problems), "done": 0, "skipped": 0, "filtered": 0, "failed": 0, "failed_ids": []}
    todo = []
    for _, rec, paths in problems:
        if str(rec["id"]) in skip_ids:
            counts["skipped"] += 1
        elif limit is None or len(todo) < limit:
            todo.append((rec, paths))

    def rel_images(rec, paths):
        return [p if os.path.isabs(orig) else os.path.relpath(p, out_dir) for orig, p in zip(rec["images"], paths)]

    def work(rec, paths):
        question = format_question(rec["question"], rec.get("options"))
        try:
            return "done", question, _synthesize_one(rec, paths, teachers, question)
        except _Filtered as e:
            return "filtered", question, e
        except Exception as e:  # noqa: BLE001  a failed record must not stop the run
            return "failed", question, e

    t0 = time.time()
    with open(out_path, "a") as out, open(filtered_path, "a") as side:

        def commit(rec, paths, result):
            status, question, value = result
            rid = str(rec["id"])
            if status == "done":
                # the record's user turn is the prompt evaluate.py builds for the same problem, so
                # training and evaluation see one format (the teacher saw the bare question)
                prompt = build_prompt({"question": rec["question"], "options": rec.get("options"),
                                       "answer_type": rec.get("answer_type")})
                out.write(json.dumps({"id": rec["id"], "images": rel_images(rec, paths), "question": prompt,
                                      "response": value, "answer": str(rec["answer"])}, ensure_ascii=False) + "\n")
                out.flush()
            elif status == "filtered":
                side.write(json.dumps({"id": rec["id"], "reason": value.reason, **value.info},
                                      ensure_ascii=False) + "\n")
                side.flush()
                log.info("filtered %s: %s (pred %r, gold %r)", rid, value.reason,
                         value.info.get("pred"), value.info.get("gold"))
            else:
                log.error("failed %s: %s", rid, value)
                counts["failed_ids"].append(rid)
                if fail_fast:
                    counts[status] += 1
                    raise RuntimeError(f"record {rid!r} failed (--fail-fast): {value}") from value
            counts[status] += 1
            finished = counts["done"] + counts["filtered"] + counts["failed"]
            if finished % 50 == 0 or finished == len(todo):
                log.info("%d/%d finished (done %d, filtered %d, failed %d) in %.0fs", finished, len(todo),
                         counts["done"], counts["filtered"], counts["failed"], time.time() - t0)

        if workers <= 1:
            for rec, paths in todo:
                commit(rec, paths, work(rec, paths))
        else:
            # A bounded window of records in flight; results are committed in input order.
            with ThreadPoolExecutor(workers) as pool:
                pending, items = deque(), iter(todo)
                for rec, paths in items:
                    pending.append((rec, paths, pool.submit(work, rec, paths)))
                    if len(pending) >= 2 * workers:
                        break
                try:
                    while pending:
                        rec, paths, fut = pending.popleft()
                        commit(rec, paths, fut.result())
                        nxt = next(items, None)
                        if nxt is not None:
                            pending.append((*nxt, pool.submit(work, *nxt)))
                except BaseException:
                    for *_, fut in pending:
                        fut.cancel()
                    raise
    return counts


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help="raw problems jsonl")
    p.add_argument("--output", required=True, help="cold-start SFT jsonl (appended, resumable)")
    p.add_argument("--base-url", default=None,
                   help="OpenAI-compatible API, e.g. http://localhost:8000/v1; without it, --model (and the "
                        "stage models) are local Hugging Face folders run by this project's generation")
    p.add_argument("--model", required=True, help="teacher for all stages (stage 1, visual description)")
    p.add_argument("--device", default="cpu", help="device of a local teacher")
    p.add_argument("--reason-model", default=None, help="stage 2 teacher (default: --model)")
    p.add_argument("--anchor-model", default=None, help="stage 3 teacher (default: --model)")
    p.add_argument("--api-key-env", default=None, help="name of the environment variable holding the API key")
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--max-retries", type=int, default=4)
    p.add_argument("--backoff", type=float, default=1.0)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--workers", type=int, default=1, help="records in flight at once")
    p.add_argument("--limit", type=int, default=None, help="process at most this many new records")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first failed record")
    p.add_argument("--retry-filtered", action="store_true", help="retry records filtered out before")

    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    log.info("config: %s", json.dumps(vars(args)))

    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            p.error(f"environment variable {args.api_key_env} is not set")

    def make(model):
        if args.base_url is None:
            return LocalTeacher(model, device=args.device, max_new_tokens=args.max_tokens,
                                temperature=args.temperature)
        return OpenAITeacher(args.base_url, model, api_key=api_key, timeout=args.timeout,
                             max_retries=args.max_retries, backoff=args.backoff,
                             temperature=args.temperature, max_tokens=args.max_tokens)

    teacher = make(args.model)
    result = synthesize(args.input, args.output, teacher,
                        reason_teacher=make(args.reason_model) if args.reason_model else None,
                        anchor_teacher=make(args.anchor_model) if args.anchor_model else None,
                        workers=args.workers, fail_fast=args.fail_fast,
                        retry_filtered=args.retry_filtered, limit=args.limit)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    run_cli(main)
