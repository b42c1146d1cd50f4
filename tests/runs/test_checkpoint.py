"""A `lit-eff fit` subprocess that receives SIGTERM or SIGINT mid-step, or crashes, leaves a
last.ckpt; resuming from it with --ckpt_path ends with the weights of the uninterrupted run."""

import glob
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from lit_eff.runs import ResumableCheckpoint

ROOT = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", ".."))
BASE = os.path.join(ROOT, "configs", "vit_digits.yaml")
TINY = ["--model.init_args.model_kwargs",
        "{img_size: 8, patch_size: 2, embed_dim: 32, depth: 2, num_heads: 2, mlp_ratio: 2.0, global_pool: avg}",
        "--data.init_args.batch_size", "128",  # 9 steps per epoch: the run crosses an epoch boundary
        "--trainer.max_steps", "14", "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1",
        "--trainer.check_val_every_n_epoch", "1", "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
STEP = 5  # the signal arrives during optimizer step 5 (0-based), so last.ckpt holds global_step 6


def fragment(path, class_path, **init_args):
    with open(path, "w") as f:
        yaml.safe_dump({"trainer": {"callbacks+": [{"class_path": class_path, "init_args": init_args}]}}, f)
    return str(path)


def lit_eff_fit(*args, cwd):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "lit_eff.cli", "fit", "--config", BASE, *TINY, *args], cwd=cwd,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc, timeout=240):
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def checkpoint(run_dir):
    return torch.load(os.path.join(run_dir, "checkpoints", "last.ckpt"), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reference")
    code, out = finish(lit_eff_fit(cwd=folder))
    assert code == 0, out
    ckpt = checkpoint(folder / "lightning_logs" / "version_0")
    assert ckpt["global_step"] == 14
    return ckpt


def assert_same_run(ckpt, reference):
    assert ckpt["global_step"] == reference["global_step"]
    assert ckpt["state_dict"].keys() == reference["state_dict"].keys()
    for key, value in reference["state_dict"].items():
        assert torch.allclose(ckpt["state_dict"][key], value, rtol=0, atol=1e-6), key
    flops = lambda c: next(v for k, v in c["callbacks"].items() if k.startswith("FlopsMonitor"))  # noqa: E731
    assert flops(ckpt) == flops(reference)


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 1)])
def test_signal_mid_step_saves_and_the_resumed_run_equals_the_uninterrupted_one(signum, status, reference, tmp_path):
    marker = tmp_path / "at_step"
    pause = fragment(tmp_path / "pause.yaml", "tests.runs.probes.PauseAt", step=STEP, marker=str(marker))
    proc = lit_eff_fit("--config", pause, cwd=tmp_path)
    deadline = time.monotonic() + 120
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), finish(proc)[1]
    proc.send_signal(signum)
    code, out = finish(proc)
    assert code == status, out
    run = tmp_path / "lightning_logs" / "version_0"
    assert f"saved {run / 'checkpoints' / 'last.ckpt'} at step {STEP + 1}" in out.replace("\n", " ")
    stopped = checkpoint(run)
    assert stopped["global_step"] == STEP + 1
    assert "test/acc" not in out  # an interrupted run is not tested
    code, out = finish(lit_eff_fit("--ckpt_path", str(run / "checkpoints" / "last.ckpt"), cwd=tmp_path))
    assert code == 0, out
    assert_same_run(checkpoint(tmp_path / "lightning_logs" / "version_1"), reference)


def test_a_crash_keeps_the_periodic_checkpoint(reference, tmp_path):
    crash = tmp_path / "crash.yaml"
    crash.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "lit_eff.callbacks.FlopsMonitor"},
        {"class_path": "lit_eff.runs.ResumableCheckpoint", "init_args": {"every_n_train_steps": 3}},
        {"class_path": "tests.runs.probes.CrashAt", "init_args": {"step": 8}}]}}))
    code, out = finish(lit_eff_fit("--config", str(crash), cwd=tmp_path))
    assert code != 0 and "crash at step 8" in out
    run = tmp_path / "lightning_logs" / "version_0"
    assert checkpoint(run)["global_step"] == 6  # the last multiple of every_n_train_steps=3 before the crash
    code, out = finish(lit_eff_fit("--ckpt_path", str(run / "checkpoints" / "last.ckpt"), cwd=tmp_path))
    assert code == 0, out
    assert_same_run(checkpoint(tmp_path / "lightning_logs" / "version_1"), reference)


def test_every_n_train_steps_is_checked():
    with pytest.raises(ValueError, match=r"Expected `every_n_train_steps` to be an integer >= 1 or None, got "
                                         r"every_n_train_steps=0"):
        ResumableCheckpoint(every_n_train_steps=0)
    with pytest.raises(ValueError, match=r"Expected `save_last` to be true"):
        ResumableCheckpoint(save_last=False)
