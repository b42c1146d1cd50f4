"""Train a base config alone ("dense") and with each technique fragment, for each seed, under
one FLOPs budget, then compare them at equal FLOPs (``lit-eff report``).

    lit-eff sweep --base configs/vit_digits.yaml --techniques configs/techniques/a.yaml b.yaml \\
        --budget 1e12 --seeds 0 1 2 [--metric val/acc] [--flops executed|effective] [--out sweep] \\
        [-- --trainer.max_epochs 80 ...]

Each run is ``lit-eff fit --config BASE [--config FRAGMENT] --config <budget fragment>
--seed_everything SEED [overrides after --]``, one at a time; the budget fragment
(``OUT/fragments/<variant>_seed<SEED>.yaml``, kept so the printed command reruns) appends a
:class:`~lit_eff.callbacks.FlopsBudget` (the base config must hold a ``FlopsMonitor``) and logs
to ``OUT/runs/<variant>/seed<SEED>/`` (TensorBoard events and the run's ``config.yaml``), so
the report averages the seeds of each variant. A variant is named after its fragment's file.
``--metric`` defaults to the first of val/acc, val/bpb, val/loss that the runs log. The
budget caps a run; a run whose ``max_epochs``/``max_steps`` come first stops short of it
(the sweep says so, and the report's equal-FLOPs column still compares at a common budget).
"""

from __future__ import annotations

import argparse
import os
import shlex

import yaml

from lit_eff.report import FLOPS_TAGS, ReportResult, read_scalars, report

DEFAULT_METRICS = ("val/acc", "val/bpb", "val/loss")


def _check_file(argument: str, path: str) -> None:
    if not os.path.isfile(path):
        what = "is a folder, not a YAML file" if os.path.isdir(path) else "does not exist"
        folder = os.path.dirname(path) or "."
        found = sorted(f for f in os.listdir(folder) if f.endswith((".yaml", ".yml"))) if os.path.isdir(folder) else []
        hint = f" ({folder} holds: {', '.join(found)})" if found else ""
        raise FileNotFoundError(f"{argument} {path!r} {what}; pass a LightningCLI config file{hint}")


def plan(base: str, techniques: list[str], seeds: list[int], out: str) -> list[tuple[str, str | None, int, str]]:
    """(variant, fragment, seed, run folder) of every run, checked before any run starts."""
    _check_file("--base", base)
    for fragment in techniques:
        _check_file("--techniques", fragment)
    variants: dict[str, str | None] = {"dense": None}
    for fragment in techniques:
        name = os.path.splitext(os.path.basename(fragment))[0]
        if name in variants:
            raise ValueError(f"--techniques {fragment!r} gives the variant name {name!r}, already taken by "
                             f"{variants[name] or 'the base config alone'}; rename the fragment file")
        variants[name] = fragment
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {seeds} repeats a seed; pass each seed once")
    runs = [(name, fragment, seed, os.path.join(out, "runs", name, f"seed{seed}"))
            for name, fragment in variants.items() for seed in seeds]
    taken = [folder for *_, folder in runs if os.path.exists(folder)]
    if taken:
        raise FileExistsError(f"--out {out!r} already holds runs of this sweep: {', '.join(taken)}; "
                              "choose another --out or remove them (new events would mix with the old)")
    return runs


def _budget_fragment(path: str, out: str, variant: str, seed: int, budget: float, kind: str) -> None:
    fragment = {"trainer": {
        "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                   "init_args": {"save_dir": os.path.join(out, "runs"), "name": variant, "version": f"seed{seed}",
                                 "default_hp_metric": False}},
        "callbacks+": [{"class_path": "lit_eff.callbacks.FlopsBudget", "init_args": {"budget": budget, "kind": kind}}],
    }}
    with open(path, "w") as f:
        yaml.safe_dump(fragment, f)


def _default_metric(run_dir: str) -> str:
    logged = read_scalars(run_dir)[0]
    for metric in DEFAULT_METRICS:
        if metric in logged:
            return metric
    raise ValueError(f"The runs log none of {DEFAULT_METRICS}; pass --metric, one of: {', '.join(sorted(logged))}")


