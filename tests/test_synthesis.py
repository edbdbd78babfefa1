"""Tests of the toy world (answers checked against the pixels) and of the visual-anchored
synthesis (an OpenAI-compatible server inside the test that injects 500, 429, timeouts,
malformed JSON, a 400 and a record that always fails; resumption after a crash)."""

import hashlib
import json
import os
import random
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

import data as sd
import synthesize as syn
import toy

FAMILIES = list(toy.TOY_FAMILIES)
WHITE = np.array(toy.TOY_BACKGROUND)
RESPONSE_RE = re.compile(r"<think>(.+)</think><answer>([^<]+)</answer>", re.S)


# =============================================================================================
# toy world
# =============================================================================================

def _pixels(image):
    return np.asarray(image.convert("RGB")).astype(int)  # (H, W, 3)


def _nearest_color(rgb):
    return min(toy.TOY_COLORS, key=lambda c: sum((a - b) ** 2 for a, b in zip(toy.TOY_COLORS[c], rgb)))


def _check_drawing(image, question, answer, options, answer_type, facts):
    """Check the answer against the pixels (not only against facts)."""
    px = _pixels(image)
    size = facts["size"]
    assert image.size == (size, size)
    nonwhite = (px != WHITE).any(-1)  # (H, W)
    family = facts["family"]

    covered = np.zeros_like(nonwhite)
    for s in facts.get("shapes", []):
        cx, cy, r = s["cx"], s["cy"], s["r"]
        assert 0 <= cx - r and cx + r < size and 0 <= cy - r and cy + r < size
        assert tuple(px[cy, cx]) == tuple(s["rgb"]) == toy.TOY_COLORS[s["color"]]
        box = px[cy - r:cy + r + 1, cx - r:cx + r + 1]
        fill = (box == np.array(s["rgb"])).all(-1).mean()
        expected = {"square": (0.97, 1.0), "circle": (0.70, 0.86), "triangle": (0.40, 0.62)}[s["kind"]]
        assert expected[0] <= fill <= expected[1], (s, fill)
        assert not covered[cy - r:cy + r + 1, cx - r:cx + r + 1].any(), "shapes overlap"
        covered[cy - r:cy + r + 1, cx - r:cx + r + 1] = True
    for b in facts.get("bars", []):
        covered[b["top"]:b["bottom"] + 1, b["x0"]:b["x1"] + 1] = True
    assert not (nonwhite & ~covered).any(), "something drawn outside the described elements"

    if options:
        assert answer_type == "multi_choice"
        assert re.fullmatch(r"[A-Z]", answer) and ord(answer) - ord("A") < len(options)
        for i, opt in enumerate(options):
            assert f"\n{chr(65 + i)}. {opt}\n" in question
        assert question.endswith(sd.MC_INSTRUCTION)
        chosen = options[ord(answer) - ord("A")]

    if family == "color":
        (s,) = facts["shapes"]
        assert answer == s["color"] == _nearest_color(px[s["cy"], s["cx"]])
    elif family == "shape":
        (s,) = facts["shapes"]
        assert chosen == s["kind"] and sorted(options) == sorted(toy.TOY_SHAPES)
    elif family == "count":
        assert answer == str(len(facts["shapes"])) and 1 <= int(answer) <= 4
        # independent count: 4-connected components of the drawn pixels
        seen, comps = np.zeros_like(nonwhite), 0
        for y, x in zip(*np.nonzero(nonwhite)):
            if seen[y, x]:
                continue
            comps += 1
            stack = [(y, x)]
            seen[y, x] = True
            while stack:
                a, b = stack.pop()
                for na, nb in ((a + 1, b), (a - 1, b), (a, b + 1), (a, b - 1)):
                    if 0 <= na < size and 0 <= nb < size and nonwhite[na, nb] and not seen[na, nb]:
                        seen[na, nb] = True
                        stack.append((na, nb))
        assert comps == int(answer)
    elif family == "side":
        cols = np.nonzero(nonwhite.any(0))[0]
        side = "left" if cols.max() < size / 2 else "right" if cols.min() >= size / 2 else None
        assert answer == side == facts["side"]
        (s,) = facts["shapes"]
        assert s["kind"] == "circle"
    elif family == "bars":
        half = size // 2
        tops = {}
        for name, region in (("left", nonwhite[:, :half]), ("right", nonwhite[:, half:])):
            rows = np.nonzero(region.any(1))[0]
            tops[name] = rows.min()
        taller = "left" if tops["left"] < tops["right"] else "right"
        assert tops["left"] != tops["right"]
        assert chosen == taller == facts["taller"] and sorted(options) == ["left", "right"]
    else:
        raise AssertionError(family)


