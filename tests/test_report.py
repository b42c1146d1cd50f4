import os
import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_eff.cli import main
from lit_eff.report import report

BASE = os.path.join(os.path.dirname(__file__), "..", "configs", "vit_digits.yaml")
TINY = ["--model.init_args.model_kwargs",
        "{img_size: 8, patch_size: 2, embed_dim: 32, depth: 2, num_heads: 2, mlp_ratio: 2.0, global_pool: avg}",
        "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2", "--trainer.limit_test_batches", "2",
        "--trainer.check_val_every_n_epoch", "1", "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def fragment(path, class_path, **init_args):
    with open(path, "w") as f:
        yaml.safe_dump({"trainer": {"callbacks+": [{"class_path": class_path, "init_args": init_args}]}}, f)
    return str(path)


def scalars(run_dir):
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: acc.Scalars(tag) for tag in acc.Tags()["scalars"]}, acc.FirstEventTimestamp()


def table_rows(table):
    lines = table.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return {cells[0]: dict(zip(header, cells)) for cells in
            ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three finished runs: 6 and 9 optimizer steps, the third with an extra (technique) callback."""
    root = tmp_path_factory.mktemp("runs")
    stop = fragment(root / "stop.yaml", "lightning.pytorch.callbacks.EarlyStopping", monitor="val/acc", mode="max",
                    patience=100)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)  # module fixtures run before conftest's per-test chdir
        for seed, steps, extra in [(0, 6, []), (1, 9, []), (2, 6, ["--config", stop])]:
            main(["fit", "--config", BASE, *extra, *TINY, "--trainer.max_steps", str(steps),
                  "--seed_everything", str(seed)])
    return root / "lightning_logs"


LABELS = {"version_0": "dense (max_steps=6)", "version_1": "dense (max_steps=9)", "version_2": "EarlyStopping"}


def test_report_numbers_match_tensorboard(runs, tmp_path):
    result = report([str(runs)], "val/acc", out_dir="out")
    assert os.path.getsize(result.plot_path) > 1000 and open(result.plot_path, "rb").read(4) == b"\x89PNG"
    assert result.table in open(result.table_path).read()
    # independent reading: FlopsMonitor logs every step, so each val/acc step has its own flops/total
    logged = {f"version_{i}": scalars(runs / f"version_{i}") for i in range(3)}
    totals = {name: s["flops/total"][-1].value for name, (s, _) in logged.items()}
    equal = min(totals.values())
    assert equal == totals["version_0"] < totals["version_1"]  # 6 vs 9 steps
    rows = table_rows(result.table)
    assert set(rows) == set(LABELS.values())  # rows named by technique stack, told apart by their arguments
    for name, (s, first) in logged.items():
        flops_at = {e.step: e.value for e in s["flops/total"]}
        curve = [(flops_at[e.step], e.value) for e in s["val/acc"]]
        at_equal = [value for flops, value in curve if flops <= equal][-1]
        row = rows[LABELS[name]]
        assert row["status"] == "finished"
        assert row["final val/acc"] == f"{s['val/acc'][-1].value:.4g}"
        assert row[f"val/acc at {equal:.4g} FLOPs"] == f"{at_equal:.4g}"
        assert row["total FLOPs (executed)"] == f"{totals[name]:.4g}"
        assert row["seeds"] == "1"
        run = next(r for r in result.runs if r.name == name)
        assert run.points == curve and run.at_equal == at_equal and run.total_flops == totals[name]
        last = max(e.wall_time for events in s.values() for e in events)
        assert run.wall_time == pytest.approx(last - first) and run.wall_time > 0
    assert rows[LABELS["version_0"]]["techniques"] == "dense" and rows["EarlyStopping"]["techniques"] == "EarlyStopping"


def test_report_reads_a_run_in_progress(runs, tmp_path):
    # the fit's event file (the test after fit writes a second one), as while the fit writes it
    event = max((f for f in os.listdir(runs / "version_1") if f.startswith("events")),
                key=lambda f: os.path.getsize(runs / "version_1" / f))
    partial = tmp_path / "partial" / "version_1"
    partial.mkdir(parents=True)
    data = open(runs / "version_1" / event, "rb").read()
    (partial / event).write_bytes(data[: int(len(data) * 0.7)])  # cut mid-record
    full = report([str(runs / "version_1")], "val/acc", out_dir="full").runs[0]
    cut = report([str(partial)], "val/acc", out_dir="cut").runs[0]
    assert 0 < cut.total_flops < full.total_flops and cut.points == full.points[: len(cut.points)]


def test_report_errors_name_the_path_and_what_exists(runs, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("")
    with pytest.raises(FileNotFoundError, match=r"No runs under '.*empty': no events.out.tfevents.* holds: notes.txt"):
        report([str(tmp_path / "empty")], "val/acc")
    with pytest.raises(FileNotFoundError, match=r"Run directory '.*nowhere' does not exist"):
        report([str(tmp_path / "nowhere")], "val/acc")
    from lightning.pytorch.loggers import TensorBoardLogger

    logger = TensorBoardLogger(str(tmp_path), name="plain", version=0)
    logger.log_metrics({"val/acc": 0.5}, step=0)
    logger.finalize("success")
    with pytest.raises(ValueError, match=r"Runs without flops/total scalars: \S*plain/version_0\. Add "
                                         r"`- class_path: lit_eff.callbacks.FlopsMonitor`"):
        report([str(runs / "version_0"), str(tmp_path / "plain")], "val/acc")
    with pytest.raises(ValueError, match=r"No run has the metric 'val/bpb'; the runs log: .*flops/total.*val/acc"):
        report([str(runs)], "val/bpb")
    with pytest.raises(ValueError, match=r"Expected `flops` in \('executed', 'effective'\), got flops='dense'"):
        report([str(runs)], "val/acc", flops="dense")


def test_cli_report_and_sweep_refuse_bad_input_with_one_message(runs, capsys):
    main(["report", str(runs), "--metric", "test/acc", "--flops", "effective", "--out", "cli"])
    assert "| total FLOPs (effective) |" in capsys.readouterr().out
    assert os.path.isfile("cli/test_acc_vs_effective_flops.png")
    with pytest.raises(SystemExit, match=r"lit-eff report: error: No run has the metric 'val/ac'"):
        main(["report", str(runs), "--metric", "val/ac"])
    with pytest.raises(SystemExit, match=r"lit-eff sweep: error: --base 'nope.yaml' does not exist"):
        main(["sweep", "--base", "nope.yaml", "--budget", "1e9"])
    with pytest.raises(SystemExit, match=r"--techniques '.*missing.yaml' does not exist; .*holds: .*vit_digits.yaml"):
        main(["sweep", "--base", BASE, "--techniques", os.path.join(os.path.dirname(BASE), "missing.yaml"),
              "--budget", "1e9"])
    with pytest.raises(SystemExit):
        main(["sweep", "--base", BASE, "--budget", "0"])
    assert "argument --budget: expected > 0 (training FLOPs), got 0" in capsys.readouterr().err


def test_sweep_groups_seeds_and_reports(runs, capsys):
    step = scalars(runs / "version_0")[0]["flops/step"][-1].value
    budget = 3.5 * step  # stops after the 4th optimizer step
    lr_monitor = fragment("lr_monitor.yaml", "lightning.pytorch.callbacks.LearningRateMonitor")
    main(["sweep", "--base", BASE, "--techniques", lr_monitor, "--budget", str(budget), "--seeds", "0", "1",
          "--out", "sweep", "--", *TINY])
    out = capsys.readouterr().out
    assert "[sweep 4/4] lr_monitor, seed 1" in out and "Wrote sweep/val_acc_vs_executed_flops.png" in out
    rows = table_rows(open("sweep/val_acc_vs_executed_flops.md").read().split("\n\n")[2])
    assert set(rows) == {"dense", "lr_monitor"}
    for variant in rows:
        finals = []
        for seed in (0, 1):
            run = os.path.join("sweep", "runs", variant, f"seed{seed}")
            s, _ = scalars(run)
            assert budget <= s["flops/total"][-1].value < budget + step  # stopped at the shared budget
            assert any(t.startswith("lr-") for t in s) == (variant == "lr_monitor")  # the fragment's callback ran
            config = yaml.safe_load(open(os.path.join(run, "config.yaml")))
            assert config["seed_everything"] == seed
            budget_callback = {"class_path": "lit_eff.callbacks.FlopsBudget",
                               "init_args": {"budget": budget, "kind": "executed", "plan": True}}
            assert budget_callback in config["trainer"]["callbacks"]
            finals.append(s["val/acc"][-1].value)
        mean = sum(finals) / 2
        assert rows[variant]["seeds"] == "2" and rows[variant]["final val/acc"].startswith(f"{mean:.4g} ± ")
        assert rows[variant]["techniques"] == "dense"  # LearningRateMonitor is plumbing, not a technique
    with pytest.raises(SystemExit, match=r"--out 'sweep' already holds runs of this sweep: .*dense/seed0"):
        main(["sweep", "--base", BASE, "--budget", str(budget), "--out", "sweep"])


def signal_fragment(path, step, marker, seed=None):
    return fragment(path, "tests.runs.probes.SignalAt", step=step, marker=str(marker), seed=seed)


def stopped(args):
    with pytest.raises(SystemExit) as exit_:
        main(args)
    return exit_.value.code


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """lightning_logs/version_0: stopped by SIGTERM during step 4 (last.ckpt at step 5) and resumed
    as version_1; version_2: stopped likewise and left unfinished; reference/: never stopped."""
    root = tmp_path_factory.mktemp("resumed")
    marker = root / "signalled"
    args = ["fit", "--config", BASE, *TINY, "--trainer.max_steps", "9", "--test_after_fit", "false",
            "--config", signal_fragment(root / "signal.yaml", 4, marker)]  # every run: the same command
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        assert stopped(args) == 143
        main([*args, "--ckpt_path", str(root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt")])
        marker.unlink()
        assert stopped(args) == 143
        (root / "reference").mkdir()
        patch.chdir(root / "reference")
        main(args)
    return root


def test_a_resumed_run_is_one_run_equal_to_the_uninterrupted_one(resumed):
    result = report([str(resumed / "lightning_logs")], "val/acc", out_dir=str(resumed / "out"))
    joined = next(run for run in result.runs if run.name == "version_0+version_1")
    unfinished = next(run for run in result.runs if run.name == "version_2")
    assert len(result.runs) == 2 and joined.finished and unfinished.finished is False
    reference = report([str(resumed / "reference" / "lightning_logs")], "val/acc", out_dir=str(resumed / "ref")).runs[0]
    assert joined.total_flops == reference.total_flops
    assert [x for x, _ in joined.points] == [x for x, _ in reference.points]
    assert [v for _, v in joined.points] == pytest.approx([v for _, v in reference.points], abs=1e-6)
    # the unfinished run (5 steps) does not set the equal-FLOPs point: the finished run does
    assert unfinished.total_flops < joined.total_flops == result.equal_flops
    assert unfinished.at_equal is None
    rows = table_rows(result.table)
    assert set(rows) == {"SignalAt"} and rows["SignalAt"]["status"] == "unfinished (1 of 2)"
    assert "Unfinished runs (interrupted, crashed or still running; dashed in the plot): version_2" in \
        open(result.table_path).read()


def test_sweep_stops_on_sigterm_and_resumes(runs, capsys, tmp_path):
    step = scalars(runs / "version_0")[0]["flops/step"][-1].value
    budget = 3.5 * step  # 4 optimizer steps
    probe = signal_fragment("probe.yaml", 1, tmp_path / "signalled", seed=1)
    command = ["sweep", "--base", BASE, "--budget", str(budget), "--seeds", "0", "1", "--out", "sw", "--", *TINY,
               "--config", probe]
    assert stopped(command) == 143
    out = capsys.readouterr().out
    assert "stopped by SIGTERM during dense, seed 1 (its last.ckpt is saved); no report written" in out
    assert not os.path.exists("sw/val_acc_vs_executed_flops.md")
    assert yaml.safe_load(open("sw/sweep.yaml"))["runs"] == {"sw/runs/dense/seed0": "finished",
                                                             "sw/runs/dense/seed1": "interrupted"}
    events_seed0 = sorted(os.listdir("sw/runs/dense/seed0"))
    with pytest.raises(SystemExit, match=r"already holds runs of this sweep: .*; continue it with --resume"):
        main(command)
    main([*command[:-len(TINY) - 3], "--resume", "--", *TINY, "--config", probe])
    out = capsys.readouterr().out
    assert "dense, seed 0: finished earlier, kept" in out
    assert "--ckpt_path sw/runs/dense/seed1/checkpoints/last.ckpt" in out
    assert sorted(os.listdir("sw/runs/dense/seed0")) == events_seed0  # not run again
    logged = {seed: scalars(f"sw/runs/dense/seed{seed}")[0] for seed in (0, 1)}
    # seed 1 stopped after step 2 and resumed in its folder: each step logged once, to the budget
    assert [e.step for e in logged[1]["flops/total"]] == [0, 1, 2, 3]
    assert logged[1]["flops/total"][-1].value == logged[0]["flops/total"][-1].value >= budget
    rows = table_rows(open("sw/val_acc_vs_executed_flops.md").read().split("\n\n")[2])
    assert rows["dense"]["seeds"] == "2" and rows["dense"]["status"] == "finished"
