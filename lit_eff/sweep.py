"""Train a base config alone ("dense") and with each technique fragment, for each seed, under
one FLOPs budget, then compare them at equal FLOPs (``lit-eff report``).

    lit-eff sweep --base configs/vit_digits.yaml --techniques configs/techniques/a.yaml b.yaml \\
        --budget 1e12 --seeds 0 1 2 [--metric val/acc] [--flops executed|effective] [--out sweep] \\
        [--resume] [-- --trainer.max_epochs 80 ...]

Each run is ``lit-eff fit --config BASE [--config FRAGMENT] --config <budget fragment>
--seed_everything SEED [overrides after --]``, one at a time; the budget fragment
(``OUT/fragments/<variant>_seed<SEED>.yaml``, kept so the printed command reruns) appends a
:class:`~lit_eff.callbacks.FlopsBudget` (the base config must hold a ``FlopsMonitor``) and logs
to ``OUT/runs/<variant>/seed<SEED>/`` (TensorBoard events, the run's ``config.yaml`` and
``checkpoints/last.ckpt``), so the report averages the seeds of each variant. A variant is named
after its fragment's file. ``--metric`` defaults to the first of val/acc, val/bpb, val/loss that
the runs log. Each run is planned to spend the budget: its length is set so that its FLOPs reach
the budget and its learning-rate and technique schedules end there (a technique with cheaper
steps gets more of them). With ``--no-plan`` the budget only stops a run, and a run whose
``max_epochs``/``max_steps`` come first stops short of it (the sweep says so).

SIGTERM or Ctrl+C stops the sweep: the run in progress saves its ``last.ckpt`` after its current
step (the base config's :class:`~lit_eff.runs.ResumableCheckpoint`; without one it runs to its
end first), is marked interrupted in ``OUT/sweep.yaml``, and no report is written. The same
command with ``--resume`` continues: finished runs are kept, the interrupted run resumes from its
``last.ckpt``, the others start.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import sys

import yaml

from lit_eff.report import FLOPS_TAGS, ReportResult, read_scalars, report
from lit_eff.runs.checkpoint import EXIT_STATUS, SIGNALS

DEFAULT_METRICS = ("val/acc", "val/bpb", "val/loss")
STATE = "sweep.yaml"
STOPPED_CODES = {1, *EXIT_STATUS.values()}  # Lightning exits 1 after Ctrl+C; ResumableCheckpoint 130/143


def _check_file(argument: str, path: str) -> None:
    if not os.path.isfile(path):
        what = "is a folder, not a YAML file" if os.path.isdir(path) else "does not exist"
        folder = os.path.dirname(path) or "."
        found = sorted(f for f in os.listdir(folder) if f.endswith((".yaml", ".yml"))) if os.path.isdir(folder) else []
        hint = f" ({folder} holds: {', '.join(found)})" if found else ""
        raise FileNotFoundError(f"{argument} {path!r} {what}; pass a LightningCLI config file{hint}")


def plan(base: str, techniques: list[str], seeds: list[int], out: str,
         resume: bool = False) -> list[tuple[str, str | None, int, str]]:
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
    if taken and not resume:
        raise FileExistsError(f"--out {out!r} already holds runs of this sweep: {', '.join(taken)}; continue it "
                              "with --resume, or choose another --out or remove them (new events would mix with the "
                              "old)")
    return runs


def _budget_fragment(path: str, out: str, variant: str, seed: int, budget: float, kind: str, plan: bool) -> None:
    fragment = {"trainer": {
        "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                   "init_args": {"save_dir": os.path.join(out, "runs"), "name": variant, "version": f"seed{seed}",
                                 "default_hp_metric": False}},
        "callbacks+": [{"class_path": "lit_eff.callbacks.FlopsBudget", "init_args": {"budget": budget, "kind": kind,
                                                                                 "plan": plan}}],
    }}
    with open(path, "w") as f:
        yaml.safe_dump(fragment, f)


def _default_metric(run_dir: str) -> str:
    logged = read_scalars(run_dir)[0]
    for metric in DEFAULT_METRICS:
        if metric in logged:
            return metric
    raise ValueError(f"The runs log none of {DEFAULT_METRICS}; pass --metric, one of: {', '.join(sorted(logged))}")


class _State:
    """``OUT/sweep.yaml``: the sweep's arguments and each run's status (``finished``,
    ``interrupted``, ``running`` while it runs or if the sweep died with it)."""

    def __init__(self, out: str, arguments: dict, resume: bool) -> None:
        self.path = os.path.join(out, STATE)
        saved = {}
        if os.path.isfile(self.path):
            with open(self.path) as f:
                saved = yaml.safe_load(f) or {}
        if resume and saved.get("arguments") not in (None, arguments):
            before = saved["arguments"]
            differ = ", ".join(f"{k}={before.get(k)!r}" for k in sorted(arguments) if before.get(k) != arguments[k])
            raise ValueError(f"--resume: --out {out!r} holds a sweep run with other arguments ({differ}); pass the "
                             "same arguments as that sweep")
        self.arguments = arguments
        self.runs: dict[str, str] = dict(saved.get("runs") or {}) if resume else {}

    def set(self, folder: str, status: str) -> None:
        self.runs[folder] = status
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, "w") as f:
            yaml.safe_dump({"arguments": self.arguments, "runs": self.runs}, f, sort_keys=False)


class _Signals:
    """Between runs, SIGINT and SIGTERM only set a flag (during a run, ResumableCheckpoint has them)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.previous = {s: signal.getsignal(s) for s in SIGNALS}

    def __enter__(self):
        for s in SIGNALS:
            signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum
        print(f"\nlit-eff sweep: {SIGNALS[signum]} received: stopping after this run's current step", flush=True)

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def sweep(base: str, techniques: list[str], budget: float, seeds: list[int], metric: str | None = None,
          flops: str = "executed", out: str = "sweep", extra: list[str] | tuple = (),
          resume: bool = False, plan_runs: bool = True) -> ReportResult:
    """Run every (variant, seed) of the sweep, then write and return the report. Raises
    ``SystemExit(143)`` (SIGTERM) or ``SystemExit(130)`` (SIGINT) when stopped; ``resume``
    continues a stopped sweep."""
    if not budget > 0:
        raise ValueError(f"Expected --budget > 0 (training FLOPs), got {budget}")
    if flops not in FLOPS_TAGS:
        raise ValueError(f"Expected --flops in {tuple(FLOPS_TAGS)}, got {flops!r}")
    runs = plan(base, techniques, seeds, out, resume)
    arguments = {"base": base, "techniques": list(techniques), "budget": budget, "seeds": list(seeds),
                 "flops": flops, "extra": list(extra), "plan": plan_runs}
    state = _State(out, arguments, resume)
    # In-process rather than one subprocess per run: no second import of torch and Lightning per
    # run (seconds each, most of a small run), and a failure surfaces with its own traceback. Runs
    # share no state that matters: each seeds everything, builds its own Trainer and logs to its
    # own folder.
    from lit_eff.cli import main

    os.makedirs(os.path.join(out, "fragments"), exist_ok=True)
    with _Signals() as signals:
        for i, (variant, fragment, seed, folder) in enumerate(runs, 1):
            status = state.runs.get(folder)
            if status == "finished":
                print(f"[sweep {i}/{len(runs)}] {variant}, seed {seed}: finished earlier, kept", flush=True)
                continue
            budget_yaml = os.path.join(out, "fragments", f"{variant}_seed{seed}.yaml")  # kept: the command reruns
            _budget_fragment(budget_yaml, out, variant, seed, budget, flops, plan_runs)
            args = ["fit", "--config", base, *(["--config", fragment] if fragment else []),
                    "--config", budget_yaml, "--seed_everything", str(seed), *extra]
            last = os.path.join(folder, "checkpoints", "last.ckpt")
            if os.path.exists(folder):  # a run this sweep started and did not finish
                if os.path.isfile(last):
                    args += ["--ckpt_path", last]
                else:  # nothing to resume from: start it again in a clean folder
                    shutil.rmtree(folder)
            command = f"lit-eff {shlex.join(args)}"
            print(f"[sweep {i}/{len(runs)}] {variant}, seed {seed}: {command}", flush=True)
            state.set(folder, "running")
            code = _run(main, args, variant, seed, command)
            stopped = signals.received or (code in STOPPED_CODES and code)
            state.set(folder, "interrupted" if code else "finished")
            if stopped:
                name = {1: "SIGINT", 130: "SIGINT", 143: "SIGTERM"}.get(code) or SIGNALS[signals.received]
                print(f"lit-eff sweep: stopped by {name} during {variant}, seed {seed}"
                      f"{' (its last.ckpt is saved)' if code else ''}; no report written. Continue with the same "
                      f"command plus --resume", flush=True)
                raise SystemExit(EXIT_STATUS[signal.SIGTERM if name == "SIGTERM" else signal.SIGINT])
    metric = metric or _default_metric(runs[0][3])
    result = report([os.path.join(out, "runs")], metric, flops, out)
    for run in result.runs:
        if run.total_flops < 0.99 * budget:
            print(f"lit-eff sweep: {run.name} stopped at {run.total_flops:.4g} FLOPs, short of the budget "
                  f"{budget:.4g} (with --no-plan, max_epochs/max_steps came first; raise them after `--`)")
    return result