@pytest.mark.parametrize("size", [56, 84, 112])
def test_every_family_answer_matches_its_drawing(size):
    for family in FAMILIES:
        for seed in range(60 if size == 56 else 15):
            problem = toy.make_toy_problem(random.Random(seed), family, image_size=size)
            _check_drawing(*problem)


def test_toy_problem_is_deterministic_for_a_seed():
    for family in FAMILIES:
        a = toy.make_toy_problem(random.Random(7), family)
        b = toy.make_toy_problem(random.Random(7), family)
        assert a[0].tobytes() == b[0].tobytes() and a[1:] == b[1:]
    keys = {toy.make_toy_problem(random.Random(s), "count")[0].tobytes() for s in range(20)}
    assert len(keys) > 15  # and different seeds give different problems
    with pytest.raises(ValueError):
        toy.make_toy_problem(random.Random(0), "nope")
    with pytest.raises(ValueError):
        toy.make_toy_problem(random.Random(0), "color", image_size=60)


def test_reasoning_is_short_cites_the_image_and_grades():
    from grading import extract_answer, format_ok, grade

    for family in FAMILIES:
        for seed in range(40):
            _, question, answer, options, answer_type, facts = toy.make_toy_problem(random.Random(seed), family)
            resp = facts["response"]
            assert len(resp) < 200, resp
            m = RESPONSE_RE.fullmatch(resp)
            assert m and m.group(2) == answer
            assert m.group(1).startswith("I see ") and "Looking at the image again" in m.group(1)
            assert len(question) < 100
            assert extract_answer(resp) == answer and format_ok(resp)
            assert grade(extract_answer(resp), answer, options or None, answer_type)
            wrong = "Z" if options else ("left" if answer == "right" else "right")
            assert not grade(wrong, answer, options or None, answer_type)


def _read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("toy")
    summary = toy.main(["--out", str(d), "--n-train", "150", "--n-rl", "100", "--n-eval", "100", "--seed", "3"])
    return d, summary


def test_toy_world_files_are_well_formed(toy_dir):
    d, summary = toy_dir
    sft = _read_jsonl(d / "sft.jsonl")
    text = _read_jsonl(d / "sft_text_only.jsonl")
    rl = _read_jsonl(d / "rl.jsonl")
    ev = _read_jsonl(d / "eval.jsonl")
    assert (len(sft), len(text), len(rl), len(ev)) == (150, 150, 100, 100)
    assert (summary["sft"], summary["sft_text_only"], summary["rl"], summary["eval"]) == (150, 150, 100, 100)
    assert json.loads((d / "toy_world.json").read_text())["chance"] == summary["chance"]

    for r in sft:
        assert set(r) == {"id", "images", "question", "response", "answer"}
        assert RESPONSE_RE.fullmatch(r["response"]).group(2) == r["answer"] and len(r["response"]) < 200
    for r, t in zip(sft, text):  # the text-only cold-start: same chain, no image
        assert t == {**r, "images": []}
    for r in rl:
        assert set(r) == {"id", "images", "question", "answer", "options", "answer_type"}
    for r in ev:
        assert set(r) == {"id", "images", "question", "options", "answer", "answer_type"}
    for r in sft + rl + ev:
        (rel,) = r["images"]
        assert not os.path.isabs(rel) and rel.startswith("images/")
        with Image.open(d / rel) as im:
            assert im.size == (56, 56) and im.mode == "RGB"
        if r.get("options"):
            assert r["answer_type"] == "multi_choice" and "A. " not in r["question"]
    ids = [r["id"] for r in sft + rl + ev]
    assert len(ids) == len(set(ids))


