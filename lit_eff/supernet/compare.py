"""Compare supernet runs subnet by subnet: the last ``supernet/<stage>_<metric>@<MFLOPs>`` value
of each run's TensorBoard logs, runs with the same label averaged (seeds), as a Markdown table
and an accuracy-vs-FLOPs PNG.

    python -m lit_eff.supernet.compare sandwich=runs/sandwich/s0 sandwich=runs/sandwich/s1 \\
        deps=runs/deps/s0 --stage test --metric acc --out supernet_samplers.png
"""

from __future__ import annotations

import argparse
import re
import statistics
from collections import defaultdict

from lit_eff.report import find_runs, read_scalars


def subnet_points(run_dir: str, stage: str = "test", metric: str = "acc") -> dict[float, float]:
    """{forward MFLOPs of a subnet: its last logged ``stage`` ``metric``} of one run folder."""
    pattern = re.compile(rf"supernet/{re.escape(stage)}_{re.escape(metric)}@([0-9.eE+-]+)")
    scalars, _ = read_scalars(run_dir)
    points = {float(m.group(1)): events[-1].value for tag, events in scalars.items() if (m := pattern.fullmatch(tag))}
    if not points:
        raise ValueError(f"No `supernet/{stage}_{metric}@<MFLOPs>` scalars in {run_dir!r}; pass the folder of a "
                         f"SupernetModule run that ran {'testing' if stage == 'test' else 'validation'}")
    return points


def compare(runs: list[tuple[str, str]], stage: str = "test", metric: str = "acc") -> dict[str, list[tuple]]:
    """{label: [(MFLOPs, mean, std, n)]} over ``(label, run_dir)`` pairs; same-label runs are averaged."""
    by_label: dict[str, list[dict[float, float]]] = defaultdict(list)
    for label, path in runs:
        for run_dir in find_runs([path]):
            by_label[label].append(subnet_points(run_dir, stage, metric))
    out = {}
    for label, seeds in by_label.items():
        shared = sorted(set.intersection(*(set(s) for s in seeds)))
        out[label] = [(f, statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v))
                      for f in shared for v in [[s[f] for s in seeds]]]
    return out


def table(curves: dict[str, list[tuple]]) -> str:
    flops = sorted({p[0] for points in curves.values() for p in points})
    lines = ["| run | seeds | " + " | ".join(f"{f:g}" for f in flops) + " |", "|---" * (len(flops) + 2) + "|"]
    for label, points in curves.items():
        at = {p[0]: p for p in points}
        cells = [f"{at[f][1]:.3f} ± {at[f][2]:.3f}" if f in at and at[f][3] > 1 else
                 (f"{at[f][1]:.3f}" if f in at else "") for f in flops]
        lines.append(f"| {label} | {points[0][3]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(curves: dict[str, list[tuple]], path: str, ylabel: str, title: str = "") -> None:
    from lit_eff.supernet.plot import figure

    fig, ax = figure(6, 4)
    for label, points in curves.items():
        x, y, err = [p[0] for p in points], [p[1] for p in points], [p[2] for p in points]
        style = "o-" if len(points) > 1 else "s"
        ax.errorbar(x, y, yerr=err if any(err) else None, fmt=style, capsize=3, ms=5, label=label)
    ax.set_xlabel("forward MFLOPs per sample")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="LABEL=RUN_DIR", help="runs; repeat a label to average seeds")
    parser.add_argument("--stage", default="test", choices=("val", "test"))
    parser.add_argument("--metric", default="acc", choices=("acc", "loss"))
    parser.add_argument("--out", default="supernet_compare.png", help="PNG path")
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    pairs = []
    for spec in args.runs:
        label, sep, path = spec.partition("=")
        if not sep or not label or not path:
            parser.error(f"Expected LABEL=RUN_DIR, got {spec!r}")
        pairs.append((label, path))
    curves = compare(pairs, args.stage, args.metric)
    print(table(curves))
    plot(curves, args.out, f"{args.stage} {args.metric}", args.title)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
