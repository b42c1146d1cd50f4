"""Compare runs at equal training FLOPs: a plot and a Markdown table from TensorBoard runs.

    lit-eff report lightning_logs --metric val/acc [--flops executed|effective] [--out DIR]

or ``report(["lightning_logs"], "val/acc")`` in Python. Each argument is a run folder (one
holding ``events.out.tfevents.*``) or a folder searched recursively for runs. Every logged
value of the metric is placed at the run's training FLOPs: the ``flops/total`` (executed) or
``flops/effective_total`` value :class:`~lit_eff.callbacks.FlopsMonitor` logged at the same step
or the latest earlier one (0 before the first), so the x-axis is as fine as
``trainer.log_every_n_steps``. Writes ``<metric>_vs_<flops>_flops.png`` and ``.md`` to ``out``.

- **Resumed runs are one run.** A run started with ``--ckpt_path`` from another run's checkpoint
  (its ``config.yaml`` says so) continues that run: their curves are joined, the resumed part
  replacing what the first part logged from the resumed step on.
- **Unfinished runs are marked.** ``lit-eff fit`` logs ``run/finished`` when training ends
  normally; a run (of the kit's CLI) without it was interrupted, crashed or is still running. It
  is drawn dashed, and its row counts it.
- **Rows and legends are technique stacks** (``dense``, ``NMSparsity + TokenDrop``) from each
  run's ``config.yaml``; runs that differ only by seed are one row (mean ± sample standard
  deviation), and stacks run with different arguments are told apart by them
  (``NMSparsity (m=8, n=1)``). Runs in folders named ``seed<N>`` (the layout of ``lit-eff sweep``)
  are the seeds of their parent folder's variant, named after it.

The table's "at equal FLOPs" column is each run's last value logged at or below the smallest final
FLOPs total of the finished runs (of all runs if none finished): a budget all of them reached.
Runs still in progress are read as far as they have been written.
"""

from __future__ import annotations

import argparse
import bisect
import glob
import os
import re
import statistics
from dataclasses import dataclass, field
from typing import Any

import yaml

from lit_eff.runs.resume import PLUMBING, stack_label

FLOPS_TAGS = {"executed": "flops/total", "effective": "flops/effective_total"}
FINISHED_TAG = "run/finished"
EVENTS = "events.out.tfevents.*"
_SEED_DIR = re.compile(r"seed_?\d+")
# config entries that do not make two runs different variants
_NOT_A_VARIANT = re.compile(r"^(seed_everything|ckpt_path|test_after_fit|trainer\.logger|trainer\.default_root_dir|"
                            r"trainer\.enable_progress_bar|trainer\.enable_model_summary)(\.|$)")


@dataclass
class Run:
    """One run (its resumed parts joined): its metric curve on the FLOPs axis and its summary numbers."""

    name: str  # folder below the runs' common folder; "a+b" for a run resumed in folder b
    path: str  # the folder of the last part
    variant: str  # runs of one variant differ only by seed
    techniques: list[str] | None  # non-plumbing callbacks of its config.yaml; None without one
    points: list[tuple[float, float]]  # (training FLOPs, metric value), in step order
    total_flops: float
    wall_time: float  # seconds from the first to the last event, summed over the parts
    finished: bool | None = None  # None: no config.yaml, so not a `lit-eff fit` run
    parts: list[str] = field(default_factory=list)  # the folders joined into this run, in order
    at_equal: float | None = None

    @property
    def final(self) -> float | None:
        return self.points[-1][1] if self.points else None


@dataclass
class ReportResult:
    runs: list[Run]
    metric: str
    flops: str
    equal_flops: float  # the smallest final FLOPs total of the finished runs (all runs if none finished)
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


def read_config(run_dir: str) -> dict | None:
    """The run's saved ``config.yaml`` (written by LightningCLI), or None."""
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return yaml.safe_load(f) or {}


def _callbacks(config: dict) -> list:
    callbacks = (config.get("trainer") or {}).get("callbacks") or []
    return [callbacks] if isinstance(callbacks, dict) else list(callbacks)


def _class_name(callback: Any) -> str:
    return str(callback.get("class_path", "?") if isinstance(callback, dict) else callback).rsplit(".", 1)[-1]


