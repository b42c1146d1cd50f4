"""Per-subnet comparison of supernet runs from their TensorBoard logs."""

import pytest
from torch.utils.tensorboard import SummaryWriter

from lit_eff.supernet.compare import compare, main, subnet_points


def write_run(folder, values, tag="test_acc"):
    with SummaryWriter(str(folder)) as writer:
        for mflops, value in values.items():
            writer.add_scalar(f"supernet/{tag}@{mflops:.3g}", value - 0.5, 10)  # an earlier, worse value
            writer.add_scalar(f"supernet/{tag}@{mflops:.3g}", value, 20)
        writer.add_scalar("train/loss", 1.0, 20)


def test_seeds_averaged_per_subnet(tmp_path, capsys):
    write_run(tmp_path / "a0", {0.463: 0.70, 4.47: 0.90})
    write_run(tmp_path / "a1", {0.463: 0.80, 4.47: 0.92})
    write_run(tmp_path / "b", {0.463: 0.75, 4.47: 0.85})
    assert subnet_points(str(tmp_path / "b")) == pytest.approx({0.463: 0.75, 4.47: 0.85})
    curves = compare([("a", str(tmp_path / "a0")), ("a", str(tmp_path / "a1")), ("b", str(tmp_path / "b"))])
    (f0, mean0, std0, n0), (f1, mean1, _, _) = curves["a"]
    assert (f0, n0, f1) == (0.463, 2, 4.47)
    assert mean0 == pytest.approx(0.75) and std0 == pytest.approx(0.0707, abs=1e-3) and mean1 == pytest.approx(0.91)
    out = tmp_path / "cmp.png"
    main([f"a={tmp_path / 'a0'}", f"a={tmp_path / 'a1'}", f"b={tmp_path / 'b'}", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "| a | 2 | 0.750 ± 0.071 | 0.910 ± 0.014 |" in printed and "| b | 1 | 0.750 | 0.850 |" in printed
    assert out.stat().st_size > 0


def test_a_run_without_subnet_scalars_is_named(tmp_path):
    write_run(tmp_path / "val_only", {0.463: 0.7}, tag="val_acc")
    with pytest.raises(ValueError, match=r"No `supernet/test_acc@<MFLOPs>` scalars in .*val_only"):
        subnet_points(str(tmp_path / "val_only"))
