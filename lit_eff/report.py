"""Compare runs at equal training FLOPs: a plot and a Markdown table from TensorBoard runs.

    lit-eff report lightning_logs --metric val/acc [--flops executed|effective] [--out DIR]

or ``report(["lightning_logs"], "val/acc")`` in Python. Each argument is a run folder (one
holding ``events.out.tfevents.*``) or a folder searched recursively for runs. Every logged
value of the metric is placed at the run's training FLOPs: the ``flops/total`` (executed) or
``flops/effective_total`` value :class:`~lit_eff.callbacks.FlopsMonitor` logged at the same step
or the latest earlier one (0 before the first), so the x-axis is as fine as
``trainer.log_every_n_steps``. Writes ``<metric>_vs_<flops>_flops.png`` and ``.md`` to ``out``.

The table's "at equal FLOPs" column is each run's last value logged at or below the smallest
final FLOPs total of all runs: a budget every run reached. Runs in folders named ``seed<N>``
are repeats of their parent folder's variant (the layout of ``lit-eff sweep``): one row per
variant, with the mean ± sample standard deviation over seeds. Runs still in progress are
read as far as they have been written.
"""

from __future__ import annotations

import argparse
import bisect
import glob
import os
import re
import statistics
from dataclasses import dataclass, field

import yaml

FLOPS_TAGS = {"executed": "flops/total", "effective": "flops/effective_total"}
# callbacks that measure, save or display, and change nothing about training
PLUMBING = {"FlopsMonitor", "FlopsBudget", "ModelCheckpoint", "LearningRateMonitor", "DeviceStatsMonitor",
            "TQDMProgressBar", "RichProgressBar", "ModelSummary", "RichModelSummary", "Timer"}
EVENTS = "events.out.tfevents.*"
_SEED_DIR = re.compile(r"seed_?\d+")


@dataclass
class Run:
    """One run: its metric curve on the FLOPs axis and its summary numbers."""

    name: str
    path: str
    variant: str  # runs of one variant differ only by seed
    techniques: list[str] | None  # non-plumbing callbacks of its config.yaml; None without one
    points: list[tuple[float, float]]  # (training FLOPs, metric value), in step order
    total_flops: float
    wall_time: float  # seconds from the first to the last event
    at_equal: float | None = None

    @property
    def final(self) -> float | None:
        return self.points[-1][1] if self.points else None


@dataclass
class ReportResult:
    runs: list[Run]
    metric: str
    flops: str
    equal_flops: float  # the smallest final FLOPs total of all runs
    table: str  # Markdown, one row per variant
    plot_path: str
    table_path: str
    rows: list[dict] = field(default_factory=list)  # the table's numbers, unformatted


