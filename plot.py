"""Training curves as pictures: a run's metrics.jsonl drawn with pillow, one panel per metric.

As LLaMA-Factory's plot_loss draws them, every value is drawn twice: the raw values faint, and
over them a moving average whose weight grows with the number of points n,

    w = 1.8 (sigmoid(0.05 n) - 0.5)          (0.02 for 1 point, 0.22 for 10, 0.89 for 100, -> 0.9)
    s_1 = x_1,   s_i = w s_(i-1) + (1 - w) x_i

so a short run is drawn nearly as it is and a long one is smoothed. Each trainer has its panels
(SFT_PANELS, GRPO_PANELS); several runs share one figure, a colour and a legend entry each.

    read_metrics      the rows of a run's metrics.jsonl
    smooth            the moving average above
    nice_ticks, Axis  the ticks of a range, data -> pixel
    draw_curves       the figure: a panel per metric, the runs overlaid
    save_run_curves   what train_sft.py and train_grpo.py call at every save (rank 0):
                      OUT/training_curves.png

A step whose value is None or absent (a term the run does not compute, e.g. kl without
--kl-coef) is left out of that panel; NaN and infinities are not drawn but counted in the panel;
a panel without any value says so.

Run:
    python plot.py runs/sft                                   # -> curves.png
    python plot.py runs/sft_a runs/sft_b --out compare.png    # overlaid, the legend names each run
    python plot.py runs/grpo --keys reward,accuracy,kl        # any keys of metrics.jsonl
"""

import argparse
import json
import math
import os

from PIL import Image, ImageDraw, ImageFont

from data import UserError, run_cli

CURVES_PNG = "training_curves.png"

# (key in metrics.jsonl, panel title, y-axis label with the unit)
SFT_PANELS = [
    ("lm_loss", "LM loss", "nats per response token"),
    ("enhance", "L_enhance", "-log attention on the image (nats)"),
    ("suppress", "L_suppress", "log attention on the system (nats)"),
    ("sys_share", "system share of the user turn's attention", "fraction of attention"),
    ("lr", "learning rate", "learning rate"),
    ("grad_norm", "gradient norm before clipping", "global L2 norm"),
]
GRPO_PANELS = [
    ("reward", "reward r = r_acc + lambda_v r_visual + lambda_f r_format", "mean per sample"),
    ("accuracy", "accuracy (r_acc)", "fraction correct"),
    ("reward_format", "r_format", "fraction well formed"),
    ("reward_visual", "r_visual (0 for wrong answers)", "mean per sample"),
    ("kl", "KL to the initial policy (k3)", "nats per token"),
    ("clip_frac", "clip fraction", "fraction of tokens"),
    ("response_length", "response length", "tokens"),
    ("entropy", "entropy of the policy", "nats per token"),
]
X_LABELS = {"sft": "optimizer step", "grpo": "rollout step"}
UNSMOOTHED = {"lr"}  # a schedule, not a noisy measurement: drawn as it is

# matplotlib's tab10, one colour per run
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
FAINT = 0.3  # the raw values: the run's colour at this opacity on white
GRID, FRAME, MUTED = (232, 232, 232), (90, 90, 90), (110, 110, 110)
PLOT_W, PLOT_H = 440, 260  # the plot box of one panel
LEFT, RIGHT, TOP, BOTTOM = 86, 24, 34, 50  # the panel's margins around its plot box


# --------------------------------------------------------------------------------------------
# The data
# --------------------------------------------------------------------------------------------


def read_metrics(path: str) -> list[dict]:
    """The rows of a run folder's metrics.jsonl (or of that file), in order. A last line without
    its newline (the trainer is writing it) is left out; any other line that is not a JSON object
    with a numeric `step` is a UserError naming it."""
    if not os.path.exists(path):
        raise UserError(f"{path}: no such run folder or metrics file")
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read the metrics ({e})") from None
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            if n == len(lines):  # after the last newline: being written
                continue
            raise UserError(f"{path}: line {n} is not JSON") from None
        if not isinstance(row, dict) or not _number(row.get("step")):
            raise UserError(f"{path}: line {n} is not a metrics row (a JSON object with a numeric `step`)")
        rows.append(row)
    return rows


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def series(rows: list[dict], key: str):
    """(steps, values, n_nonfinite): the finite values of `key`, with their steps."""
    steps, values, bad = [], [], 0
    for r in rows:
        v = r.get(key)
        if not _number(v):
            continue
        if not math.isfinite(v):
            bad += 1
            continue
        steps.append(float(r["step"]))
        values.append(float(v))
    return steps, values, bad


