"""Regenerate docs/results.md: every technique against a tuned dense baseline at equal training FLOPs.

    python benchmarks/results.py                          # what docs/results.md shows
    python benchmarks/results.py --tasks vit_digits --seeds 0 1 --budgets 0.5   # a smaller study

For each task the dense *reference schedule* (the base config cut to a short run) sets the unit of
compute: its executed FLOPs. At each budget (a fraction of that), every run is planned by
``FlopsBudget`` to spend exactly the budget with its learning-rate and technique schedules ending
there (a technique with cheaper steps gets more steps). The dense baseline is tuned over a small
learning-rate grid at each budget (the best mean over the seeds is the baseline); every technique
and stack runs the settings of its fragment in configs/techniques/ at the base config's learning
rate. Each row gives the mean and 95% interval over the seeds, the difference to the tuned dense
baseline with its 95% interval, and win / tie / loss (the interval of the difference above zero,
containing zero, below zero; for a metric where lower is better, the other way round).

Runs are written under ``--out`` (``results/`` by default, one ``lit-eff sweep`` folder per budget
and learning rate), and the tables, the per-run CSV and a Pareto plot per task go to ``--docs``.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import sys
import time
from collections.abc import Iterator

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lit_eff.report import report  # noqa: E402
from lit_eff.sweep import sweep  # noqa: E402

QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}

FRAGMENTS = "configs/techniques"
TASKS = {
    "vit_digits": {
        "base": "configs/vit_digits.yaml", "metric": "val/acc", "higher": True,
        "reference": ["--trainer.max_epochs", "20"], "budgets": [0.25, 0.5, 1.0], "lrs": [1e-3, 2e-3, 4e-3, 8e-3],
        "lr_arg": "--model.init_args.lr",
        "techniques": ["nm_2of4_srste", "nm_1of8_pgf", "gmp_unstructured", "rigl_erk", "spdf", "token_drop",
                       "token_merge", "token_skip_ltd", "grad_mask", "layer_freezing", "structured_ffn_lowrank",
                       "sparse_ift_wide"],
        "stacks": {"nm_2of4_srste+token_drop": ["nm_2of4_srste", "token_drop"],
                   "layer_freezing+token_drop": ["layer_freezing", "token_drop"]},
        # the weight-shared supernet whose largest subnet is the base model; its smallest subnet's metric
        "supernet": {"base": "configs/supernet_vit_digits.yaml", "smallest": "val/acc_min", "extra": []},
    },
    "gpt_text": {
        "base": "configs/gpt_text.yaml", "metric": "val/bpb", "higher": False,
        "reference": ["--trainer.max_steps", "100", "--trainer.val_check_interval", "100000"],
        "budgets": [0.25, 0.5, 1.0],
        "lrs": [1.5e-3, 3e-3, 6e-3], "lr_arg": "--model.init_args.lr",
        "techniques": ["nm_2of4_srste", "nm_1of8_pgf", "gmp_unstructured", "rigl_erk", "spdf", "token_skip_ltd",
                       "token_skip_mod", "grad_mask", "layer_freezing", "structured_ffn_lowrank", "mor_expert"],
        "stacks": {"nm_2of4_srste+token_skip_mod": ["nm_2of4_srste", "token_skip_mod"],
                   "layer_freezing+token_skip_ltd": ["layer_freezing", "token_skip_ltd"]},
        "supernet": {"base": "configs/supernet_gpt_text.yaml", "smallest": "val/bpb_min",
                     "extra": ["--trainer.val_check_interval", "100000"]},
    },
}


# the method card of each study variant: its "At equal FLOPs" block is rewritten from the study
CARDS = {"nm_2of4_srste": "nm_sparsity", "nm_1of8_pgf": "nm_sparsity", "gmp_unstructured": "magnitude_pruning",
         "rigl_erk": "dynamic_sparsity", "spdf": "spdf", "token_drop": "token_drop", "token_merge": "token_merge",
         "token_skip_ltd": "token_skip", "token_skip_mod": "token_skip", "grad_mask": "gradient_masking",
         "layer_freezing": "layer_freezing", "structured_ffn_lowrank": "structured_ffn",
         "sparse_ift_wide": "sparse_ift", "mor_expert": "mixture_of_recursions"}
BEGIN, END = "<!-- results: written by benchmarks/results.py -->", "<!-- /results -->"


def card_block(rows: list[dict], variants: list[str], tasks: dict) -> str:
    """One sentence per (variant, task): win / tie / loss against the tuned dense baseline at each budget."""
    lines = []
    for variant in variants:
        for task_name, task in tasks.items():
            part = sorted((r for r in rows if r["variant"] == variant and r["task"] == task_name
                           and "refused" not in r), key=lambda r: r["budget_fraction"])
            if not part:
                continue
            said = "; ".join(f"{r['budget_fraction']:.0%} of the reference: **{r['verdict']}** "
                             f"({task['metric']} {r['mean']:.4f}, Δ {r['diff']:+.4f} ± {r['diff_ci']:.4f})" for r in part)
            lines.append(f"- `configs/techniques/{variant}.yaml` on {task_name}, at equal executed FLOPs against the "
                         f"tuned dense baseline ([results](../results.md#{task_name}-{variant}-"
                         f"{part[0]['budget_fraction']:g})): {said}.")
    return "\n".join(lines) or "- Not measured yet: run `python benchmarks/results.py`."


def update_cards(rows: list[dict], tasks: dict, docs: str) -> None:
    for card in sorted(set(CARDS.values())):
        path = os.path.join(docs, "techniques", card + ".md")
        if not os.path.exists(path):
            continue
        text = open(path).read()
        if BEGIN not in text:
            continue
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        block = card_block(rows, [v for v, c in CARDS.items() if c == card], tasks)
        with open(path, "w") as f:
            f.write(f"{head}{BEGIN}\n{block}\n{END}{tail}")


def stack_fragment(out: str, name: str, parts: list[str]) -> str:
    """One fragment holding the callbacks of several technique fragments, in order."""
    callbacks = []
    for part in parts:
        with open(os.path.join(ROOT, FRAGMENTS, part + ".yaml")) as f:
            callbacks += yaml.safe_load(f)["trainer"]["callbacks+"]
    path = os.path.join(out, "stacks", name + ".yaml")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump({"trainer": {"callbacks+": callbacks}}, f)
    return path


def finals(result, variant: str) -> list[tuple[float, float, float]]:
    """(final metric, total FLOPs, wall seconds) of the finished runs of ``variant``."""
    return [(run.points[-1][1], run.total_flops, run.wall_time) for run in result.runs
            if run.variant == variant and run.points and run.finished is not False]


def interval(values: list[float]) -> float:
    """Half-width of the 95% interval of the mean (Student t)."""
    if len(values) < 2:
        return math.nan
    return T95.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))


def difference(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of ``a`` minus mean of ``b`` and the half-width of its 95% interval (Welch, the
    smaller sample's degrees of freedom: conservative)."""
    diff = statistics.mean(a) - statistics.mean(b)
    if min(len(a), len(b)) < 2:
        return diff, math.nan
    se = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
    return diff, T95.get(min(len(a), len(b)) - 1, 1.96) * se


