"""Tensor-parallel models (transformers' ``tp_plan``, DTensor parameters): what teal needs to know of the sharding.

Input sparsity composes with tensor parallelism exactly. A column-sharded linear (q/k/v, gate/up) sees the whole
input on every rank, so every rank computes the same mask; a row-sharded one (o, down) sees its rank's slice and
thresholds it with the same scalar before the all-reduce, which is the mask of the whole input cut into slices. So
a plan is keyed and shaped on the unsharded parameters (``passes.analysis.unsharded``) and one plan file serves any
world size. What must agree across ranks is the calibration: a row-sharded input's histogram on one rank is of its
slice only, so the ranks sum their histograms (``reduce_histograms``) and every rank reads the same thresholds.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from teal_fx.histogram import AbsHistogram


def tp_group(model: nn.Module) -> Optional["torch.distributed.ProcessGroup"]:
    """The process group ``model``'s parameters are sharded over (None: not tensor parallel)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    from torch.distributed.tensor import DTensor

    for p in model.parameters():
        if isinstance(p, DTensor) and p.device_mesh.size() > 1:
            mesh = p.device_mesh
            return mesh.get_group() if mesh.ndim == 1 else mesh.get_group("tp")
    return None


def tp_degree(model: nn.Module) -> int:
    """How many ranks ``model`` is sharded over (1: not tensor parallel)."""
    group = tp_group(model)
    return 1 if group is None else torch.distributed.get_world_size(group)


def whole_shape(model: nn.Module, key: str, shape: tuple[int, int]) -> tuple[int, int]:
    """The unsharded [N, K] of the linear weight ``key`` (a graph may show a rank's shard): a DTensor parameter's
    global shape, else ``shape`` as found."""
    from torch.distributed.tensor import DTensor

    try:
        p = model.get_parameter(key)
    except AttributeError:
        return shape
    return tuple(int(d) for d in p.shape) if isinstance(p, DTensor) else shape


def reduce_histograms(histograms: dict[str, AbsHistogram], group) -> None:
    """Sum each histogram over the ranks of ``group``, in place, in one all-reduce.

    Row-sharded inputs: the sum is the histogram of the whole input. Inputs every rank sees whole: each rank's
    histogram is the same, the sum that one scaled by the world size, so every quantile is unchanged."""
    keys = sorted(histograms)
    if not keys:
        return
    flat = torch.stack([torch.cat([histograms[k].counts, torch.tensor([histograms[k].underflow,
                                                                       histograms[k].overflow], dtype=torch.float64)])
                        for k in keys])
    device = "cuda" if torch.distributed.get_backend(group) == "nccl" else "cpu"
    flat = flat.to(device)
    torch.distributed.all_reduce(flat, group=group)
    flat = flat.cpu()
    for k, row in zip(keys, flat):
        histograms[k] = AbsHistogram(row[:-2].clone(), float(row[-2]), float(row[-1]))