def test_toy_splits_are_disjoint_and_reproducible(toy_dir, tmp_path):
    d, _ = toy_dir

    def keys(name):
        out = set()
        for r in _read_jsonl(d / name):
            with Image.open(d / r["images"][0]) as im:
                stem = r["question"].split("\n")[0]  # sft holds the rendered prompt, rl/eval the bare stem
                out.add(hashlib.sha1(im.convert("RGB").tobytes() + b"\0" + stem.encode()).hexdigest())
        return out

    train = keys("sft.jsonl") | keys("rl.jsonl")
    assert not keys("eval.jsonl") & train
    # the same seed writes the same world, byte for byte
    toy.write_toy_world(tmp_path, n_train=150, n_rl=100, n_eval=100, seed=3)
    for name in ("sft.jsonl", "sft_text_only.jsonl", "rl.jsonl", "eval.jsonl"):
        assert (tmp_path / name).read_bytes() == (d / name).read_bytes()
    for r in _read_jsonl(d / "eval.jsonl")[:20]:
        assert (tmp_path / r["images"][0]).read_bytes() == (d / r["images"][0]).read_bytes()
    # a different seed, a different world
    other = tmp_path / "other"
    toy.write_toy_world(other, n_train=5, n_eval=5, seed=4)
    assert (other / "eval.jsonl").read_text() != "".join((d / "eval.jsonl").read_text().splitlines(True)[:5])


def test_sft_question_is_the_evaluation_prompt(tmp_path):
    """sft.jsonl's question is exactly what data.build_prompt renders for rl/eval records."""
    from data import build_prompt
    from evaluate import read_benchmark
    from grading import format_ok

    toy.write_toy_world(tmp_path, n_train=10, n_rl=10, n_eval=10)
    sft = _read_jsonl(tmp_path / "sft.jsonl")
    rl = _read_jsonl(tmp_path / "rl.jsonl")
    ev = read_benchmark(tmp_path / "eval.jsonl")
    for s, r, e in zip(sft, rl, ev):
        assert set(s) == {"id", "images", "question", "response", "answer"}
        assert format_ok(s["response"])
        assert "A. " not in e["question"] and "A. " not in r["question"]
        if e["options"]:
            assert build_prompt(e).count(f"A. {e['options'][0]}") == 1
        assert build_prompt(r).split("\n")[-1] == s["question"].split("\n")[-1]
        assert s["question"].startswith(r["question"])


def test_eval_problems_seen_in_training_are_redrawn(tmp_path):
    # 56 px side problems repeat often enough that some eval draws collide with training
    s = toy.write_toy_world(tmp_path, n_train=800, n_rl=0, n_eval=200, seed=0, families=["side"])
    assert s["eval_redrawn"] > 0
    from data import build_prompt
    train = {(r["question"], (tmp_path / r["images"][0]).read_bytes()) for r in _read_jsonl(tmp_path / "sft.jsonl")}
    assert not any((build_prompt(r), (tmp_path / r["images"][0]).read_bytes()) in train
                   for r in _read_jsonl(tmp_path / "eval.jsonl"))


def test_chance_accuracy(toy_dir):
    d, summary = toy_dir
    # 100 eval problems, families round robin: 20 each
    expected = (1 / 5 + 1 / 3 + 1 / 4 + 1 / 2 + 1 / 2) / 5
    assert summary["chance"] == pytest.approx(expected)
    assert summary["chance_by_family"] == pytest.approx(
        {"color": 1 / 5, "shape": 1 / 3, "count": 1 / 4, "side": 1 / 2, "bars": 1 / 2})
    # independently from the file: MC 1/len(options); open answers by their answer space
    open_space = {"What color is the shape?": 5, "How many shapes are there?": 4,
                  "Is the circle on the left or right?": 2}
    ev = _read_jsonl(d / "eval.jsonl")
    from_file = np.mean([1 / len(r["options"]) if r["options"] else 1 / open_space[r["question"]] for r in ev])
    assert summary["chance"] == pytest.approx(from_file)
    assert toy.toy_chance("count") == 0.25 and toy.toy_chance("shape", ["a", "b", "c"]) == pytest.approx(1 / 3)


def test_format_question():
    assert sd.format_question(" Why? ") == "Why?"
    q = sd.format_question("Pick one.", ["x", "y"])
    assert q == "Pick one.\nA. x\nB. y\nAnswer with the option letter."
    assert sd.format_question(q, ["x", "y"]) == q  # options already written in: unchanged
    assert sd.format_question("Pick.\nA. x\nB. y", ["x", "y"]) == "Pick.\nA. x\nB. y\nAnswer with the option letter."


# =============================================================================================
# synthesis
# =============================================================================================

STAGE_MARK = {stage: prompt.splitlines()[0] for stage, prompt in
              zip(syn.STAGES, (syn.DESCRIBE_PROMPT, syn.REASON_PROMPT, syn.ANCHOR_PROMPT))}
