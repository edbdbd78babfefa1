"""plot.py: the training curves of metrics.jsonl as a PNG, checked pixel by pixel against data
coordinates computed here by hand (the axis ranges, the moving average of LLaMA-Factory's formula)."""

import json
import math

import pytest
from PIL import Image

import plot
from data import UserError

BLUE, ORANGE = (31, 119, 180), (255, 127, 14)  # the first two runs' colours
FAINT_BLUE, FAINT_ORANGE = (188, 214, 232), (255, 217, 183)  # the same at 30% on white
WHITE, RED_NOTE = (255, 255, 255), (200, 30, 30)


def write_metrics(path, rows):
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))  # NaN as NaN
    return str(path)


def at(img, ax, x, y, x_range, y_range):
    """The pixel of data point (x, y) in the plot box of `ax`, from hand-computed axis ranges."""
    l, t, r, b = ax.box
    (x0, x1), (y0, y1) = x_range, y_range
    return round(l + (x - x0) / (x1 - x0) * (r - l)), round(b - (y - y0) / (y1 - y0) * (b - t))


def near(img, xy, colour, radius=1):
    x, y = xy
    return any(img.getpixel((x + dx, y + dy)) == colour
               for dx in range(-radius, radius + 1) for dy in range(-radius, radius + 1))


def colours_in(img, box):
    return {c for _, c in img.crop(box).getcolors(1 << 24)}


def test_smoothing_is_llamafactory_moving_average():
    # 3 points: w = 1.8 (sigmoid(0.15) - 0.5) = 0.067374; s = 1, w + 3 (1 - w), w s_2 + 2 (1 - w)
    assert plot.ema_weight(3) == pytest.approx(0.067374, abs=1e-6)
    assert plot.smooth([1.0, 3.0, 2.0]) == pytest.approx([1.0, 2.865253, 2.058295], abs=1e-6)
    assert plot.ema_weight(100) == pytest.approx(0.888, abs=1e-3) and plot.smooth([]) == []