def techniques(run_dir: str) -> list[str] | None:
    """Class names of the callbacks in the run's saved ``config.yaml``, less the plumbing, and
    ``MixtureOfRecursions`` for a model with ``recursion`` set."""
    config = read_config(run_dir)
    if config is None:
        return None
    names = [name for name in map(_class_name, _callbacks(config)) if name not in PLUMBING]
    model = config.get("model") or {}
    if isinstance(model, dict) and isinstance(model.get("init_args"), dict) and model["init_args"].get("recursion"):
        names.append("MixtureOfRecursions")
    return names


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flat(item, f"{prefix}{key}.").items()}
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in _flat(item, f"{prefix}{i}.").items()}
    return {prefix[:-1]: value}


def _signature(config: dict) -> dict[str, Any]:
    """The config entries that make a variant: all but seeds, resume paths, logging and display;
    plumbing callbacks left out (a FlopsBudget or a checkpoint interval is not a technique)."""
    config = dict(config)
    trainer = dict(config.get("trainer") or {})
    trainer["callbacks"] = [cb for cb in _callbacks(config) if _class_name(cb) not in PLUMBING]
    config["trainer"] = trainer
    return {k: v for k, v in _flat(config).items() if not _NOT_A_VARIANT.match(k)}


@dataclass
class _Part:
    path: str
    scalars: dict
    first: float | None
    config: dict | None
    resumed_from: str | None = None  # the checkpoint file it resumed from (where it was found)

    @property
    def finished(self) -> bool:
        return FINISHED_TAG in self.scalars

    def steps(self) -> list[int]:
        return [e.step for events in self.scalars.values() for e in events]


def _resumed_from(part: _Part, known: dict[str, _Part]) -> tuple[str, str] | None:
    """The run folder whose checkpoint ``part`` was started from (``ckpt_path`` in its config),
    and where that checkpoint is."""
    ckpt = (part.config or {}).get("ckpt_path")
    if not ckpt or not isinstance(ckpt, str) or "/" not in ckpt.replace(os.sep, "/"):
        return None
    bases, folder = [os.getcwd()], part.path
    while os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
        bases.append(folder)
    candidates = [ckpt] if os.path.isabs(ckpt) else [os.path.join(base, ckpt) for base in bases]
    # run folders moved since: the checkpoint's run folder by name, next to this one
    parts = os.path.normpath(ckpt).split(os.sep)
    candidates.append(os.path.join(os.path.dirname(part.path), *parts[-3:]))
    for candidate in candidates:
        run = os.path.realpath(os.path.dirname(os.path.dirname(candidate)))
        if run in known and run != part.path:
            return run, candidate
    return None


def _resume_step(part: _Part) -> int | None:
    """The optimizer step ``part`` resumed at: its checkpoint's ``global_step`` (the first step it
    logs), or, if that file is gone, the first step it logged."""
    import torch

    try:
        checkpoint = torch.load(part.resumed_from, map_location="cpu", weights_only=True, mmap=True)
        return int(checkpoint["global_step"])
    except Exception:  # noqa: BLE001  moved, deleted or unreadable: read the events instead
        steps = [e.step for tag, events in part.scalars.items() if tag != "hp_metric" for e in events]
        return min(steps, default=None)


def _join(parts: list[_Part]) -> dict[str, list]:
    """The scalars of a run resumed in several folders: each part's events before the step where
    the next part resumed, then the next part's."""
    joined: dict[str, list] = {}
    for i, part in enumerate(parts):
        cut = _resume_step(parts[i + 1]) if i + 1 < len(parts) else None
        for tag, events in part.scalars.items():
            joined.setdefault(tag, []).extend(e for e in events if cut is None or e.step < cut)
    return joined


def _align(metric_events: list, flops_events: list) -> list[tuple[float, float]]:
    flops = sorted(((e.step, e.value) for e in flops_events), key=lambda sv: sv[0])
    steps = [step for step, _ in flops]
    points = []
    for event in sorted(metric_events, key=lambda e: e.step):
        i = bisect.bisect_right(steps, event.step) - 1
        points.append((flops[i][1] if i >= 0 else 0.0, event.value))
    return points