GOLD = {"ok1": "12", "ok2": "blue", "okmc": "B", "r500": "7", "r429": "8", "rslow": "9", "rjson": "10",
        "rwrong": "11", "rwrong3": "13", "rfail": "14", "rbad": "15"}
FAIL_ALWAYS = {"rfail", "rbad"}
CLIENT_TIMEOUT = 0.5


def _reply(rid, stage):
    """The deterministic teacher: right answers, except rwrong (stage 2) and rwrong3 (stage 3)."""
    gold = GOLD[rid]
    if stage == "describe":
        return f"1. Global scan: a figure for {rid}.\n2. Elements: a triangle.\n3. Linking: none.\n4. Synthesis: ok."
    if stage == "reason":
        ans = "999" if rid == "rwrong" else gold
        return f"The triangle has side 3. Wait, let me re-check the side: it is 3. So the answer is {ans}.\n<answer>{ans}</answer>"
    ans = "998" if rid == "rwrong3" else gold
    return (f"<think>Looking back at the triangle in the image, its side is 3. Let me check the image again: "
            f"yes, 3. So the answer is {ans}.</think>\n<answer>{ans}</answer>")


def _identify(text):
    stage = next(s for s, mark in STAGE_MARK.items() if mark in text)
    rid = re.search(r"Problem (\w+):", text).group(1)
    return stage, rid


class FakeAPI:
    """An OpenAI-compatible /chat/completions server on 127.0.0.1 that injects failures."""

    def __init__(self):
        self.log = []  # (rid, stage, n_images, status)
        self.attempts = {}
        self.lock = threading.Lock()
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code, body, headers=()):
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    for k, v in headers:
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (the slow reply)

            def do_POST(self):
                req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != "/v1/chat/completions":
                    return self._send(404, b'{"error": "not found"}')
                if self.headers.get("Authorization") != "Bearer sk-test":
                    return self._send(401, b'{"error": "bad key"}')
                assert req["model"] == "teacher-x"
                content = req["messages"][-1]["content"]
                parts = content if isinstance(content, list) else [{"type": "text", "text": content}]
                text = "".join(p.get("text", "") for p in parts if p["type"] == "text")
                images = []
                for p in parts:
                    if p["type"] == "image_url":
                        url = p["image_url"]["url"]
                        assert url.startswith("data:image/png;base64,")
                        import base64
                        import io
                        images.append(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size)
                stage, rid = _identify(text)
                with api.lock:
                    n = api.attempts[(rid, stage)] = api.attempts.get((rid, stage), 0) + 1
                status = 200
                if rid == "rfail" and stage == "describe":
                    status = 503
                elif rid == "rbad" and stage == "describe":
                    status = 400
                elif rid == "r500" and stage == "describe" and n == 1:
                    status = 500
                elif rid == "r429" and stage == "reason" and n == 1:
                    status = 429
                with api.lock:
                    api.log.append((rid, stage, images, status if not (rid == "rslow" and stage == "anchor" and n == 1)
                                    else "slow"))
                if status != 200:
                    headers = [("Retry-After", "0")] if status == 429 else []
                    return self._send(status, b'{"error": "injected"}', headers)
                if rid == "rjson" and stage == "describe" and n == 1:
                    return self._send(200, b'{"choices": [{"message": ')  # cut short
                if rid == "rslow" and stage == "anchor" and n == 1:
                    time.sleep(CLIENT_TIMEOUT + 0.4)
                body = {"id": "x", "object": "chat.completion",
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": _reply(rid, stage)},
                                     "finish_reason": "stop"}]}
                self._send(200, json.dumps(body).encode())

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def api():
    server = FakeAPI()
    yield server
    server.close()


def _write_raw(tmp_path, ids):
    """Raw problems under tmp/raw with images in tmp/raw/imgs (paths relative to the jsonl)."""
    raw = tmp_path / "raw"
    (raw / "imgs").mkdir(parents=True)
    lines = []
    for i, rid in enumerate(ids):
        Image.new("RGB", (40 + i, 30), (i * 20 % 255, 100, 200)).save(raw / "imgs" / f"{rid}.png")
        rec = {"id": rid, "images": [f"imgs/{rid}.png"], "question": f"Problem {rid}: what is the value?",
               "answer": GOLD[rid]}
        if rid == "okmc":
            rec.update(question=f"Problem {rid}: which value?", options=["3", "4", "5"], answer_type="multi_choice")
        lines.append(json.dumps(rec))
    (raw / "raw.jsonl").write_text("\n".join(lines) + "\n")
    return raw / "raw.jsonl"


