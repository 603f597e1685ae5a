"""The data of ``binq plot``: points read from reports and anchor files, method families, the Pareto frontier.

Nothing here draws (``binq.plot_figure`` does, with matplotlib) and nothing loads torch: a point is one
run's stored bits per linear weight (``storage_bits.linear``, docs/REPORT.md) and its perplexity on each
evaluation set. Every problem with the input is a :class:`BinqError` naming the file and what it lacks.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from binq.errors import BinqError

# binq.report.REPORT_SCHEMA, not imported from there: binq.report loads torch (seconds) for a plot of JSON.
REPORT_SCHEMA = "binq.report/1"
ANCHOR_SERIES = "llama.cpp"  # the series of an anchor without its own ``series`` field

# Reports of one model and protocol agree on the original PPL to float noise (a channel-smoothed run's
# original differs by about 1e-7 relative: the folded model computes the same function in another order).
ORIGINAL_PPL_REL_TOL = 1e-4

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Point:
    """One run (or anchor) on the plot: stored bits per linear weight and PPL per evaluation set.

    ``on_frontier_axis`` is False for runs with quantized activations: their PPL also pays for the
    activations, which the x axis does not count, so they are drawn but take no part in the frontier.
    """

    label: str
    family: str
    storage_bits: float
    ppl: dict[str, float]
    source: str
    ppl_original: dict[str, float] = field(default_factory=dict)
    original_bits: int | None = None  # the original's bits per parameter (bits_original.other_parameters_bits)
    anchor: bool = False
    on_frontier_axis: bool = True


@dataclass(frozen=True)
class Panel:
    """What one panel shows: the points of one evaluation set by series, the frontier, the original's PPL."""

    eval_set: str
    series: dict[str, list[Point]]  # series name -> its points, in input order; anchors' series last
    frontier: list[Point]  # sorted by stored bits
    reference_ppl: float | None  # the original model's PPL, when every report that records it agrees
    reference_bits: int | None


def pareto_frontier(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the ``(bits, ppl)`` points no other point dominates, sorted by bits.

    A point is dominated when another has at most its bits and at most its PPL, and is lower in one of
    the two: at each storage budget the frontier holds the lowest PPL reachable within it. Of points equal
    in both, the first is kept. PPL falls strictly along the returned points.
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1], i))
    kept: list[int] = []
    best_ppl = math.inf
    for i in order:
        # Sorted by bits then PPL, a point is on the frontier exactly when it beats every cheaper PPL seen.
        if points[i][1] < best_ppl:
            kept.append(i)
            best_ppl = points[i][1]
    return kept


def _number(value: Any) -> float | None:
    """A positive finite number, or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) and value > 0 else None


def _field(value: Any, *keys: str) -> Any:
    """``value[k1][k2]...``, or None where a level is missing or not an object."""
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def family_of(report: dict[str, Any]) -> str:
    """The series of a report: its method's name, and ``A<bits>`` when activations were quantized too."""
    name = _field(report, "method", "name")
    if not isinstance(name, str):  # not in a report binq wrote with bits; the label's first word then
        name = str(report.get("label", "?")).split(" ")[0]
    activations = report.get("activations")
    if isinstance(activations, dict):
        bits = _field(activations, "config", "bits")
        return f"{name} A{bits}" if bits is not None else f"{name} A"
    return name


