"""Run a callable as CUDA graphs, one per static input signature, with an eager fallback.

A captured graph replays every launch of a call with no host work between them: at batch 1 a
decoder step is dozens of small kernels, and their launch gaps cost more than their arithmetic.
A graph fixes its inputs' addresses and shapes, so :class:`GraphRunner` keeps static input
buffers per *signature* (each tensor's shape, dtype, device; every other argument's value):
a call copies its tensors into the buffers, replays, and returns clones of the outputs (the next
replay overwrites the buffers). A signature seen for the first time runs eagerly ``warmup``
times, then is captured. A capture that fails (an op that synchronises, a data-dependent shape)
marks the signature eager for good and records why; calls keep working.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.utils._pytree as pytree

__all__ = ["GraphRunner", "signature"]


def signature(args: tuple, kwargs: dict) -> tuple:
    """Hashable key: structure, plus (shape, dtype, device) of tensors and the value of the rest."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    key = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            key.append(("tensor", tuple(leaf.shape), leaf.dtype, str(leaf.device), leaf.requires_grad))
        else:
            try:
                hash(leaf)
                key.append(("value", leaf))
            except TypeError:
                key.append(("object", id(leaf)))
    return (str(spec), tuple(key))


class _Captured:
    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: list, outputs: Any):
        self.graph, self.inputs, self.outputs = graph, inputs, outputs


class GraphRunner:
    """``runner(*args, **kwargs)`` = ``fn(*args, **kwargs)``, replayed as a CUDA graph per signature."""

    def __init__(self, fn: Callable, device: torch.device, *, warmup: int = 2, max_graphs: int = 8):
        self.fn, self.device, self.warmup, self.max_graphs = fn, device, warmup, max_graphs
        self.graphs: dict[tuple, _Captured] = {}
        self.eager: dict[tuple, str] = {}  # signature -> why it runs eagerly
        self.counts = {"replays": 0, "eager_calls": 0, "captures": 0}

    def _to_device(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return pytree.tree_map_only(torch.Tensor, lambda t: t.to(self.device), (args, kwargs))

    def _capture(self, args: tuple, kwargs: dict) -> _Captured:
        static_args, static_kwargs = pytree.tree_map_only(torch.Tensor, lambda t: t.clone(), (args, kwargs))
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(self.warmup):
                self.fn(*static_args, **static_kwargs)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = self.fn(*static_args, **static_kwargs)
        inputs = [leaf for leaf in pytree.tree_leaves((static_args, static_kwargs)) if isinstance(leaf, torch.Tensor)]
        self.counts["captures"] += 1
        return _Captured(graph, inputs, outputs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        args, kwargs = self._to_device(args, kwargs)
        key = signature(args, kwargs)
        captured = self.graphs.get(key)
        if captured is None and key not in self.eager:
            if len(self.graphs) >= self.max_graphs:
                self.eager[key] = f"more than {self.max_graphs} input signatures"
            else:
                try:
                    captured = self.graphs[key] = self._capture(args, kwargs)
                except Exception as error:  # keep running, eagerly, and say why
                    self.eager[key] = f"{type(error).__name__}: {error}"[:300]
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
        if captured is None:
            self.counts["eager_calls"] += 1
            return self.fn(*args, **kwargs)
        for buffer, value in zip(captured.inputs, (leaf for leaf in pytree.tree_leaves((args, kwargs))
                                                   if isinstance(leaf, torch.Tensor))):
            buffer.copy_(value)
        captured.graph.replay()
        self.counts["replays"] += 1
        return pytree.tree_map_only(torch.Tensor, lambda t: t.clone(), captured.outputs)