def _teacher(api, **kw):
    args = dict(api_key="sk-test", timeout=CLIENT_TIMEOUT, max_retries=2, backoff=0.01, temperature=0.0)
    args.update(kw)
    return syn.OpenAITeacher(api.url, "teacher-x", **args)


def test_synthesis_against_a_flaky_server(api, tmp_path):
    raw = _write_raw(tmp_path, list(GOLD))
    out = tmp_path / "out" / "cold_start.jsonl"
    teacher = _teacher(api)
    counts = syn.synthesize(raw, out, teacher)
    assert counts["done"] == 7  # ok1 ok2 okmc r500 r429 rslow rjson
    assert counts["filtered"] == 2  # rwrong (stage 2), rwrong3 (stage 3)
    assert counts["failed"] == 2 and sorted(counts["failed_ids"]) == ["rbad", "rfail"]
    assert counts["skipped"] == 0 and counts["total"] == len(GOLD)

    # the retries happened, and only where they should
    statuses = {}
    for rid, stage, _, status in api.log:
        statuses.setdefault((rid, stage), []).append(status)
    assert statuses[("r500", "describe")] == [500, 200]
    assert statuses[("r429", "reason")] == [429, 200]
    assert statuses[("rslow", "anchor")] == ["slow", 200]
    assert statuses[("rjson", "describe")] == [200, 200]  # the first reply was cut short
    assert statuses[("rfail", "describe")] == [503] * 3  # 1 + max_retries, then given up
    assert statuses[("rbad", "describe")] == [400]  # a 4xx is not retried
    assert ("rwrong", "anchor") not in statuses  # a wrong chain is not anchored
    assert teacher.stats["retries"] == 1 + 1 + 1 + 1 + 2
    # images go to stages 1 and 3, as data URLs of the record's own image; stage 2 is text only
    for rid, stage, images, _ in api.log:
        if stage == "reason":
            assert images == []
        else:
            assert images == [(40 + list(GOLD).index(rid), 30)]

    recs = _read_jsonl(out)
    assert [r["id"] for r in recs] == ["ok1", "ok2", "okmc", "r500", "r429", "rslow", "rjson"]  # input order
    from grading import extract_answer, format_ok
    for r in recs:
        assert set(r) == {"id", "images", "question", "response", "answer"}
        assert r["images"] == [f"../raw/imgs/{r['id']}.png"]  # relative to the output's folder
        assert (out.parent / r["images"][0]).is_file()
        assert format_ok(r["response"])
        m = re.fullmatch(r"<think>(.+)</think><answer>(.+)</answer>", r["response"], re.S)
        assert m and "Looking back at the triangle" in m.group(1)
        assert extract_answer(r["response"]) == r["answer"] == GOLD[r["id"]]
    mc = next(r for r in recs if r["id"] == "okmc")
    from data import build_prompt
    assert mc["question"] == build_prompt({"question": "Problem okmc: which value?", "options": ["3", "4", "5"],
                                           "answer_type": "multi_choice"})
    filtered = {r["id"]: r for r in _read_jsonl(str(out) + ".filtered")}
    assert set(filtered) == {"rwrong", "rwrong3"}
    assert "stage 2" in filtered["rwrong"]["reason"] and filtered["rwrong"]["pred"] == "999"
    assert "stage 3" in filtered["rwrong3"]["reason"]

    # a rerun skips everything done or filtered: the server only sees the failed records again
    before = len(api.log)
    counts = syn.synthesize(raw, out, _teacher(api))
    assert counts["skipped"] == 9 and counts["done"] == 0 and counts["failed"] == 2
    assert {rid for rid, *_ in api.log[before:]} == {"rfail", "rbad"}
    assert [r["id"] for r in _read_jsonl(out)] == [r["id"] for r in recs]