def sweep(base: str, techniques: list[str], budget: float, seeds: list[int], metric: str | None = None,
          flops: str = "executed", out: str = "sweep", extra: list[str] | tuple = ()) -> ReportResult:
    """Run every (variant, seed) of the sweep, then write and return the report."""
    if not budget > 0:
        raise ValueError(f"Expected --budget > 0 (training FLOPs), got {budget}")
    if flops not in FLOPS_TAGS:
        raise ValueError(f"Expected --flops in {tuple(FLOPS_TAGS)}, got {flops!r}")
    runs = plan(base, techniques, seeds, out)
    # In-process rather than one subprocess per run: no second import of torch and Lightning per
    # run (seconds each, most of a small run), and a failure surfaces with its own traceback. Runs
    # share no state that matters: each seeds everything, builds its own Trainer and logs to its
    # own folder.
    from lit_eff.cli import main

    os.makedirs(os.path.join(out, "fragments"), exist_ok=True)
    for i, (variant, fragment, seed, folder) in enumerate(runs, 1):
        budget_yaml = os.path.join(out, "fragments", f"{variant}_seed{seed}.yaml")  # kept: the command reruns
        _budget_fragment(budget_yaml, out, variant, seed, budget, flops)
        args = ["fit", "--config", base, *(["--config", fragment] if fragment else []),
                "--config", budget_yaml, "--seed_everything", str(seed), *extra]
        command = f"lit-eff {shlex.join(args)}"
        print(f"[sweep {i}/{len(runs)}] {variant}, seed {seed}: {command}", flush=True)
        try:
            main(args)
        except SystemExit as error:  # LightningCLI exits on a bad config or override
            if error.code:
                raise SystemExit(f"lit-eff sweep: run {variant!r} seed {seed} failed ({error.code}); "
                                 f"its command: {command}") from None
        except Exception as error:
            raise RuntimeError(f"lit-eff sweep: run {variant!r} seed {seed} failed: {error}; "
                               f"its command: {command}") from error
    metric = metric or _default_metric(runs[0][3])
    result = report([os.path.join(out, "runs")], metric, flops, out)
    for run in result.runs:
        if run.total_flops < budget:
            print(f"lit-eff sweep: {run.name} stopped at {run.total_flops:.4g} FLOPs, short of the budget "
                  f"{budget:.4g} (max_epochs/max_steps came first); raise them after `--` or lower --budget")
    return result


def cli(argv: list[str]) -> None:
    """``lit-eff sweep --base B --techniques F ... --budget X --seeds S ... [options] [-- overrides]``."""
    argv = list(argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="lit-eff sweep", description=__doc__.split("\n\n")[0],
                                     epilog="Arguments after `--` are added to every `lit-eff fit` command.")
    parser.add_argument("--base", required=True, help="base config (model, data, trainer with a FlopsMonitor)")
    parser.add_argument("--techniques", nargs="*", default=[], metavar="FRAGMENT", help="technique YAML fragments")
    parser.add_argument("--budget", type=float, required=True, help="training FLOPs budget of every run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of every variant")
    parser.add_argument("--metric", default=None, help=f"scalar to compare (default: first of {DEFAULT_METRICS})")
    parser.add_argument("--flops", choices=tuple(FLOPS_TAGS), default="executed", help="FLOPs the budget counts")
    parser.add_argument("--out", default="sweep", help="folder for the runs and the report")
    args = parser.parse_args(argv)
    if not args.budget > 0:
        parser.error(f"argument --budget: expected > 0 (training FLOPs), got {args.budget:g}")
    try:
        result = sweep(args.base, args.techniques, args.budget, args.seeds, args.metric, args.flops, args.out, extra)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        raise SystemExit(f"lit-eff sweep: error: {error}") from None
    print(f"{result.table}\n\nWrote {result.plot_path} and {result.table_path}")
