"""The figure of ``binq plot``: PPL (log scale) against stored bits per linear weight, one panel per set.

The points, series and frontier come from :mod:`binq.plot`; this module only draws them. matplotlib is an
optional extra (``pip install 'binq[plot]'``), imported when a figure is drawn, on its Agg canvas (no
display, no pyplot state). The image is written to a temporary file beside the target and renamed over
it, so a failed run leaves an earlier image whole.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from binq.errors import BinqError
from binq.plot import Panel, Point, build_panel, choose_eval_sets, load_anchors, load_points

FORMATS = ("png", "svg", "pdf")
MARKERS = "osD^vPXh<>p8"
ANCHOR_MARKERS = "*dH"  # the series of anchors: dark grey, one marker each, so apart from binq's colours
ANCHOR_COLOUR = "0.25"
X_LABEL = "storage bits per linear weight (every stored bit of the packed linears, scales included)"
PANEL_SIZE_INCHES = (6.4, 4.8)
DPI = 150


def output_target(spec: str) -> tuple[Path, str]:
    """The image path and its format (from the suffix), checked before any report is read."""
    path = Path(spec)
    if path.is_dir():
        raise BinqError(f"-o {spec} is a folder; name the image file")
    fmt = path.suffix.lower().removeprefix(".")
    if fmt not in FORMATS:
        raise BinqError(f"-o {spec}: the image must end in {', '.join('.' + f for f in FORMATS)}")
    if not path.parent.is_dir():
        raise BinqError(f"-o {spec}: no such folder {path.parent}")
    return path, fmt


def _figure_class() -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise BinqError("binq plot needs matplotlib: pip install 'binq[plot]'") from None

    def new_figure(**kwargs: Any) -> Any:
        figure = Figure(**kwargs)
        FigureCanvasAgg(figure)  # the Agg canvas, without pyplot's global figures or a display
        return figure

    return new_figure


def _styles(panels: Sequence[Panel]) -> dict[str, tuple[str, Any]]:
    """A marker and colour per series, the same in every panel; anchors in grey."""
    from matplotlib import colormaps

    colours = colormaps["tab10"].colors
    styles: dict[str, tuple[str, Any]] = {}
    families = anchor_series = 0
    for panel in panels:
        for name, points in panel.series.items():
            if name in styles:
                continue
            if points[0].anchor:
                styles[name] = (ANCHOR_MARKERS[anchor_series % len(ANCHOR_MARKERS)], ANCHOR_COLOUR)
                anchor_series += 1
            else:
                styles[name] = (MARKERS[families % len(MARKERS)], colours[families % len(colours)])
                families += 1
    return styles


def _draw_panel(axes: Any, panel: Panel, styles: dict[str, tuple[str, Any]]) -> dict[str, Any]:
    eval_set = panel.eval_set
    shown: list[Point] = []
    for name, points in panel.series.items():
        marker, colour = styles[name]
        size = 90 if points[0].anchor else 36
        xs, ys = [p.storage_bits for p in points], [p.ppl[eval_set] for p in points]
        axes.scatter(
            xs, ys, marker=marker, color=colour, s=size, label=name, zorder=3, edgecolors="black", linewidths=0.4
        )
        for point in points:
            axes.annotate(point.label, (point.storage_bits, point.ppl[eval_set]), xytext=(4, 3),
                          textcoords="offset points", fontsize=6, color="0.2")  # fmt: skip
        shown += points
    if panel.frontier:
        # The lowest PPL within each budget: a step down at each frontier point, flat to the widest point.
        xs = [p.storage_bits for p in panel.frontier]
        ys = [p.ppl[eval_set] for p in panel.frontier]
        widest = max(p.storage_bits for p in shown)
        if widest > xs[-1]:
            xs, ys = [*xs, widest], [*ys, ys[-1]]
        axes.step(xs, ys, where="post", color="black", linestyle="--", linewidth=1.0, zorder=2,
                  label="Pareto frontier (lowest PPL within the bits)")  # fmt: skip
    if panel.reference_ppl is not None:
        precision = f" ({panel.reference_bits}-bit)" if panel.reference_bits else ""
        axes.axhline(panel.reference_ppl, color="0.5", linestyle=":", linewidth=1.2, zorder=1,
                     label=f"original{precision}: PPL {panel.reference_ppl:.2f}")  # fmt: skip
    axes.set_yscale("log")
    axes.set_xlabel(X_LABEL, fontsize=8)
    axes.set_ylabel(f"perplexity on {eval_set} (log scale)")
    axes.set_title(eval_set)
    axes.grid(True, which="major", alpha=0.3)
    axes.legend(fontsize=7, loc="upper right")
    return {
        "eval_set": eval_set,
        "series": {name: [p.label for p in points] for name, points in panel.series.items()},
        "frontier": [p.label for p in panel.frontier],
        "reference_ppl": panel.reference_ppl,
        "legend": axes.get_legend_handles_labels()[1],
        "styles": {name: styles[name] for name in panel.series},
    }


def draw(panels: Sequence[Panel], path: Path, fmt: str) -> list[dict[str, Any]]:
    """Draw the panels side by side and write the image atomically; what each panel shows, for checks."""
    new_figure = _figure_class()
    width, height = PANEL_SIZE_INCHES
    figure = new_figure(figsize=(width * len(panels), height), layout="constrained")
    styles = _styles(panels)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    shown = [_draw_panel(ax, panel, styles) for ax, panel in zip(axes, panels, strict=True)]
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with open(partial, "wb") as stream:
            figure.savefig(stream, format=fmt, dpi=DPI)
        os.replace(partial, path)
    except OSError as err:
        raise BinqError(f"cannot write {path}: {err.strerror or err}") from None
    finally:
        partial.unlink(missing_ok=True)
    return shown


def write_plot(
    reports: Sequence[str], output: str, eval_sets: str | None = None, anchors: str | None = None
) -> tuple[Path, list[dict[str, Any]]]:
    """``binq plot``: read the reports (and anchors), choose the sets, draw; the path and what it shows."""
    path, fmt = output_target(output)
    points = load_points(reports)
    anchor_points = load_anchors(anchors) if anchors is not None else []
    panels = [build_panel(points, anchor_points, name) for name in choose_eval_sets(points, eval_sets)]
    return path, draw(panels, path, fmt)