def ema_weight(n: int) -> float:
    """LLaMA-Factory's smoothing weight for n points: 1.8 (sigmoid(0.05 n) - 0.5)."""
    return 1.8 * (1 / (1 + math.exp(-0.05 * n)) - 0.5)


def smooth(values: list[float]) -> list[float]:
    """The moving average of the module docstring, starting at the first value."""
    w, out = ema_weight(len(values)), []
    for v in values:
        out.append(v if not out else w * out[-1] + (1 - w) * v)
    return out


def run_kind(rows: list[dict], name: str) -> str:
    """"sft" or "grpo", from the keys the trainer writes."""
    keys = {k for r in rows for k in r}
    if "reward" in keys:
        return "grpo"
    if "lm_loss" in keys:
        return "sft"
    raise UserError(f"{name}: neither an SFT run (lm_loss) nor a GRPO run (reward); name the panels with --keys")


# --------------------------------------------------------------------------------------------
# Axes
# --------------------------------------------------------------------------------------------


def nice_ticks(lo, hi, n=5):
    """Round tick values (1, 2 or 5 times a power of ten apart, at most about n of them) from at or
    below lo up to hi."""
    span = hi - lo if hi > lo else 1.0
    step = 10 ** math.floor(math.log10(span / n))
    for m in (1, 2, 5, 10):
        if span / (m * step) <= n:
            step *= m
            break
    start = math.floor(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step) + 2) if start + i * step <= hi + 1e-9]


def tick_label(t: float, step: float) -> str:
    """A tick value with as many decimals as the tick step needs: 0.05, 120; 2e-6, 2.5e-4 below
    1e-3 or from 1e6 on."""
    if abs(t) < abs(step) * 1e-6:
        return "0"
    if 1e-3 <= abs(t) < 1e6:
        return f"{t:.{max(0, -math.floor(math.log10(step) + 1e-9))}f}"
    mantissa, exponent = f"{t:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def data_range(values, pad: float):
    """[min, max] widened by `pad` of the span on each side. A constant is drawn against zero:
    [0, v] (or [v, 0]), and 0 in [0, 1]."""
    lo, hi = min(values), max(values)
    if hi == lo:
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        hi = hi if hi > lo else lo + 1.0
    return lo - pad * (hi - lo), hi + pad * (hi - lo)


class Axis:
    """A plot box in pixels (left, top, right, bottom) and the data range it shows."""

    def __init__(self, box, x0, x1, y0, y1):
        self.box, self.x0, self.x1, self.y0, self.y1 = box, x0, x1, y0, y1

    def px(self, x, y):
        l, t, r, b = self.box
        return l + (x - self.x0) / (self.x1 - self.x0) * (r - l), b - (y - self.y0) / (self.y1 - self.y0) * (b - t)


def font(size: int):
    try:
        return ImageFont.load_default(size=size)  # scalable (Pillow >= 10.1 with FreeType)
    except TypeError:  # an older Pillow: its fixed bitmap font
        return ImageFont.load_default()


def faint(colour):
    return tuple(round(255 - FAINT * (255 - c)) for c in colour)


def text_size(d, text, f):
    l, t, r, b = d.textbbox((0, 0), text, font=f)
    return r - l, b - t


def vertical_text(img, centre, text, f, fill="black"):
    """`text` turned 90 degrees (read bottom to top), centred at `centre`."""
    w, h = text_size(ImageDraw.Draw(img), text, f)
    mask = Image.new("L", (w + 4, h + 8), 0)
    ImageDraw.Draw(mask).text((2, 2), text, fill=255, font=f)
    mask = mask.rotate(90, expand=True)
    img.paste(Image.new("RGB", mask.size, fill), (round(centre[0] - mask.width / 2),
                                                  round(centre[1] - mask.height / 2)), mask)


# --------------------------------------------------------------------------------------------
# The figure
# --------------------------------------------------------------------------------------------