def test_points_land_at_their_data_coordinates(tmp_path):
    """Three SFT rows: lm_loss 1, 3, 2; enhance None, suppress absent (their panels say so);
    sys_share with a NaN (drawn without it, counted); lr a schedule (not smoothed); grad_norm in
    one row only (a single point)."""
    nan = float("nan")
    rows = [dict(step=1, lm_loss=1.0, enhance=None, sys_share=0.5, lr=1e-4, grad_norm=2.0),
            dict(step=2, lm_loss=3.0, enhance=None, sys_share=nan, lr=2e-4),
            dict(step=3, lm_loss=2.0, enhance=None, sys_share=0.4, lr=3e-4)]
    rows = plot.read_metrics(write_metrics(tmp_path / "run", rows))
    assert math.isnan(rows[1]["sys_share"])
    img, axes = plot.draw_curves([("run", rows)], plot.SFT_PANELS, "optimizer step")
    assert list(axes) == [k for k, _, _ in plot.SFT_PANELS]
    # a 3 x 2 grid of boxes inside the image, each framed where the axis says it is
    boxes = [axes[k].box for k in axes]
    assert len({b[0] for b in boxes}) == 3 and len({b[1] for b in boxes}) == 2
    assert all(0 < l < r < img.width and 0 < t < b < img.height for l, t, r, b in boxes)
    for l, t, r, b in boxes:
        assert img.getpixel((l, (t + b) // 2)) == img.getpixel(((l + r) // 2, b)) == plot.FRAME

    # lm_loss: x in [1 - 0.04, 3 + 0.04] (2% of the span), y in [1 - 0.12, 3 + 0.12] (6%)
    ax, xr, yr = axes["lm_loss"], (0.96, 3.04), (0.88, 3.12)
    assert (ax.x0, ax.x1, ax.y0, ax.y1) == pytest.approx((*xr, *yr))
    assert near(img, at(img, ax, 1, 1.0, xr, yr), BLUE)  # the first point: raw = smoothed
    for step, raw, smoothed in ((2, 3.0, 2.865253), (3, 2.0, 2.058295)):
        assert img.getpixel(at(img, ax, step, raw, xr, yr)) == FAINT_BLUE
        assert near(img, at(img, ax, step, smoothed, xr, yr), BLUE)
    assert img.getpixel(at(img, ax, 2, 1.0, xr, yr)) not in (BLUE, FAINT_BLUE)  # nothing where no data is
    x, y = at(img, ax, 0.96, 1.0, xr, yr)
    assert img.getpixel((x - 3, y)) == plot.FRAME  # the tick of 1.0 sits at 1.0

    # no values: the panel says so, in no run colour
    for key in ("enhance", "suppress"):
        inside = colours_in(img, axes[key].box)
        assert plot.MUTED in inside and not inside & {BLUE, FAINT_BLUE}
    # sys_share: steps 1 and 3 (y in [0.4 - 0.006, 0.5 + 0.006]); the NaN noted above the box
    ax, xr, yr = axes["sys_share"], (0.96, 3.04), (0.394, 0.506)
    assert img.getpixel(at(img, ax, 3, 0.4, xr, yr)) == FAINT_BLUE
    l, t, r, b = ax.box
    assert RED_NOTE in colours_in(img, (l, t - 22, r, t))
    assert RED_NOTE not in colours_in(img, (axes["lm_loss"].box[0], axes["lm_loss"].box[1] - 22,
                                            axes["lm_loss"].box[2], axes["lm_loss"].box[1]))
    # lr: the values themselves, solid, no faint copy
    ax, xr, yr = axes["lr"], (0.96, 3.04), (1e-4 - 1.2e-5, 3e-4 + 1.2e-5)
    assert all(near(img, at(img, ax, s, v, xr, yr), BLUE) for s, v in ((1, 1e-4), (2, 2e-4), (3, 3e-4)))
    assert FAINT_BLUE not in colours_in(img, ax.box)
    # grad_norm, one point: a constant is drawn against zero, y in [-0.12, 2.12]; x: the run's steps
    ax = axes["grad_norm"]
    assert near(img, at(img, ax, 1, 2.0, (0.96, 3.04), (-0.12, 2.12)), BLUE)
    # a run of one step: +-1 around it
    _, axes = plot.draw_curves([("one", rows[:1])], plot.SFT_PANELS)
    assert (axes["lm_loss"].x0, axes["lm_loss"].x1) == (0.0, 2.0)


def test_plot_overlays_runs_with_a_legend(tmp_path):
    a = write_metrics(tmp_path / "a", [dict(step=1, lm_loss=4.0), dict(step=2, lm_loss=2.0)])
    b = write_metrics(tmp_path / "b", [dict(step=1, lm_loss=1.0), dict(step=2, lm_loss=3.0)])
    out = tmp_path / "both.png"
    plot.main([a, b, "--out", str(out), "--labels", "first,second"])
    img = Image.open(out).convert("RGB")
    # the layout of these two runs and panels: where draw_curves puts the lm_loss box
    _, axes = plot.draw_curves([("first", plot.read_metrics(a)), ("second", plot.read_metrics(b))],
                               plot.SFT_PANELS, "optimizer step")
    ax, xr, yr = axes["lm_loss"], (0.98, 2.02), (0.82, 4.18)  # both runs share the axes
    # 2 points: w = 1.8 (sigmoid(0.1) - 0.5) = 0.044963; second points smoothed to 2.0899, 2.9101
    assert img.getpixel(at(img, ax, 2, 2.0, xr, yr)) == FAINT_BLUE
    assert near(img, at(img, ax, 2, 2.0899, xr, yr), BLUE)
    assert img.getpixel(at(img, ax, 2, 3.0, xr, yr)) == FAINT_ORANGE
    assert near(img, at(img, ax, 2, 2.9101, xr, yr), ORANGE)
    assert near(img, at(img, ax, 1, 4.0, xr, yr), BLUE) and near(img, at(img, ax, 1, 1.0, xr, yr), ORANGE)
    header = colours_in(img, (0, 0, img.width, ax.box[1] - 30))
    assert BLUE in header and ORANGE in header  # the legend: a swatch per run


def test_plot_refuses_what_it_cannot_draw(tmp_path):
    sft = write_metrics(tmp_path / "sft", [dict(step=1, lm_loss=1.0)])
    grpo = write_metrics(tmp_path / "grpo", [dict(step=1, reward=0.5)])
    with pytest.raises(UserError, match="--keys"):
        plot.main([sft, grpo, "--out", str(tmp_path / "x.png")])
    plot.main([sft, grpo, "--keys", "lm_loss,reward", "--out", str(tmp_path / "x.png")])
    assert Image.open(tmp_path / "x.png").size[0] > 0
    with pytest.raises(UserError, match="--labels names 1 runs, 2 given"):
        plot.main([sft, grpo, "--labels", "one", "--keys", "reward"])
    with pytest.raises(UserError, match="nope"):
        plot.main([str(tmp_path / "nope")])
    cut = tmp_path / "cut" / "metrics.jsonl"
    cut.parent.mkdir()
    cut.write_text('{"step": 1, "lm_loss": 1.0}\n{"step": 2, "lm_lo')  # being written: left out
    assert plot.read_metrics(str(cut.parent)) == [{"step": 1, "lm_loss": 1.0}]
    cut.write_text('{"step": 1, "lm_loss": 1.0}\n{"step": 2, "lm_lo\n{"step": 3}\n')
    with pytest.raises(UserError, match="metrics.jsonl: line 2 is not JSON"):
        plot.read_metrics(str(cut.parent))
    cut.write_text('{"loss": 1.0}\n')
    with pytest.raises(UserError, match="line 1 is not a metrics row"):
        plot.read_metrics(str(cut))


def test_save_run_curves_never_stops_a_run(tmp_path):
    """A run folder whose metrics cannot be drawn: one warning, no exception, no file."""
    (tmp_path / "metrics.jsonl").write_text("not json\n{}\n")
    warnings = []
    assert plot.save_run_curves(str(tmp_path), "sft", warnings.append) is None
    assert len(warnings) == 1 and warnings[0].startswith("warning: ") and "line 1" in warnings[0]
    assert not (tmp_path / plot.CURVES_PNG).exists()
    (tmp_path / "metrics.jsonl").write_text(json.dumps(dict(step=1, reward=float("nan"))) + "\n")
    assert plot.save_run_curves(str(tmp_path), "grpo", warnings.append) == str(tmp_path / plot.CURVES_PNG)
    assert len(warnings) == 1 and Image.open(tmp_path / plot.CURVES_PNG).size[0] > 0
