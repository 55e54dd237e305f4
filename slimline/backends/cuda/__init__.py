"""CUDA backend: run the rewritten graph on an NVIDIA GPU.

This first version moves a private copy of the graph's weights to the GPU and runs the graph in
torch; slimline's Triton kernels and CUDA graphs arrive with the CUDA-backend issue. Without a
GPU it raises a :class:`~slimline.errors.BackendError` that says what to use instead.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree

from slimline.errors import BackendError
from slimline.ir.graph import Graph

__all__ = ["build", "require_cuda"]


def require_cuda() -> None:
    if not torch.cuda.is_available():
        raise BackendError("target='cuda' needs an NVIDIA GPU, and torch sees none here",
                           stage="backend", where="target='cuda'",
                           hint="use target='cpu' or target='onnxruntime' on this machine, "
                                "or run on a machine with a GPU and a CUDA build of torch")


class _OnDevice:
    def __init__(self, module: torch.nn.Module, device: torch.device):
        self.module = module
        self.device = device

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        args, kwargs = pytree.tree_map_only(torch.Tensor, lambda t: t.to(self.device), (args, kwargs))
        return self.module(*args, **kwargs)


def build(graph: Graph, workdir: Any = None) -> tuple[Callable, dict]:
    require_cuda()
    device = torch.device("cuda")
    module = copy.deepcopy(graph.module).to(device)  # a private copy: the user's weights stay put
    return _OnDevice(module, device), {"runtime": f"torch on {torch.cuda.get_device_name(device)}"}