def verdict(diff: float, half: float, higher: bool) -> str:
    if math.isnan(half):
        return "—"
    if diff - half > 0:
        return "win" if higher else "loss"
    if diff + half < 0:
        return "loss" if higher else "win"
    return "tie"


def run_task(name: str, task: dict, seeds: list[int], budgets: list[float], out: str,
             only: list[str] | None = None) -> Iterator[list[dict]]:
    """Run the task's study; yields the rows of each budget as it finishes."""
    base = os.path.join(ROOT, task["base"])
    root = os.path.join(out, name)
    # the unit of compute: the dense reference schedule's executed FLOPs (one run, seed 0)
    reference = sweep(base, [], 1e30, [seeds[0]], task["metric"], out=os.path.join(root, "reference"),
                      extra=task["reference"] + QUIET, plan_runs=False, resume=True)
    unit = reference.runs[0].total_flops
    fragments = [os.path.join(ROOT, FRAGMENTS, t + ".yaml") for t in task["techniques"] if not only or t in only]
    fragments += [stack_fragment(root, s, parts) for s, parts in task["stacks"].items() if not only or s in only]
    for fraction in budgets:
        rows: list[dict] = []
        budget = fraction * unit
        where = os.path.join(root, f"budget{fraction:g}")
        # dense over the learning-rate grid; each variant is its own sweep, so a study can grow
        dense: dict[float, list] = {}
        for lr in task["lrs"]:
            grid = sweep(base, [], budget, seeds, task["metric"], out=os.path.join(where, f"dense_lr{lr:g}"),
                         extra=[task["lr_arg"], str(lr), *QUIET], resume=True)
            dense[lr] = finals(grid, "dense")
        pick = max if task["higher"] else min
        best_lr = pick(dense, key=lambda lr: statistics.mean(v for v, _, _ in dense[lr]))
        baseline = [v for v, _, _ in dense[best_lr]]
        # every dense run at this budget does the same work: their median time is the reference
        dense_time = statistics.median(w for runs in dense.values() for _, _, w in runs)
        for lr, values in sorted(dense.items()):
            rows.append({**_row(name, fraction, budget, f"dense (lr {lr:g})" + (" ★" if lr == best_lr else ""), values,
                                baseline, task["higher"], dense_time, [f for _, f, _ in values]), "lr": lr})
        for fragment in fragments:
            variant = os.path.splitext(os.path.basename(fragment))[0]
            out_variant = os.path.join(where, variant)
            try:
                result = sweep(base, [fragment], budget, seeds, task["metric"], out=out_variant, extra=QUIET,
                               resume=True, dense=False)
            except (RuntimeError, SystemExit) as error:  # refused before training (e.g. a schedule longer than the run)
                reason = str(error.__cause__ or error).split("; its command")[0]
                rows.append({"task": name, "budget_fraction": fraction, "budget": budget, "variant": variant,
                             "refused": reason})
                continue
            effective = report([os.path.join(out_variant, "runs")], task["metric"], "effective", out_variant)
            values = finals(result, variant)
            if values:
                rows.append(_row(name, fraction, budget, variant, values, baseline, task["higher"], dense_time,
                                 [run.total_flops for run in effective.runs]))
        if "supernet" in task and (not only or "supernet" in only):
            rows += supernet_rows(name, task, fraction, budget, seeds, where, baseline, dense_time)
        yield rows


