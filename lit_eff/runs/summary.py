"""Lightning's model summary without its FLOPs column: Lightning fills it only from an
``example_input_array`` (so kit models show "0 Total Flops"), while the kit counts the FLOPs of
every training step (:class:`~lit_eff.callbacks.FlopsMonitor`: ``flops/step``, ``flops/total``)."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import ModelSummary as LightningModelSummary
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_summary import get_human_readable_count


def format_summary(columns: list[tuple[str, list[str]]], total: int, trainable: int, size_mb: float,
                   modes: dict[str, int]) -> str:
    """The summary table: one row per layer, then parameter counts and modes."""
    widths = [max([len(name), *(len(str(v)) for v in values)]) for name, values in columns]
    rule = "-" * (sum(widths) + 3 * (len(columns) + 1))
    lines = [" | ".join(f"{name:<{w}}" for (name, _), w in zip(columns, widths)), rule]
    for row in zip(*(values for _, values in columns)):
        lines.append(" | ".join(f"{str(v):<{w}}" for v, w in zip(row, widths)))
    lines.append(rule)
    totals = [(get_human_readable_count(trainable), "Trainable params"),
              (get_human_readable_count(total - trainable), "Non-trainable params"),
              (get_human_readable_count(total), "Total params"),
              (f"{size_mb:,.3f}", "Total estimated model params size (MB)"),
              (modes.get("train", 0), "Modules in train mode"), (modes.get("eval", 0), "Modules in eval mode")]
    lines += [f"{str(value):<10}{label}" for value, label in totals]
    return "\n".join(lines)


class ModelSummary(LightningModelSummary):
    """:class:`lightning.pytorch.callbacks.ModelSummary` without the FLOPs column and total (see
    the module docstring). ``lit-eff`` uses it in place of Lightning's default summary."""

    @staticmethod
    def summarize(summary_data: list[tuple[str, list[str]]], total_parameters: int, trainable_parameters: int,
                  model_size: float, total_training_modes: dict[str, int], total_flops: int,
                  **summarize_kwargs: Any) -> None:
        columns = [(name, values) for name, values in summary_data if name != "FLOPs"]
        rank_zero_info("\n" + format_summary(columns, total_parameters, trainable_parameters, model_size,
                                             total_training_modes))
