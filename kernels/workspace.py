"""Per-device scratch buffers for kernels that keep state between launches (split-K partials, arrival counters).

Allocated once and grown only outside CUDA graph capture: a first allocation during a cudagraph-tree warm-up would
land in the graph's private pool, so the teal backend reserves each kernel's scratch at compile time. Launches on one
stream are ordered, so they can share a buffer (not launches on parallel streams). Counters are zeroed once and
every launch leaves them zero.
"""
from __future__ import annotations

import torch
from torch import Tensor


class Workspace:
    """Named buffers per device: ``dtypes`` gives each name's dtype, ``min_sizes`` its smallest allocation."""

    def __init__(self, owner: str, dtypes: dict, min_sizes: dict) -> None:
        self.owner = owner  # for the error message: which kernel's reserve function to call
        self.dtypes = dtypes
        self.min_sizes = min_sizes
        self.bufs: dict = {}

    def reserve(self, device: torch.device, **sizes: int) -> None:
        for name, size in sizes.items():
            buf = self.bufs.get((device, name))
            if buf is None or buf.numel() < size:
                self.bufs[(device, name)] = torch.zeros(max(size, self.min_sizes[name]), dtype=self.dtypes[name],
                                                        device=device)

    def get(self, device: torch.device, **sizes: int) -> list[Tensor]:
        if any((device, n) not in self.bufs or self.bufs[(device, n)].numel() < size for n, size in sizes.items()):
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                raise RuntimeError(f"{self.owner}: reserve its workspace before capturing a CUDA graph")
            self.reserve(device, **sizes)
        return [self.bufs[(device, n)] for n in sizes]