def point_of_report(report: Any, source: str) -> Point:
    """The point of one ``binq.report/1`` report (``source`` names it in errors)."""
    if not isinstance(report, dict) or report.get("schema") != REPORT_SCHEMA:
        raise BinqError(f"{source} is not a {REPORT_SCHEMA} report (docs/REPORT.md)")
    bits = _number(_field(report, "storage_bits", "linear"))
    if bits is None:  # the shortcut above is this same figure (docs/REPORT.md)
        bits = _number(_field(report, "bits", "linear", "storage_bits"))
    if bits is None:
        kind = " (a `binq eval` report: no quantized weights)" if report.get("kind") == "eval" else ""
        raise BinqError(f"{source} has no storage bits per linear weight{kind}")
    evaluations = report.get("eval")
    if not isinstance(evaluations, dict) or not evaluations:
        raise BinqError(f"{source} has no PPL (run with --eval none)")
    ppl, ppl_original = {}, {}
    for name, evaluation in evaluations.items():
        value = _number(_field(evaluation, "ppl"))
        if value is None:
            raise BinqError(f"{source} has no positive finite PPL on {name}")
        ppl[name] = value
        original = _number(_field(evaluation, "ppl_original"))
        if original is not None:
            ppl_original[name] = original
    original_bits = _field(report, "bits_original", "other_parameters_bits")
    return Point(
        label=str(report.get("label", Path(source).parent.name)),
        family=family_of(report),
        storage_bits=bits,
        ppl=ppl,
        source=source,
        ppl_original=ppl_original,
        original_bits=original_bits if isinstance(original_bits, int) else None,
        on_frontier_axis=not isinstance(report.get("activations"), dict),
    )


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise BinqError(f"cannot read {what} {path}: {err.strerror or err}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BinqError(f"{what} {path} is not valid JSON: {err}") from None


def report_files(spec: str) -> list[Path]:
    """The report files a command-line argument names.

    A file is itself; a folder holding ``report.json`` is that run; else a folder of run folders
    (``binq demo --out``, ``runs/catalogue``) gives each ``*/report.json``, and a folder of report files
    (``docs/reports/quick``) each ``*.json``.
    """
    path = Path(spec)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise BinqError(f"no such report file or folder: {spec}")
    if (path / "report.json").is_file():
        return [path / "report.json"]
    found = sorted(path.glob("*/report.json")) or sorted(p for p in path.glob("*.json") if p.is_file())
    if not found:
        raise BinqError(f"{spec} holds no report.json (nor run folders or .json reports)")
    return found


def load_points(specs: Sequence[str]) -> list[Point]:
    """One point per report of the arguments, in order (a file named twice counts once).

    A ``binq eval`` report (no quantized weights, so no storage bits) found in a folder is skipped; named
    on its own, it is an error like any report without storage bits.
    """
    points, seen = [], set()
    for spec in specs:
        from_folder = Path(spec).is_dir()
        for path in report_files(spec):
            key = path.resolve()
            if key in seen:
                continue
            seen.add(key)
            report = _read_json(path, "report")
            if from_folder and isinstance(report, dict) and report.get("kind") == "eval":
                log.info("skipped %s: a binq eval report (no quantized weights)", path)
                continue
            points.append(point_of_report(report, str(path)))
    if not points:
        raise BinqError("no report with quantized weights to plot (binq eval reports have no storage bits)")
    return points


def load_anchors(path: str | Path) -> list[Point]:
    """Anchor points from a JSON list of ``{"label", "bits", "ppl": {set: value}, "series"?}`` objects.

    ``series`` defaults to ``llama.cpp``; ``bits`` is the anchor's stored bits per linear weight.
    """
    path = Path(path)
    if not path.is_file():
        raise BinqError(f"no such anchors file: {path}")
    entries = _read_json(path, "anchors file")
    if not isinstance(entries, list):
        raise BinqError(f"anchors file {path} must hold a JSON list of {{label, bits, ppl}} objects")
    anchors = []
    for n, entry in enumerate(entries):
        where = f"anchors file {path}, entry {n}"
        if not isinstance(entry, dict) or not isinstance(entry.get("label"), str):
            raise BinqError(f"{where}: not an object with a string 'label'")
        bits = _number(entry.get("bits"))
        if bits is None:
            raise BinqError(f"{where} ({entry['label']}): 'bits' must be a positive number")
        ppl = entry.get("ppl")
        if not isinstance(ppl, dict) or not ppl or any(_number(v) is None for v in ppl.values()):
            raise BinqError(f"{where} ({entry['label']}): 'ppl' must map evaluation sets to positive numbers")
        series = entry.get("series", ANCHOR_SERIES)
        if not isinstance(series, str):
            raise BinqError(f"{where} ({entry['label']}): 'series' must be a string")
        anchors.append(
            Point(
                label=entry["label"],
                family=series,
                storage_bits=bits,
                ppl={name: float(value) for name, value in ppl.items()},
                source=str(path),
                anchor=True,
            )
        )
    return anchors


def common_eval_sets(points: Sequence[Point]) -> list[str]:
    """The evaluation sets every point has, in the first point's order."""
    return [name for name in points[0].ppl if all(name in p.ppl for p in points[1:])]


def choose_eval_sets(points: Sequence[Point], spec: str | None) -> list[str]:
    """``--eval``: comma-separated sets, ``all`` (every common set) or None (the first common set)."""
    common = common_eval_sets(points)
    if not common:
        raise BinqError("the reports share no evaluation set: plot them separately or rerun with a common --eval")
    if spec is None:
        return common[:1]
    if spec.strip().lower() == "all":
        return common
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise BinqError("--eval names no evaluation set")
    for name in names:
        if name not in common:
            lacking = next((p.source for p in points if name not in p.ppl), "")
            shared = ", ".join(common)
            raise BinqError(f"evaluation set {name!r} is not in every report ({lacking} lacks it); in all: {shared}")
    return names


def _reference(points: Sequence[Point], eval_set: str) -> tuple[float | None, int | None]:
    """The original model's PPL, when the reports that record it agree (same model, same protocol)."""
    values = {p.ppl_original[eval_set] for p in points if eval_set in p.ppl_original}
    if not values or not all(math.isclose(v, min(values), rel_tol=ORIGINAL_PPL_REL_TOL) for v in values):
        return None, None
    precisions = {p.original_bits for p in points if eval_set in p.ppl_original and p.original_bits is not None}
    return min(values), precisions.pop() if len(precisions) == 1 else None


def build_panel(points: Sequence[Point], anchors: Sequence[Point], eval_set: str) -> Panel:
    """One panel: the reports' points on ``eval_set`` by family, then the anchors that have that set."""
    shown = [p for p in points if eval_set in p.ppl] + [a for a in anchors if eval_set in a.ppl]
    series: dict[str, list[Point]] = {}
    report_families = {p.family for p in points}
    for point in shown:
        # An anchor series named like a method family stays its own series.
        name = f"{point.family} (anchor)" if point.anchor and point.family in report_families else point.family
        series.setdefault(name, []).append(point)
    candidates = [p for p in shown if p.on_frontier_axis]
    frontier = [candidates[i] for i in pareto_frontier([(p.storage_bits, p.ppl[eval_set]) for p in candidates])]
    reference_ppl, reference_bits = _reference(points, eval_set)
    if reference_ppl is None and any(eval_set in p.ppl_original for p in points):
        log.warning("the reports record different original PPLs on %s (other models or protocols)", eval_set)
    return Panel(eval_set, series, frontier, reference_ppl, reference_bits)