def _chains(parts: dict[str, _Part]) -> list[list[_Part]]:
    """Resumed runs joined into chains of parts, first part first."""
    parent: dict[str, str | None] = {}
    for path, part in parts.items():
        found = _resumed_from(part, parts)
        parent[path], part.resumed_from = found if found else (None, None)
    children: dict[str, list[str]] = {}
    for child, start in parent.items():
        if start is not None:
            children.setdefault(start, []).append(child)
    chains = []
    for path in parts:
        if parent[path] is not None and path in children.get(parent[path], [])[:1]:
            continue  # a continuation: part of its parent's chain
        chain = [path]
        while children.get(chain[-1]):
            chain.append(children[chain[-1]][0])  # the first resume continues the run; later ones are new runs
        chains.append([parts[p] for p in chain])
    return chains


def _variant_labels(chains: list[list[_Part]], names: dict[str, str]) -> list[str]:
    """One label per chain: the sweep's variant folder, else the technique stack (with the
    arguments that tell apart stacks of the same name), else the folder name."""
    keys, labels = [], []
    for chain in chains:
        first, last = chain[0], chain[-1]
        if _SEED_DIR.fullmatch(os.path.basename(first.path)):
            name = names[first.path]
            labels.append(os.path.dirname(name) or os.path.basename(os.path.dirname(first.path)))
            keys.append(None)
        elif last.config is not None:
            labels.append(stack_label(map(_class_name, _callbacks(last.config))))
            keys.append(_signature(last.config))
        else:
            labels.append(names[first.path])
            keys.append(None)
    for label in set(labels):
        group = [i for i, lab in enumerate(labels) if lab == label and keys[i] is not None]
        signatures = [keys[i] for i in group]
        distinct = [s for j, s in enumerate(signatures) if s not in signatures[:j]]
        if len(distinct) < 2:
            continue
        differ = sorted({k for s in distinct for k in set(s) | set(distinct[0]) if s.get(k) != distinct[0].get(k)})
        for i in group:
            args = ", ".join(f"{k.rsplit('.', 1)[-1]}={keys[i].get(k)}" for k in differ[:4])
            labels[i] = f"{label} ({args}{', ...' if len(differ) > 4 else ''})"
    return labels


def _names(run_dirs: list[str]) -> dict[str, str]:
    """Each run folder's path below the runs' common folder."""
    common = os.path.commonpath(run_dirs)
    return {run: (os.path.relpath(run, common) if run != common else os.path.basename(run)) for run in run_dirs}


def load_runs(run_dirs: list[str], metric: str, flops: str = "executed") -> list[Run]:
    """Read, join and align the runs at or below ``run_dirs`` (see the module docstring)."""
    if flops not in FLOPS_TAGS:
        raise ValueError(f"Expected `flops` in {tuple(FLOPS_TAGS)}, got flops={flops!r}")
    tag = FLOPS_TAGS[flops]
    paths = find_runs(run_dirs)
    parts = {path: _Part(path, *read_scalars(path), read_config(path)) for path in paths}
    missing = [path for path, part in parts.items() if tag not in part.scalars]
    if missing:
        raise ValueError(f"Runs without {tag} scalars: {', '.join(missing)}. Add "
                         "`- class_path: lit_eff.callbacks.FlopsMonitor` to their trainer.callbacks (a run that "
                         "just started logs it after its first trainer.log_every_n_steps steps)")
    if not any(metric in part.scalars for part in parts.values()):
        logged = sorted({t for part in parts.values() for t in part.scalars})
        raise ValueError(f"No run has the metric {metric!r}; the runs log: {', '.join(logged)}")
    names = _names(paths)
    chains = _chains(parts)
    runs = []
    for chain, variant in zip(chains, _variant_labels(chains, names)):
        scalars = _join(chain)
        flops_events = sorted(scalars[tag], key=lambda e: e.step)
        wall = 0.0
        for part in chain:
            times = [e.wall_time for events in part.scalars.values() for e in events]
            wall += max(times) - (part.first if part.first is not None else min(times))
        last = chain[-1]
        runs.append(Run(name="+".join(names[p.path] for p in chain), path=last.path, variant=variant,
                        techniques=techniques(last.path), points=_align(scalars.get(metric, []), flops_events),
                        total_flops=flops_events[-1].value, wall_time=wall,
                        finished=last.finished if last.config is not None else None,
                        parts=[p.path for p in chain]))
    return runs


