"""What the two toy experiments share (toy_world.py, tally_world.py): running a command with one
thread, the statistics over seeds (mean and Student-t interval, Fisher-z interval of a
correlation, the verdict rule), a scatter plot drawn with pillow, and the README section writer."""

import json
import math
import os
import subprocess
import sys

from PIL import Image, ImageDraw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the project's modules

from hub import model_identity  # noqa: E402
from plot import nice_ticks  # noqa: E402
from vas import betainc  # noqa: E402


def run(cmd, log=None):
    print("+", " ".join(cmd), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    with open(log, "w") if log else open(os.devnull, "w") as f:
        subprocess.run(cmd, check=True, env=env, stdout=f, stderr=subprocess.STDOUT)


def t_quantile(df, level=0.95):
    """The two-sided Student t quantile: t with P(|T| > t) = 1 - level, by bisection on
    P(|T| > t) = I_{df / (df + t^2)}(df / 2, 1 / 2) (vas.betainc, the p value of vas.pearson_p)."""

    lo, hi = 0.0, 1e3
    for _ in range(200):
        mid = (lo + hi) / 2
        if betainc(df / 2, 0.5, df / (df + mid * mid)) > 1 - level:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def mean_ci(values, level=0.95):
    """Mean and its t-interval over seeds: mean +- t_{df = n - 1} * sd / sqrt(n)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(v)]
    n = len(xs)
    if n == 0:
        return {"mean": None, "ci_low": None, "ci_high": None, "n": 0}
    m = sum(xs) / n
    if n == 1:
        return {"mean": m, "ci_low": None, "ci_high": None, "n": 1}
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    half = t_quantile(n - 1, level) * sd / math.sqrt(n)
    return {"mean": m, "ci_low": m - half, "ci_high": m + half, "n": n}


def scatter_png(points, path, title, corr, colours, x_label="VAS (held-out prompts, all layers and heads)",
                y_label="accuracy %"):
    """x (VAS) against y (accuracy, 0-100), one dot per (arm, x, y) point, coloured by arm; a legend and axes."""
    W, H, L, R, T, B = 900, 560, 70, 230, 40, 60
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    xs = [p[1] for p in points]
    x0, x1 = min(xs), max(xs)
    pad = 0.05 * (x1 - x0 or 1)
    x0, x1 = x0 - pad, x1 + pad
    y0, y1 = 0.0, 100.0

    def px(x, y):
        return L + (x - x0) / (x1 - x0) * (W - L - R), H - B - (y - y0) / (y1 - y0) * (H - T - B)

    d.rectangle((L, T, W - R, H - B), outline="black")
    for t in nice_ticks(x0, x1):
        if x0 <= t <= x1:
            x, _ = px(t, 0)
            d.line((x, H - B, x, H - B + 5), fill="black")
            d.text((x - 12, H - B + 8), f"{t:.3g}", fill="black")
    for t in range(0, 101, 20):
        _, y = px(x0, t)
        d.line((L - 5, y, L, y), fill="black")
        d.line((L, y, W - R, y), fill=(230, 230, 230))
        d.text((L - 30, y - 6), f"{t}", fill="black")
    d.text(((L + W - R) // 2 - 100, H - 28), x_label, fill="black")
    d.text((8, T - 28), y_label, fill="black")
    d.text((L + 90, 10), title, fill="black")
    for arm, x, y in points:
        cx, cy = px(x, y)
        d.ellipse((cx - 5, cy - 5, cx + 5, cy + 5), fill=colours.get(arm, (0, 0, 0)), outline="black")
    arms = [a for a in colours if any(p[0] == a for p in points)]
    for i, arm in enumerate(arms):
        y = T + 10 + 22 * i
        d.ellipse((W - R + 15, y, W - R + 25, y + 10), fill=colours[arm], outline="black")
        d.text((W - R + 32, y - 1), arm, fill="black")
    d.text((W - R + 15, T + 20 + 22 * len(arms)), f"Pearson r = {corr['r']:.3f}" if corr["r"] is not None else "r: -",
           fill="black")
    d.text((W - R + 15, T + 36 + 22 * len(arms)), f"p = {corr['p']:.2g}, n = {corr['n']}" if corr["p"] is not None
           else "", fill="black")
    img.save(path)


def fmt_ci(s, digits=1):
    if s["mean"] is None:
        return "-"
    if s["ci_low"] is None:
        return f"{s['mean']:.{digits}f}"
    return f"{s['mean']:.{digits}f} [{s['ci_low']:.{digits}f}, {s['ci_high']:.{digits}f}]"


def fmt_vas(s):
    if s["mean"] is None:
        return "-"
    d = 3 if abs(s["mean"]) < 10 else 1
    if abs(s["mean"]) >= 1e4:
        lo = "" if s["ci_low"] is None else f" [{s['ci_low']:.3g}, {s['ci_high']:.3g}]"
        return f"{s['mean']:.3g}{lo}"
    return fmt_ci(s, d)


def update_readme(section, begin, end, path=os.path.join(ROOT, "README.md")):
    """Replace the text between the markers begin and end (both part of `section`), or append it."""
    text = open(path).read()
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    with open(path, "w") as f:
        f.write(text)


def eval_state(folder, model_dir, n_rows):
    """"done": `folder` holds a finished evaluation (n_rows rows: one per setting and benchmark) of
    the weights in `model_dir` as they are now; "other": it holds one of other weights (the arm was
    trained again), which evaluate.py would refuse; None: no evaluation yet, or an unfinished one."""
    try:
        with open(os.path.join(folder, "summary.json")) as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return None
    made_by = ((summary.get("provenance") or {}).get("model") or {}).get("sha256")
    if made_by != model_identity(model_dir)["sha256"]:
        return "other"
    return "done" if len(summary.get("rows", [])) == n_rows else None


def fisher_ci(r, n, level=0.95):
    """The interval of a Pearson r from n pairs: tanh(atanh(r) +- z / sqrt(n - 3)), z the normal
    quantile (1.96 at 95%). None where n < 4 or r is None."""
    if r is None or n < 4:
        return None, None
    z = {0.95: 1.959964}[level]
    r = max(min(r, 1 - 1e-12), -1 + 1e-12)
    half = z / math.sqrt(n - 3)
    return math.tanh(math.atanh(r) - half), math.tanh(math.atanh(r) + half)


def verdict(lo, hi):
    """The verdict rule of the pre-registration: an interval above zero holds, below zero does
    not hold, one that contains zero (or is missing) is inconclusive."""
    if lo is None or hi is None:
        return "inconclusive"
    return "holds" if lo > 0 else "does not hold" if hi < 0 else "inconclusive"