def _natural(text: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def find_runs(paths: list[str]) -> list[str]:
    """Folders holding TensorBoard event files, at or below each of ``paths``."""
    runs: dict[str, None] = {}
    for path in paths:
        if not os.path.isdir(path):
            what = "is a file, not a folder" if os.path.exists(path) else "does not exist"
            raise FileNotFoundError(f"Run directory {path!r} {what}; pass a run folder (holding {EVENTS} files) "
                                    "or a folder of runs such as lightning_logs/")
        found = {os.path.dirname(f) for f in glob.glob(os.path.join(glob.escape(path), "**", EVENTS), recursive=True)}
        if not found:
            held = ", ".join(sorted(os.listdir(path))[:20]) or "nothing"
            raise FileNotFoundError(f"No runs under {path!r}: no {EVENTS} file in it or below (it holds: {held}); "
                                    "pass a folder written by a TensorBoard logger, e.g. lightning_logs/version_0")
        for run in sorted(found, key=_natural):
            runs.setdefault(os.path.realpath(run))
    return list(runs)


def read_scalars(run_dir: str) -> tuple[dict, float | None]:
    """Every scalar event of a run folder by tag, and the wall time of its first event."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    try:
        first = acc.FirstEventTimestamp()
    except ValueError:
        first = None
    return {tag: acc.Scalars(tag) for tag in acc.Tags()["scalars"]}, first


def techniques(run_dir: str) -> list[str] | None:
    """Class names of the callbacks in the run's saved ``config.yaml``, less the plumbing."""
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        config = yaml.safe_load(f) or {}
    callbacks = (config.get("trainer") or {}).get("callbacks") or []
    if isinstance(callbacks, dict):
        callbacks = [callbacks]
    names = [str(cb.get("class_path", "?") if isinstance(cb, dict) else cb).rsplit(".", 1)[-1] for cb in callbacks]
    return [name for name in names if name not in PLUMBING]


def _align(metric_events: list, flops_events: list) -> list[tuple[float, float]]:
    flops = sorted(((e.step, e.value) for e in flops_events), key=lambda sv: sv[0])
    steps = [step for step, _ in flops]
    points = []
    for event in sorted(metric_events, key=lambda e: e.step):
        i = bisect.bisect_right(steps, event.step) - 1
        points.append((flops[i][1] if i >= 0 else 0.0, event.value))
    return points


def _names(run_dirs: list[str]) -> list[tuple[str, str]]:
    """(name, variant) of each run: its path below the runs' common folder; a ``seed<N>``
    folder's variant is its parent."""
    common = os.path.commonpath(run_dirs)
    out = []
    for run in run_dirs:
        name = os.path.relpath(run, common)
        name = os.path.basename(run) if name == "." else name
        variant = name
        if _SEED_DIR.fullmatch(os.path.basename(run)):
            variant = os.path.dirname(name) or os.path.basename(os.path.dirname(run))
        out.append((name, variant))
    return out


def load_runs(run_dirs: list[str], metric: str, flops: str = "executed") -> list[Run]:
    """Read and align the runs at or below ``run_dirs`` (see the module docstring)."""
    if flops not in FLOPS_TAGS:
        raise ValueError(f"Expected `flops` in {tuple(FLOPS_TAGS)}, got flops={flops!r}")
    tag = FLOPS_TAGS[flops]
    paths = find_runs(run_dirs)
    loaded = [read_scalars(path) for path in paths]
    names = _names(paths)
    missing = [path for path, (scalars, _) in zip(paths, loaded) if tag not in scalars]
    if missing:
        raise ValueError(f"Runs without {tag} scalars: {', '.join(missing)}. Add "
                         "`- class_path: lit_eff.callbacks.FlopsMonitor` to their trainer.callbacks (a run that "
                         "just started logs it after its first trainer.log_every_n_steps steps)")
    if not any(metric in scalars for scalars, _ in loaded):
        logged = sorted({t for scalars, _ in loaded for t in scalars})
        raise ValueError(f"No run has the metric {metric!r}; the runs log: {', '.join(logged)}")
    runs = []
    for (name, variant), path, (scalars, first) in zip(names, paths, loaded):
        times = [e.wall_time for events in scalars.values() for e in events]
        flops_events = sorted(scalars[tag], key=lambda e: e.step)
        runs.append(Run(name=name, path=path, variant=variant, techniques=techniques(path),
                        points=_align(scalars.get(metric, []), flops_events), total_flops=flops_events[-1].value,
                        wall_time=max(times) - (first if first is not None else min(times))))
    return runs


def _stack(run: Run) -> str:
    if run.techniques is None:
        return "(no config.yaml)"
    return ", ".join(run.techniques) or "dense"


def _fmt(values: list[float], digits: str = ".4g") -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return format(values[0], digits)
    return f"{format(statistics.mean(values), digits)} ± {statistics.stdev(values):.2g}"


def _table(runs: list[Run], metric: str, flops: str, equal: float) -> tuple[str, list[dict]]:
    variants: dict[str, list[Run]] = {}
    for run in runs:
        variants.setdefault(run.variant, []).append(run)
    header = ["run", "techniques", "seeds", f"final {metric}", f"{metric} at {equal:.4g} FLOPs",
              f"total FLOPs ({flops})", "wall time (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows = []
    for variant, members in variants.items():
        row = {"variant": variant, "runs": [m.name for m in members],
               "techniques": sorted({_stack(m) for m in members}),
               "final": [m.final for m in members if m.final is not None],
               "at_equal": [m.at_equal for m in members if m.at_equal is not None],
               "total_flops": [m.total_flops for m in members], "wall_time": [m.wall_time for m in members]}
        rows.append(row)
        cells = [variant, "; ".join(row["techniques"]), str(len(members)), _fmt(row["final"]),
                 _fmt(row["at_equal"]), _fmt(row["total_flops"]), _fmt(row["wall_time"], ".1f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines), rows


def _plot(runs: list[Run], metric: str, flops: str, equal: float, path: str) -> None:
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: the process's backend is left alone

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colors = matplotlib.colormaps["tab10"]
    order = list(dict.fromkeys(run.variant for run in runs))  # one colour per variant
    labelled: set[str] = set()
    for run in runs:
        if not run.points:
            continue
        label = "_nolegend_" if run.variant in labelled else run.variant
        labelled.add(run.variant)
        xs, ys = zip(*run.points)
        ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.2, alpha=0.85,
                color=colors(order.index(run.variant) % 10), label=label)
    ax.axvline(equal, color="gray", linestyle="--", linewidth=1, label="equal FLOPs")
    ax.set_xlabel(f"training FLOPs ({flops})")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs training FLOPs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=120)


def report(run_dirs: list[str], metric: str, flops: str = "executed", out_dir: str = ".") -> ReportResult:
    """Write the plot and the Markdown table of ``metric`` vs training FLOPs for the runs at or
    below ``run_dirs`` (see the module docstring), and return them."""
    runs = load_runs(list(run_dirs), metric, flops)
    equal = min(run.total_flops for run in runs)
    for run in runs:
        below = [value for x, value in run.points if x <= equal]
        run.at_equal = below[-1] if below else None
    table, rows = _table(runs, metric, flops, equal)
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"{re.sub(r'[^A-Za-z0-9]+', '_', metric).strip('_')}_vs_{flops}_flops")
    _plot(runs, metric, flops, equal, stem + ".png")
    with open(stem + ".md", "w") as f:
        f.write(f"# {metric} vs training FLOPs ({flops})\n\n"
                f"Equal-FLOPs point: {equal:.4g} FLOPs, the smallest final total of all runs. Several seeds of a "
                "variant: mean ± sample standard deviation.\n\n"
                f"{table}\n\n![{metric} vs training FLOPs]({os.path.basename(stem)}.png)\n")
    return ReportResult(runs=runs, metric=metric, flops=flops, equal_flops=equal, table=table,
                        plot_path=stem + ".png", table_path=stem + ".md", rows=rows)


def cli(argv: list[str]) -> None:
    """``lit-eff report RUN_DIR [RUN_DIR ...] --metric M [--flops executed|effective] [--out DIR]``."""
    parser = argparse.ArgumentParser(prog="lit-eff report", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders, or folders of runs")
    parser.add_argument("--metric", required=True, help="scalar tag to compare, e.g. val/acc or val/bpb")
    parser.add_argument("--flops", choices=tuple(FLOPS_TAGS), default="executed", help="FLOPs axis")
    parser.add_argument("--out", default=".", help="folder for the PNG and the Markdown table")
    args = parser.parse_args(argv)
    try:
        result = report(args.run_dirs, args.metric, args.flops, args.out)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"lit-eff report: error: {error}") from None
    print(f"{result.table}\n\nWrote {result.plot_path} and {result.table_path}")