def _run(main, args: list[str], variant: str, seed: int, command: str) -> int:
    """Run one ``lit-eff fit``; 0 when it finished, its exit status when a signal stopped it."""
    try:
        main(args)
    except SystemExit as error:  # a signal (1, 130, 143), or a bad config or override (2)
        code = error.code if isinstance(error.code, int) else 1
        if code in STOPPED_CODES:
            return code
        if code:
            raise SystemExit(f"lit-eff sweep: run {variant!r} seed {seed} failed ({error.code}); "
                             f"its command: {command}") from None
    except KeyboardInterrupt:  # a second Ctrl+C: stopped mid-step
        return EXIT_STATUS[signal.SIGINT]
    except Exception as error:
        raise RuntimeError(f"lit-eff sweep: run {variant!r} seed {seed} failed: {error}; "
                           f"its command: {command}") from error
    return 0


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lit-eff sweep", description=__doc__.split("\n\n")[0],
                                     epilog="Arguments after `--` are added to every `lit-eff fit` command.")
    parser.add_argument("--base", required=True, help="base config (model, data, trainer with a FlopsMonitor)")
    parser.add_argument("--techniques", nargs="*", default=[], metavar="FRAGMENT",
                        help="technique YAML fragments, one variant each")
    parser.add_argument("--budget", type=float, required=True, help="training FLOPs budget of every run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of every variant")
    parser.add_argument("--metric", default=None, help=f"scalar to compare (default: first of {DEFAULT_METRICS})")
    parser.add_argument("--flops", choices=tuple(FLOPS_TAGS), default="executed", help="FLOPs the budget counts")
    parser.add_argument("--out", default="sweep", help="folder for the runs and the report")
    parser.add_argument("--plan", action=argparse.BooleanOptionalAction, default=True,
                        help="set each run's length so it spends the budget and its schedules end there (default); "
                             "--no-plan only stops runs at the budget")
    parser.add_argument("--resume", action="store_true",
                        help="continue a stopped sweep in --out: keep finished runs, resume the interrupted one")
    return parser


def cli(argv: list[str]) -> None:
    """``lit-eff sweep --base B --techniques F ... --budget X --seeds S ... [options] [-- overrides]``."""
    argv = list(argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    cli_parser = parser()
    args = cli_parser.parse_args(argv)
    if not args.budget > 0:
        cli_parser.error(f"argument --budget: expected > 0 (training FLOPs), got {args.budget:g}")
    try:
        result = sweep(args.base, args.techniques, args.budget, args.seeds, args.metric, args.flops, args.out, extra,
                       args.resume, args.plan)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        raise SystemExit(f"lit-eff sweep: error: {error}") from None
    print(f"{result.table}\n\nWrote {result.plot_path} and {result.table_path}")
    sys.stdout.flush()