def draw_panel(img, d, ax: Axis, title, ylabel, xlabel, runs, fonts, smoothed=True):
    """One panel: grid, frame, ticks, labels, then every run's raw values (faint) and their smoothed
    line (smoothed=False: the values as one solid line). runs: [(colour, steps, values, n_nonfinite)]."""
    l, t, r, b = ax.box
    small, normal = fonts
    xticks = [v for v in nice_ticks(ax.x0, ax.x1, 6) if ax.x0 <= v <= ax.x1 and float(v).is_integer()]
    yticks = [v for v in nice_ticks(ax.y0, ax.y1, 5) if ax.y0 <= v <= ax.y1]
    ystep = yticks[1] - yticks[0] if len(yticks) > 1 else abs(ax.y1 - ax.y0)
    for v in xticks:
        x, _ = ax.px(v, ax.y0)
        d.line((x, t, x, b), fill=GRID)
        d.line((x, b, x, b + 5), fill=FRAME)
        w, _ = text_size(d, f"{v:.0f}", small)
        d.text((x - w / 2, b + 8), f"{v:.0f}", fill="black", font=small)
    for v in yticks:
        _, y = ax.px(ax.x0, v)
        d.line((l, y, r, y), fill=GRID)
        d.line((l - 5, y, l, y), fill=FRAME)
        label = tick_label(v, ystep)
        w, h = text_size(d, label, small)
        d.text((l - 8 - w, y - h / 2 - 2), label, fill="black", font=small)
    d.rectangle((l, t, r, b), outline=FRAME)
    d.text((l, t - 24), title, fill="black", font=normal)
    w, _ = text_size(d, xlabel, small)
    d.text(((l + r - w) / 2, b + 28), xlabel, fill=MUTED, font=small)
    vertical_text(img, (l - LEFT + 14, (t + b) / 2), ylabel, small, MUTED)
    if not any(values for _, _, values, _ in runs):
        msg = "no values in metrics.jsonl"
        w, h = text_size(d, msg, normal)
        d.text(((l + r - w) / 2, (t + b - h) / 2), msg, fill=MUTED, font=normal)
    sparse = max(len(v) for _, _, v, _ in runs) <= PLOT_W / 6  # few enough points to mark each one
    for colour, steps, values, _ in runs if smoothed else []:  # the raw values first, under every line
        pts = [ax.px(x, y) for x, y in zip(steps, values)]
        if len(pts) > 1:
            d.line(pts, fill=faint(colour), width=1)
        if sparse or len(pts) == 1:
            for x, y in pts:
                d.ellipse((x - 3, y - 3, x + 3, y + 3), fill=faint(colour))
    for colour, steps, values, _ in runs:
        pts = [ax.px(x, y) for x, y in zip(steps, smooth(values) if smoothed else values)]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2, joint="curve")
        elif pts:
            x, y = pts[0]
            d.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
    bad = sum(n for _, _, _, n in runs)
    if bad:
        msg = f"{bad} non-finite value{'s' if bad > 1 else ''} not drawn"
        w, _ = text_size(d, msg, small)
        d.text((r - w, t - 20), msg, fill=(200, 30, 30), font=small)


