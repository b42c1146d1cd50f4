"""Every shipped YAML file parses through the CLI with the base it is meant for: a typo in a
class path, an argument name or a value type fails here, not in a user's run."""

import glob
import os

import pytest
import yaml

from lit_eff.cli import LitEffCLI

CONFIGS = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "configs"))


def _base_of(fragment: str) -> str:
    name = os.path.basename(fragment)
    if "supernet_samplers" in fragment:
        return "supernet_vit_digits.yaml"
    with open(fragment) as f:
        text = f.read()
    if name.startswith("gpt_") or "TokenSkip" in text or "recursion:" in text:  # language-model fragments
        return "gpt_text.yaml"
    return "vit_digits.yaml"


BASES = sorted(glob.glob(os.path.join(CONFIGS, "*.yaml")))
FRAGMENTS = sorted(glob.glob(os.path.join(CONFIGS, "techniques", "*.yaml"))
                   + glob.glob(os.path.join(CONFIGS, "recipes", "*", "*.yaml")))


def _parse(*files: str) -> dict:
    args = [arg for path in files for arg in ("--config", path)]
    cli = LitEffCLI(args=args, run=False)  # parses, resolves class paths and instantiates
    return cli.config


@pytest.mark.parametrize("base", BASES, ids=os.path.basename)
def test_base_config_parses(base):
    if base.endswith("vit_cifar10.yaml"):  # needs CIFAR-10 on disk: says so before any work
        with pytest.raises(ValueError, match=r"no 'cifar-10-batches-py' folder in data_dir='data'.*download: true"):
            _parse(base)
        return
    config = _parse(base)
    assert config["model"]["class_path"].startswith("lit_eff.")


@pytest.mark.parametrize("fragment", FRAGMENTS, ids=lambda p: os.path.relpath(p, CONFIGS))
def test_fragment_composes_with_its_base(fragment):
    base = os.path.join(CONFIGS, _base_of(fragment))
    config = _parse(base, fragment)
    with open(fragment) as f:
        added = yaml.safe_load(f)
    for callback in (added.get("trainer") or {}).get("callbacks+", []):
        # appended, not replacing the base's callbacks (FlopsMonitor stays)
        paths = [c["class_path"] for c in config["trainer"]["callbacks"]]
        assert callback["class_path"] in paths and "lit_eff.callbacks.FlopsMonitor" in paths


@pytest.mark.parametrize("base", BASES, ids=os.path.basename)
def test_base_config_writes_last_ckpt_periodically_and_on_interrupt(base):
    with open(base) as f:
        callbacks = yaml.safe_load(f)["trainer"]["callbacks"]
    checkpoints = [cb for cb in callbacks if cb["class_path"] == "lit_eff.runs.ResumableCheckpoint"]
    assert len(checkpoints) == 1, "every base config keeps a resumable last.ckpt"
    assert 1 <= checkpoints[0]["init_args"]["every_n_train_steps"] <= 500