def supernet_rows(name: str, task: dict, fraction: float, budget: float, seeds: list[int], where: str,
                  baseline: list[float], dense_time: float) -> list[dict]:
    """The supernet's largest and smallest subnet after training the supernet on ``budget``.

    A supernet step's FLOPs depend on the subnets it draws, so FlopsBudget cannot plan it: its
    length is set from the mean step cost of a 10-step calibration run, so that its learning-rate
    schedule ends near the budget, and FlopsBudget (``plan: false``) stops it at the budget."""
    spec = task["supernet"]
    base = os.path.join(ROOT, spec["base"])
    quiet = [*spec["extra"], *QUIET]
    calibration = sweep(base, [], 1e30, [seeds[0]], task["metric"],
                        out=os.path.join(os.path.dirname(where), "supernet_steps"),
                        extra=["--trainer.max_steps", "10", *quiet], plan_runs=False, resume=True)
    per_step = calibration.runs[0].total_flops / 10
    steps = math.ceil(budget / per_step)
    out = os.path.join(where, "supernet")
    result = sweep(base, [], budget, seeds, task["metric"], out=out, plan_runs=False, resume=True,
                   extra=["--trainer.max_steps", str(steps), "--trainer.max_epochs", "-1", *quiet])
    smallest = report([os.path.join(out, "runs")], spec["smallest"], "executed", out)
    rows = []
    for label, got in (("supernet largest", result), ("supernet smallest", smallest)):
        values = finals(got, "dense")  # the sweep's only variant: the base config alone
        if values:
            rows.append(_row(name, fraction, budget, label, values, baseline, task["higher"], dense_time,
                             [f for _, f, _ in values]))
    return rows


def _row(task, fraction, budget, variant, values, baseline, higher, dense_time, effective) -> dict:
    metric = [v for v, _, _ in values]
    diff, half = difference(metric, baseline)
    return {"task": task, "budget_fraction": fraction, "budget": budget, "variant": variant, "n": len(metric),
            "mean": statistics.mean(metric), "ci": interval(metric), "diff": diff, "diff_ci": half,
            "verdict": "baseline" if variant.endswith("★") else verdict(diff, half, higher),
            "executed": statistics.mean(f for _, f, _ in values),
            "effective": statistics.mean(effective) if effective else math.nan,
            "time_ratio": statistics.median(w for _, _, w in values) / dense_time, "values": metric}


