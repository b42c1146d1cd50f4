import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule

from lit_eff.callbacks import FlopsMonitor
from lit_eff.flops import FlopTracker, clear_density, count_flops, flop_counter, get_density, set_density
from lit_eff.models import GPT, create_timm_model
from tests.helpers import make_trainer, seeded, tiny_gpt, tiny_vit, digits, text


def reference_step_flops(model, x, loss_fn):
    counter = flop_counter()
    with counter:
        loss_fn(model(x)).backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("name, shape, kwargs", [
    ("vit_tiny_patch16_224", (8, 1, 8, 8), dict(img_size=8, patch_size=2, embed_dim=32, depth=2, num_heads=2,
                                                in_chans=1, num_classes=10, global_pool="avg")),
    ("resnet10t", (4, 3, 32, 32), dict(num_classes=10)),
])
def test_tracker_matches_flop_counter_on_timm_models(name, shape, kwargs):
    model = create_timm_model(name, **kwargs)
    x = torch.randn(shape)
    tracker = FlopTracker()
    with tracker:
        loss = model(x).sum()
    loss.backward()
    assert tracker.executed == reference_step_flops(model, x, lambda y: y.sum()) > 0


def test_tracker_counts_attention_and_frozen_inputs():
    gpt = GPT(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16)
    idx = torch.randint(0, 64, (2, 16))
    with flop_counter() as counter:
        gpt(idx).sum().backward()
    assert counter.flop_counts["Global"], "reference counter saw no FLOPs"
    tracker = FlopTracker()
    with tracker:
        loss = gpt(idx).sum()
    loss.backward()
    assert tracker.executed == counter.get_total_flops()
    # no backward is counted without autograd
    tracker.reset()
    with torch.no_grad(), tracker:
        gpt(idx)
    assert tracker.executed == tracker.forward_executed > 0
    # attention contributes (the CPU fused kernel is missing from PyTorch's own table)
    assert any("flash_attention_for_cpu" in str(op) for op in counter.flop_counts["Global"]) or \
        any("bmm" in str(op) for op in counter.flop_counts["Global"])


def test_count_flops_on_meta_device_costs_nothing_and_matches():
    with torch.device("meta"):
        model = GPT(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32)
        idx = torch.zeros(4, 32, dtype=torch.long)
    meta = count_flops(lambda: model(idx))
    real_model = GPT(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32)
    real = reference_step_flops(real_model, torch.zeros(4, 32, dtype=torch.long), lambda y: y.sum())
    assert meta.total == real
    assert meta.backward > meta.forward > 0


def test_tracker_counts_mixed_dtype_calls_under_cpu_autocast():
    """Under bf16 autocast a matmul may take a float32 and a bfloat16 operand (autocast casts
    them when it dispatches); counting must not fail on the mixed dtypes."""
    a = torch.randn(3, 4, 8, requires_grad=True)
    b = torch.randn(3, 8, 5, dtype=torch.bfloat16, requires_grad=True)
    reference = flop_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16), reference:
        torch.bmm(a, b).float().sum().backward()
    tracker = FlopTracker()
    with torch.autocast("cpu", dtype=torch.bfloat16), tracker:
        out = torch.bmm(a, b)
    assert out.dtype == torch.bfloat16
    assert tracker.executed == reference.get_total_flops() == 3 * 2 * 4 * 8 * 5 * 3


def test_density_scales_effective_flops_of_that_module_only():
    layer, other = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)
    x = torch.randn(5, 8)
    tracker = FlopTracker()
    with tracker:
        other(layer(x))
    dense = tracker.executed
    set_density(layer, 0.5)
    tracker.reset()
    with tracker:
        other(layer(x))
    layer_flops = count_flops(lambda: layer(x)).total
    assert tracker.executed == dense
    assert tracker.effective == pytest.approx(dense - 0.5 * layer_flops)
    assert get_density(layer) == 0.5
    clear_density(layer)
    tracker.reset()
    with tracker:
        other(layer(x))
    assert tracker.effective == dense
    with pytest.raises(ValueError, match=r"Expected `density` in \[0, 1\], got density=1.5"):
        set_density(layer, 1.5)


class ReferenceCounter(Callback):
    """Counts each training step with FlopCounterMode, next to FlopsMonitor's own count."""

    def __init__(self, monitor: FlopsMonitor):
        self.monitor, self.reference, self.monitored = monitor, [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.counter = flop_counter()
        self.counter.__enter__()
        self.before = self.monitor.total_executed

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.counter.__exit__(None, None, None)
        self.monitor.end_batch(trainer, pl_module)
        self.reference.append(self.counter.get_total_flops())
        self.monitored.append(self.monitor.total_executed - self.before)


class VariableLengthLM(LightningModule):
    """A GPT whose batches change length every step (8, 16, 24 tokens, cyclically)."""

    def __init__(self):
        super().__init__()
        self.model = GPT(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        logits = self.model(x)
        return F.cross_entropy(logits.reshape(-1, 64), x.reshape(-1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        data = torch.randint(0, 64, (24, 32))
        calls = iter(range(10**6))

        def collate(rows):
            length = 8 + 8 * (next(calls) % 3)
            return (torch.stack([r[0] for r in rows])[:, :length],)

        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=4, collate_fn=collate)


class DataDependentLM(VariableLengthLM):
    """Slices the sequence inside the step by a data-dependent rule: its FLOPs change with no
    change of batch shape, so it declares its steps dynamic."""

    def training_step(self, batch, batch_idx):
        (x,) = batch
        x = x[:, : 8 + 8 * (int(x[0, 0]) % 3)]
        logits = self.model(x)
        return F.cross_entropy(logits.reshape(-1, 64), x.reshape(-1))

    def flops_key(self):
        from lit_eff.callbacks.flops_monitor import DYNAMIC

        return DYNAMIC

    def train_dataloader(self):
        data = torch.randint(0, 64, (24, 32))
        data[:, 0] = torch.arange(24) // 4
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=4)


@pytest.mark.parametrize("make", ["vit", "gpt", "variable", "dynamic"])
def test_monitor_matches_flop_counter_every_step(make):
    seeded()
    model, data = {"vit": (tiny_vit, digits), "gpt": (tiny_gpt, text), "variable": (VariableLengthLM, None),
                   "dynamic": (DataDependentLM, None)}[make]
    monitor = FlopsMonitor()
    probe = ReferenceCounter(monitor)
    trainer = make_trainer(max_steps=6, callbacks=[monitor, probe], limit_val_batches=0)
    trainer.fit(model(), datamodule=data() if data else None)
    assert len(probe.reference) == 6
    for ours, ref in zip(probe.monitored, probe.reference):
        assert ours == pytest.approx(ref, rel=0.01)
    if make in ("variable", "dynamic"):
        assert len(set(probe.reference)) == 3, "the step shapes did not vary"
    # a signature is counted by tracing once, then its count is reused
    assert monitor.counted_batches == {"vit": 1, "gpt": 1, "variable": 3, "dynamic": 6}[make]
    assert monitor.total_executed == pytest.approx(sum(probe.reference), rel=0.01)
    assert monitor.total_effective == monitor.total_executed