def test_cli_fail_fast_and_api_key_env(api, tmp_path, monkeypatch):
    raw = _write_raw(tmp_path, ["ok1", "rbad", "ok2"])
    out = tmp_path / "cold.jsonl"
    monkeypatch.setenv("TEST_TEACHER_KEY", "sk-test")
    argv = ["--input", str(raw), "--output", str(out), "--base-url", api.url, "--model", "teacher-x",
            "--api-key-env", "TEST_TEACHER_KEY", "--timeout", "0.5", "--backoff", "0.01", "--max-retries", "1"]
    with pytest.raises(RuntimeError, match="rbad"):
        syn.main(argv + ["--fail-fast"])
    assert [r["id"] for r in _read_jsonl(out)] == ["ok1"]  # what finished before is kept
    counts = syn.main(argv)  # without the flag the run goes on past the failure
    assert (counts["skipped"], counts["done"], counts["failed"]) == (1, 1, 1)
    assert [r["id"] for r in _read_jsonl(out)] == ["ok1", "ok2"]
    assert _read_jsonl(out)[0]["images"] == ["raw/imgs/ok1.png"]


def test_teacher_errors_are_clear(api):
    for url, key, code in ((api.url, "sk-wrong", 401), (api.url.replace("/v1", "/nope"), "sk-test", 404)):
        t = syn.OpenAITeacher(url, "teacher-x", api_key=key, max_retries=3, backoff=0.01, timeout=CLIENT_TIMEOUT)
        with pytest.raises(syn.TeacherError, match=f"HTTP {code}"):  # a 4xx other than 429: at once
            t.chat([{"role": "user", "content": "hi"}], [])
        assert t.stats["requests"] == 1
    t = syn.OpenAITeacher("http://127.0.0.1:9/v1", "m", timeout=0.2, max_retries=2, backoff=0.01)
    with pytest.raises(syn.TeacherError, match="gave up after 3 attempts"):  # connection refused, retried
        t.chat([{"role": "user", "content": "hi"}], [])
    assert t.stats == {"requests": 3, "retries": 2, "failures": 1}


class ScriptedTeacher:
    """An in-process deterministic teacher; raises once `crash_after` records were described."""

    def __init__(self, crash_after=None):
        self.crash_after, self.described = crash_after, 0
        self.lock = threading.Lock()

    def chat(self, messages, images):
        stage, rid = _identify(messages[-1]["content"])
        if stage == "describe":
            with self.lock:
                if self.crash_after is not None and self.described >= self.crash_after:
                    raise ConnectionError("teacher went away")
                self.described += 1
        return _reply(rid, stage)


def test_killed_run_resumes_to_the_same_file(tmp_path):
    ids = ["ok1", "rwrong", "ok2", "okmc", "r500", "rwrong3", "r429", "rslow"]
    raw = _write_raw(tmp_path, ids)
    ref = tmp_path / "a" / "out.jsonl"
    assert syn.synthesize(raw, ref, ScriptedTeacher())["done"] == 6

    out = tmp_path / "b" / "out.jsonl"
    with pytest.raises(RuntimeError, match="fail-fast"):
        syn.synthesize(raw, out, ScriptedTeacher(crash_after=4), fail_fast=True)
    assert [r["id"] for r in _read_jsonl(out)] == ["ok1", "ok2", "okmc"]  # rwrong was filtered
    with open(out, "a") as f:  # and the kill came in the middle of a write
        f.write('{"id": "r500", "images": ["../ra')
    counts = syn.synthesize(raw, out, ScriptedTeacher())
    assert (counts["skipped"], counts["done"], counts["filtered"]) == (4, 3, 1)
    assert out.read_bytes() == ref.read_bytes()
    assert sorted(_read_jsonl(str(out) + ".filtered"), key=str) == sorted(_read_jsonl(str(ref) + ".filtered"), key=str)

    # several records in flight still write the same file, in input order
    par = tmp_path / "c" / "out.jsonl"
    syn.synthesize(raw, par, ScriptedTeacher(), workers=3)
    assert par.read_bytes() == ref.read_bytes()


