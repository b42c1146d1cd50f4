"""FSDP2 for the kit's LightningModules under Lightning's ``ModelParallelStrategy``.

Lightning's ``ModelParallelStrategy`` (FSDP2, ``torch.distributed.fsdp.fully_shard``; it also
runs on CPU with gloo) asks the LightningModule to shard itself in ``configure_model``. The
kit's modules call :func:`shard_model`: every transformer block (or ResNet stage) becomes one
FSDP unit, then the whole model, over the strategy's data-parallel mesh.

.. code-block:: yaml

    trainer:
      strategy:
        class_path: lightning.pytorch.strategies.ModelParallelStrategy
        init_args: {data_parallel_size: 2, tensor_parallel_size: 1}
"""

from __future__ import annotations

from lightning.pytorch import LightningModule
from torch import nn

__all__ = ["shard_model", "shard_units"]

_CONTAINERS = ("blocks", "stages", "layers")


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules that become FSDP units: the entries of ``blocks``/``stages``/``layers``."""
    for name in _CONTAINERS:
        container = getattr(model, name, None)
        if isinstance(container, (nn.Sequential, nn.ModuleList)) and len(container):
            return list(container)
    return []


def shard_model(module: LightningModule, model: nn.Module) -> None:
    """Apply FSDP2 to ``model`` (a submodule of ``module``) when ``module`` runs under
    ``ModelParallelStrategy``; do nothing otherwise (or when it is already sharded)."""
    mesh = getattr(module, "device_mesh", None)
    if mesh is None:
        return
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(model, FSDPModule):
        return
    names = mesh.mesh_dim_names or ()
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
        raise ValueError(f"{type(module).__name__} supports data-parallel sharding only (FSDP2); got "
                         f"tensor_parallel_size={mesh['tensor_parallel'].size()}: set tensor_parallel_size=1")
    data_mesh = mesh["data_parallel"] if "data_parallel" in names else mesh
    for unit in shard_units(model):
        fully_shard(unit, mesh=data_mesh)
    fully_shard(model, mesh=data_mesh)