def _fmt(values: list[float], digits: str = ".4g") -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return format(values[0], digits)
    return f"{format(statistics.mean(values), digits)} ± {statistics.stdev(values):.2g}"


def _stack(run: Run) -> str:
    return "(no config.yaml)" if run.techniques is None else stack_label(run.techniques)


def _status(members: list[Run]) -> str:
    known = [m for m in members if m.finished is not None]
    if not known:
        return "—"
    done = sum(m.finished for m in known)
    return "finished" if done == len(known) else f"unfinished ({len(known) - done} of {len(known)})"


def _table(runs: list[Run], metric: str, flops: str, equal: float) -> tuple[str, list[dict]]:
    variants: dict[str, list[Run]] = {}
    for run in runs:
        variants.setdefault(run.variant, []).append(run)
    header = ["run", "techniques", "seeds", "status", f"final {metric}", f"{metric} at {equal:.4g} FLOPs",
              f"total FLOPs ({flops})", "wall time (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows = []
    for variant, members in variants.items():
        row = {"variant": variant, "runs": [m.name for m in members],
               "techniques": sorted({_stack(m) for m in members}), "status": _status(members),
               "unfinished": [m.name for m in members if m.finished is False],
               "final": [m.final for m in members if m.final is not None],
               "at_equal": [m.at_equal for m in members if m.at_equal is not None],
               "total_flops": [m.total_flops for m in members], "wall_time": [m.wall_time for m in members]}
        rows.append(row)
        cells = [variant, "; ".join(row["techniques"]), str(len(members)), row["status"], _fmt(row["final"]),
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
        key = (run.variant, run.finished is False)
        label = "_nolegend_" if key in labelled else run.variant + (" (unfinished)" if run.finished is False else "")
        labelled.add(key)
        xs, ys = zip(*run.points)
        ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.2, alpha=0.85, linestyle="--" if key[1] else "-",
                color=colors(order.index(run.variant) % 10), label=label)
    ax.axvline(equal, color="gray", linestyle=":", linewidth=1, label="equal FLOPs")
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
    finished = [run for run in runs if run.finished is not False]
    equal = min(run.total_flops for run in (finished or runs))
    for run in runs:
        below = [value for x, value in run.points if x <= equal]
        run.at_equal = below[-1] if below and run.total_flops >= equal else None
    table, rows = _table(runs, metric, flops, equal)
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"{re.sub(r'[^A-Za-z0-9]+', '_', metric).strip('_')}_vs_{flops}_flops")
    _plot(runs, metric, flops, equal, stem + ".png")
    unfinished = [run.name for run in runs if run.finished is False]
    note = (f" Unfinished runs (interrupted, crashed or still running; dashed in the plot): {', '.join(unfinished)}; "
            "they do not set the equal-FLOPs point." if unfinished else "")
    source = "finished runs" if finished and unfinished else "all runs"
    with open(stem + ".md", "w") as f:
        f.write(f"# {metric} vs training FLOPs ({flops})\n\n"
                f"Equal-FLOPs point: {equal:.4g} FLOPs, the smallest final total of the {source}. Several seeds of a "
                f"variant: mean ± sample standard deviation.{note}\n\n"
                f"{table}\n\n![{metric} vs training FLOPs]({os.path.basename(stem)}.png)\n")
    return ReportResult(runs=runs, metric=metric, flops=flops, equal_flops=equal, table=table,
                        plot_path=stem + ".png", table_path=stem + ".md", rows=rows)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lit-eff report", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders, or folders of runs")
    parser.add_argument("--metric", required=True, help="scalar tag to compare, e.g. val/acc or val/bpb")
    parser.add_argument("--flops", choices=tuple(FLOPS_TAGS), default="executed",
                        help="FLOPs axis: executed (what ran) or effective (sparse-aware)")
    parser.add_argument("--out", default=".", help="folder for the PNG and the Markdown table")
    return parser


def cli(argv: list[str]) -> None:
    """``lit-eff report RUN_DIR [RUN_DIR ...] --metric M [--flops executed|effective] [--out DIR]``."""
    args = parser().parse_args(argv)
    try:
        result = report(args.run_dirs, args.metric, args.flops, args.out)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"lit-eff report: error: {error}") from None
    print(f"{result.table}\n\nWrote {result.plot_path} and {result.table_path}")