def test_bad_input_names_file_and_line(tmp_path):
    raw = _write_raw(tmp_path, ["ok1", "ok2"])
    lines = raw.read_text().splitlines()
    bad = tmp_path / "raw" / "bad.jsonl"
    bad.write_text(lines[0] + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: bad JSON"):
        syn.synthesize(bad, tmp_path / "o.jsonl", ScriptedTeacher())
    missing = tmp_path / "raw" / "missing.jsonl"
    missing.write_text(lines[0] + "\n" + lines[1].replace("imgs/ok2.png", "imgs/gone.png") + "\n")
    with pytest.raises(ValueError, match=r"missing\.jsonl:2: image file not found: 'imgs/gone.png'"):
        syn.synthesize(missing, tmp_path / "o.jsonl", ScriptedTeacher())
    assert not (tmp_path / "o.jsonl").exists()  # checked before any teacher call
    out = tmp_path / "o2.jsonl"
    out.write_text('{"id": "ok1"}\nbroken\n{"id": "ok2"}\n')
    with pytest.raises(ValueError, match=r"o2\.jsonl:2"):
        syn.synthesize(raw, out, ScriptedTeacher())


def test_normalize_response():
    n = syn.normalize_response
    assert n("<think>a</think><answer>1</answer>") == "<think>a</think><answer>1</answer>"
    assert n("```\n<think> a </think>\n\n<answer> 1 </answer>\n```") == "<think>a</think><answer>1</answer>"
    assert n("reasoning here\n<answer>1</answer> trailing") == "<think>reasoning here</think><answer>1</answer>"
    assert n("<think>a</think>") is None
    assert n("<answer>1</answer>") is None  # no reasoning at all
    assert n("<think>a<think>b</think><answer>1</answer>") is None
    assert n("<think>first <answer>2</answer>, then</think><answer>1</answer>") == \
        "<think>first 2, then</think><answer>1</answer>"
    from grading import format_ok
    for text in ("<think>a</think><answer>1</answer>", "x\n<answer>1</answer>",
                 "<think>q <answer>2</answer></think> <answer>1</answer> bye"):
        assert format_ok(n(text))


def test_local_teacher_runs_the_projects_generation(tmp_path):
    """The local teacher: a model folder run by model.generate, with images in the user turn."""
    toy.make_toy_model(str(tmp_path / "m"))
    teacher = syn.LocalTeacher(str(tmp_path / "m"), max_new_tokens=12)
    img = Image.new("RGB", (56, 56), (255, 0, 0))
    a = teacher.chat([{"role": "user", "content": "Describe the image."}], [img])
    b = teacher.chat([{"role": "user", "content": "Describe the image."}], [img])
    assert isinstance(a, str) and a == b  # greedy: deterministic
    n = teacher.model.cfg.vocab_size
    assert n == 272 and teacher.tok.vocab_size == 270


def test_synthesized_records_train_with_train_sft(api, tmp_path):
    """The whole pipeline: raw problems -> the flaky local server -> cold-start records -> SFT steps."""
    import train_sft

    raw = _write_raw(tmp_path, list(GOLD))
    out = tmp_path / "out" / "cold_start.jsonl"
    assert syn.synthesize(raw, out, _teacher(api))["done"] == 7
    toy.make_toy_model(str(tmp_path / "model"))
    run = tmp_path / "run"
    train_sft.main(["--data", str(out), "--model", str(tmp_path / "model"), "--out", str(run), "--max-steps", "2",
                    "--batch-size", "4", "--micro-batch", "2", "--lr", "1e-3", "--num-workers", "0",
                    "--save-every", "0", "--min-pixels", "3136", "--max-pixels", "12544"])
    metrics = _read_jsonl(run / "metrics.jsonl")
    assert len(metrics) == 2 and all(m["n_tokens"] > 0 for m in metrics)
    assert (run / "latest").read_text().strip() == "step_2"


def test_teachers_see_transparent_images_composited_on_white(tmp_path):
    """A chart PNG with transparency reaches every teacher stage as transformers' processor sees it:
    alpha composited on white (transparent red pixels are white, not red)."""
    raw = _write_raw(tmp_path, ["ok1"])
    rgba = np.zeros((30, 40, 4), dtype=np.uint8)
    rgba[..., 0] = 255                  # red everywhere ...
    rgba[:, 20:, 3] = 255               # ... opaque on the right half, transparent on the left
    Image.fromarray(rgba, "RGBA").save(raw.parent / "imgs" / "ok1.png")
    seen = []

    class Recording(ScriptedTeacher):
        def chat(self, messages, images):
            seen.extend(np.asarray(im) for im in images)
            return super().chat(messages, images)

    assert syn.synthesize(raw, tmp_path / "out.jsonl", Recording())["done"] == 1
    assert seen and all(px.shape == (30, 40, 3) for px in seen)
    for px in seen:
        assert (px[:, :20] == 255).all() and (px[:, 20:] == [255, 0, 0]).all()