def draw_curves(runs, panels, xlabel="step", title="training curves", columns=None):
    """The figure of `runs` ([(name, rows)]), one panel per (key, title, ylabel) of `panels`, the
    runs overlaid in PALETTE's colours. Returns the image and each key's Axis, so that a point's
    pixel can be checked."""
    columns = columns or (3 if len(panels) <= 6 else 4)
    rows_n = math.ceil(len(panels) / columns)
    small, normal, big = font(12), font(14), font(17)
    cell_w, cell_h = LEFT + PLOT_W + RIGHT, TOP + PLOT_H + BOTTOM
    width = max(columns * cell_w + 20, 600)
    # the legend: one entry per run, in as many lines as the width needs
    entries = [(PALETTE[i % len(PALETTE)], f"{name} ({len(rows)} steps, smoothing weight {ema_weight(len(rows)):.2f})")
               for i, (name, rows) in enumerate(runs)]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines, x = [[]], 0
    for colour, label in entries:
        w = 40 + text_size(probe, label, normal)[0] + 24
        if x + w > width - 40 and lines[-1]:
            lines.append([])
            x = 0
        lines[-1].append((colour, label))
        x += w
    head = 40 + 24 * len(lines) + 26
    img = Image.new("RGB", (width, head + rows_n * cell_h + 10), "white")
    d = ImageDraw.Draw(img)
    d.text((20, 12), title, fill="black", font=big)
    for j, line in enumerate(lines):
        x, y = 20, 44 + 24 * j
        for colour, label in line:
            d.line((x, y + 8, x + 30, y + 8), fill=colour, width=3)
            d.text((x + 38, y), label, fill="black", font=normal)
            x += 40 + text_size(d, label, normal)[0] + 24
    note = ("faint: the value of every step; solid: their moving average s = w s + (1 - w) x, "
            "w = 1.8 (sigmoid(0.05 n) - 0.5) for a curve of n points (LLaMA-Factory's); the learning rate as it is")
    d.text((20, 44 + 24 * len(lines)), note, fill=MUTED, font=small)
    # every panel shows the steps of all runs: 2% of the span beyond them, or +-1 around one step
    steps = [float(r["step"]) for _, rows in runs for r in rows] or [1.0]
    x0, x1 = data_range(steps, 0.02) if min(steps) < max(steps) else (steps[0] - 1, steps[0] + 1)
    axes = {}
    for i, (key, ptitle, ylabel) in enumerate(panels):
        cx, cy = 10 + (i % columns) * cell_w, head + (i // columns) * cell_h
        box = (cx + LEFT, cy + TOP, cx + LEFT + PLOT_W, cy + TOP + PLOT_H)
        data = [(PALETTE[j % len(PALETTE)], *series(rows, key)) for j, (_, rows) in enumerate(runs)]
        ys = [v for _, _, values, _ in data for v in values]
        ax = Axis(box, x0, x1, *(data_range(ys, 0.06) if ys else (0.0, 1.0)))
        draw_panel(img, d, ax, ptitle, ylabel, xlabel, data, (small, normal), key not in UNSMOOTHED)
        axes[key] = ax
    return img, axes


def save_png(img, path: str):
    """Written under a temporary name and renamed: a viewer never reads half a file."""
    tmp = path + ".partial"
    img.save(tmp, format="PNG")
    os.replace(tmp, path)


def save_run_curves(out: str, kind: str, warn=print) -> str | None:
    """OUT/training_curves.png from OUT/metrics.jsonl, with the panels of `kind` ("sft", "grpo").
    The trainers call this at every save. The figure is a view of the run, never a reason to stop
    it: whatever goes wrong while drawing is one warning line, and the run goes on."""
    path = os.path.join(out, CURVES_PNG)
    try:
        rows = read_metrics(out)
        last = f", {len(rows)} steps" if rows else ""
        img, _ = draw_curves([(out, rows)], SFT_PANELS if kind == "sft" else GRPO_PANELS, X_LABELS[kind],
                             f"{out}: {kind.upper()} training curves{last}")
        save_png(img, path)
    except Exception as e:  # noqa: BLE001 (see the docstring)
        warn(f"warning: {path} not drawn ({type(e).__name__}: {e})")
        return None
    return path


# --------------------------------------------------------------------------------------------
# CLI: several runs on one figure
# --------------------------------------------------------------------------------------------


def panel_of(key: str):
    """The panel of a metrics.jsonl key: the trainers' title and unit where they have one."""
    for p in SFT_PANELS + GRPO_PANELS:
        if p[0] == key:
            return p
    return (key, key, key)


def main(argv=None):
    p = argparse.ArgumentParser(description="Training curves of one or several runs (their metrics.jsonl), "
                                            "overlaid on one figure")
    p.add_argument("runs", nargs="+", help="run folders (train_sft.py / train_grpo.py --out) or metrics.jsonl files")
    p.add_argument("--out", default="curves.png", help="the PNG to write")
    p.add_argument("--keys", default=None,
                   help="comma-separated metrics.jsonl keys, a panel each (default: the panels of the trainer)")
    p.add_argument("--labels", default=None, help="comma-separated legend names, one per run (default: the paths)")
    args = p.parse_args(argv)
    labels = args.labels.split(",") if args.labels else args.runs
    if len(labels) != len(args.runs):
        raise UserError(f"--labels names {len(labels)} runs, {len(args.runs)} given")
    runs = [(label, read_metrics(path)) for label, path in zip(labels, args.runs)]
    for (label, rows), path in zip(runs, args.runs):
        if not rows:
            raise UserError(f"{path}: no metrics rows")
    if args.keys:
        panels, xlabel = [panel_of(k.strip()) for k in args.keys.split(",") if k.strip()], "step"
    else:
        kinds = {run_kind(rows, path) for (_, rows), path in zip(runs, args.runs)}
        if len(kinds) > 1:
            raise UserError("SFT and GRPO runs have different panels: name the ones to overlay with --keys")
        kind = kinds.pop()
        panels, xlabel = (SFT_PANELS if kind == "sft" else GRPO_PANELS), X_LABELS[kind]
    title = f"training curves of {len(runs)} runs" if len(runs) > 1 else f"{labels[0]}: training curves"
    img, _ = draw_curves(runs, panels, xlabel, title)
    try:
        save_png(img, args.out)
    except OSError as e:
        raise UserError(f"{args.out}: cannot write the figure ({e})") from None
    print(f"wrote {args.out}: {len(panels)} panels, {len(runs)} run{'s' if len(runs) > 1 else ''}")


if __name__ == "__main__":
    run_cli(main)