def pareto(rows: list[dict], task: str, metric: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    rows = [r for r in rows if "refused" not in r]
    variants = sorted({r["variant"] for r in rows if r["task"] == task})
    for variant in variants:
        points = sorted((r["executed"], r["mean"], r["ci"]) for r in rows if r["task"] == task and r["variant"] == variant)
        xs, ys, es = zip(*points)
        ax.errorbar(xs, ys, yerr=[0 if math.isnan(e) else e for e in es], marker="o", capsize=2, label=variant,
                    linewidth=2.5 if variant.startswith("dense") and variant.endswith("★") else 1)
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (executed)")
    ax.set_ylabel(metric)
    ax.set_title(f"{task}: {metric} vs training FLOPs (mean and 95% interval over seeds)")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(rows: list[dict], tasks: dict) -> list[str]:
    """Which variants win, tie and lose against the tuned dense baseline, per task and budget."""
    lines = ["## Summary", "",
             "Verdicts against the tuned dense baseline (dense rows left out). A tie means the 95% interval of the "
             "difference contains zero: on these short schedules most intervals are wide.", "",
             "How to read it: the budget counts executed FLOPs, what the hardware ran. Weight sparsity (N:M, "
             "magnitude pruning, RigL, SPDF's sparse phase) runs dense kernels here, so at equal executed FLOPs it "
             "trains as many steps as dense with fewer effective weights: it can only tie or lose, and pays off where "
             "sparse kernels turn its effective FLOPs (the column next to it) into executed savings. Techniques that "
             "remove work from the step (token dropping and skipping, layer freezing, structured layers) turn the "
             "savings into more steps at the same budget; whether that beats the tuned dense model is what the rows "
             "test. A tuned dense baseline is hard to beat on short runs.", "",
             "| task | budget | win | tie | loss | refused |", "|---|---|---|---|---|---|"]
    for task_name in tasks:
        for fraction in sorted({r["budget_fraction"] for r in rows if r["task"] == task_name}):
            part = [r for r in rows if r["task"] == task_name and r["budget_fraction"] == fraction
                    and not r["variant"].startswith("dense")]
            cells = [", ".join(r["variant"] for r in part if r.get("verdict") == v) or "—"
                     for v in ("win", "tie", "loss")]
            cells.append(", ".join(r["variant"] for r in part if "refused" in r) or "—")
            lines.append(f"| {task_name} | {fraction:.0%} | " + " | ".join(cells) + " |")
    return lines + [""]


def markdown(rows: list[dict], tasks: dict, seeds: list[int], command: str) -> str:
    lines = [
        "# Results: techniques vs dense at equal training FLOPs", "",
        "Generated by `" + command + "` (benchmarks/results.py). Every number below comes from that "
        "command; rerun it to regenerate this page.", "",
        "## Protocol", "",
        "- **Equal compute, schedules that end.** Each run is planned by `FlopsBudget` to spend its budget (within one "
        "optimizer step): its length is set so that its training FLOPs reach the budget, and its learning-rate "
        "schedule and every technique schedule given as a fraction of training end there. A technique whose steps "
        "are cheaper gets more of them, and its learning rate is fully annealed at the budget like the baseline's.",
        "- **Budgets.** A fraction of the executed FLOPs of the dense reference schedule "
        "(the base config cut to a short run: see `TASKS` in benchmarks/results.py).",
        "- **A tuned baseline.** At each budget the dense model runs a small learning-rate grid; the best mean "
        "(★) is the baseline every row is compared with.",
        f"- **Seeds and intervals.** Seeds {', '.join(map(str, seeds))}; mean ± half-width of the 95% interval "
        "(Student t); *Δ* is the difference to the tuned baseline with its 95% interval (Welch, conservative degrees "
        "of freedom); **win / tie / loss** says whether that interval lies above zero, contains it, or lies below it "
        "(for bits per byte, lower is better).",
        "- **FLOPs.** Executed FLOPs are what the hardware ran (the budget counts them); effective FLOPs count "
        "masked weights at their density (sparsity techniques save these, not executed ones).",
        "- **Time.** The median wall-clock time of the variant's runs over the median of all dense runs at the same "
        "budget (same machine, runs "
        "one after another: a measured ratio, noisy when the machine is busy).",
        "- **Scale.** The reference schedules are short (a few hundred optimizer steps on two CPU cores), and the "
        "fragments keep the settings they were tuned with for the full base configs, including settings in absolute "
        "steps (a 600-step token ramp, 100-step mask updates), which short runs do not always reach. The tables say "
        "how the techniques compare on short runs at equal compute; longer schedules can change the ranking.",
        "",
        "## Your own comparison", "",
        "`lit-eff sweep` trains a base config alone (`dense`) and with each technique fragment, for each seed, "
        "every run planned to spend the same budget; `lit-eff report` reads the TensorBoard runs and writes a plot "
        "and a table of the metric against training FLOPs (resumed runs joined, unfinished runs marked, rows named "
        "by technique stack):", "",
        "```bash",
        "lit-eff sweep --base configs/vit_digits.yaml --techniques configs/techniques/token_drop.yaml \\",
        "    configs/techniques/layer_freezing.yaml --budget 7e11 --seeds 0 1 2 --out results/mine",
        "lit-eff report results/mine/runs --metric val/acc --flops effective --out results/mine",
        "```", "",
    ]
    lines += summary(rows, tasks)
    for task_name, task in tasks.items():
        task_rows = [r for r in rows if r["task"] == task_name]
        if not task_rows:
            continue
        lines += [f"## {task_name}: {task['metric']} ({'higher' if task['higher'] else 'lower'} is better)", "",
                  f"Base config `{task['base']}`, reference schedule `{' '.join(task['reference'])}`.", "",
                  f"![{task_name} Pareto](results/{task_name}_pareto.png)", ""]
        for fraction in sorted({r["budget_fraction"] for r in task_rows}):
            part = [r for r in task_rows if r["budget_fraction"] == fraction]
            if not part:
                continue
            lines += [f"### {fraction:.0%} of the reference ({part[0]['budget']:.3g} FLOPs)", "",
                      f"| variant | {task['metric']} | Δ vs dense ★ | verdict | executed FLOPs | effective FLOPs | "
                      "time vs dense |", "|---|---|---|---|---|---|---|"]
            for r in part:
                if "refused" in r:
                    lines.append(f"| {r['variant']} | refused before training: {r['refused']} | | | | | |")
                    continue
                ci = "" if math.isnan(r["ci"]) else f" ± {r['ci']:.4f}"
                dci = "" if math.isnan(r["diff_ci"]) else f" ± {r['diff_ci']:.4f}"
                eff = "—" if math.isnan(r["effective"]) else f"{r['effective']:.3g}"
                anchor = r["variant"].split(" ")[0] + f"-lr{r['lr']:g}" if "lr" in r else r["variant"].replace(" ", "_")
                lines.append(f"| <a id=\"{task_name}-{anchor}-{fraction:g}\"></a>{r['variant']} | {r['mean']:.4f}{ci} "
                             f"| {r['diff']:+.4f}{dci} | {r['verdict']} | {r['executed']:.3g} | {eff} | "
                             f"{r['time_ratio']:.2f}x |")
            lines.append("")
    lines += ["Per-run values: " + ", ".join(f"[{t}](results/{t}_runs.csv)" for t in tasks
                                             if any(r["task"] == t for r in rows)), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--budgets", nargs="+", type=float, default=None,
                        help="fractions of the dense reference schedule's FLOPs (default: each task's own)")
    parser.add_argument("--only", nargs="+", default=None, metavar="NAME",
                        help="run only these techniques or stacks (and dense), for a quick study")
    parser.add_argument("--out", default=os.path.join(ROOT, "results"), help="folder for the runs")
    parser.add_argument("--docs", default=os.path.join(ROOT, "docs"), help="folder of results.md")
    args = parser.parse_args(argv)
    command = "python benchmarks/results.py" + "".join(
        f" --{k} {' '.join(map(str, v))}" for k, v in [("tasks", args.tasks), ("seeds", args.seeds),
                                                       ("budgets", args.budgets), ("only", args.only)]
        if v != parser.get_default(k))
    start = time.time()
    tasks = {name: TASKS[name] for name in args.tasks}
    rows = []
    os.makedirs(os.path.join(args.docs, "results"), exist_ok=True)
    for name, task in tasks.items():
        task_rows: list[dict] = []
        budgets = args.budgets or task["budgets"]
        for budget_rows in run_task(name, task, args.seeds, budgets, args.out, args.only):
            task_rows += budget_rows
            rows += budget_rows
            _write(rows, task_rows, name, task, tasks, args, command)
    print(f"Wrote {os.path.join(args.docs, 'results.md')} in {time.time() - start:.0f} s")


def _write(rows: list[dict], task_rows: list[dict], name: str, task: dict, tasks: dict, args, command: str) -> None:
    """Write the page, the task's plot and CSV (after every budget: a long study shows its progress)."""
    pareto(task_rows, name, task["metric"], os.path.join(args.docs, "results", f"{name}_pareto.png"))
    with open(os.path.join(args.docs, "results", f"{name}_runs.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["budget_fraction", "variant", "seed_values", "executed", "effective"])
        for r in (r for r in task_rows if "refused" not in r):
            writer.writerow([r["budget_fraction"], r["variant"], " ".join(f"{v:.5f}" for v in r["values"]),
                             f"{r['executed']:.6g}", f"{r['effective']:.6g}"])
    with open(os.path.join(args.docs, "results.md"), "w") as f:
        f.write(markdown(rows, tasks, args.seeds, command))
    update_cards(rows, tasks, args.docs)


if __name__ == "__main__":
    main()
