"""CUDA backend: run the rewritten graph on an NVIDIA GPU.

``build(graph)`` returns a callable and facts for the report:

    private copy   the GraphModule is deep-copied to the GPU (the user's model stays where it was),
                   weights in the graph's own dtype (bf16 / fp16 models stay in bf16 / fp16)
    torch.compile  Inductor compiles the copy (``compile_mode``; "off" skips it); the example
                   inputs run once here, so a compile failure shows at build time and the backend
                   falls back to the eager copy, with the reason in ``facts["fallbacks"]``
    CUDA graphs    each static input signature is captured once and replayed
                   (:class:`~slimline.backends.cuda.graphs.GraphRunner`); a signature that cannot
                   be captured runs eagerly, and the runner counts both

Autoregressive decoding of the reference GPT and the transformers Llama family goes through
:class:`~slimline.backends.cuda.decoder.StaticDecoder`: fused Triton decode kernels over a static
KV cache, one CUDA graph per token. Without a GPU, :func:`require_cuda` raises a
:class:`~slimline.errors.BackendError` that says what to use instead.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree

from slimline.errors import BackendError
from slimline.ir.graph import Graph

__all__ = ["build", "require_cuda", "COMPILE_MODES", "CudaRunner"]

COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "off")


def require_cuda() -> None:
    if not torch.cuda.is_available():
        raise BackendError("target='cuda' needs an NVIDIA GPU, and torch sees none here",
                           stage="backend", where="target='cuda'",
                           hint="use target='cpu' or target='onnxruntime' on this machine, "
                                "or run on a machine with a GPU and a CUDA build of torch")


class CudaRunner:
    """The backend's callable: inputs moved to the device, then the graph runner (or plain call)."""

    def __init__(self, module: torch.nn.Module, fn: Callable, device: torch.device, graphs: Any):
        self.module = module  # the private copy (kept alive: fn may refer to it)
        self.fn = fn
        self.device = device
        self.graphs = graphs  # GraphRunner or None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.graphs is not None:
            return self.graphs(*args, **kwargs)
        args, kwargs = pytree.tree_map_only(torch.Tensor, lambda t: t.to(self.device), (args, kwargs))
        return self.fn(*args, **kwargs)


def _graph_dtype(module: torch.nn.Module) -> str:
    dtypes = sorted({str(p.dtype) for p in list(module.parameters()) + list(module.buffers()) if p.is_floating_point()})
    return ", ".join(dtypes) or "no floating weights"


def build(graph: Graph, workdir: Any = None, *, compile_mode: str = "default",
          cuda_graphs: bool = True, device: torch.device | str | None = None,
          compiler: Callable | None = None) -> tuple[Callable, dict]:
    """A callable running ``graph`` on the GPU, and facts about it (see the module docstring).

    ``compiler(module, mode) -> callable`` replaces ``torch.compile`` (tests); ``device``
    overrides the GPU (tests on CPU pass "cpu", which also turns CUDA graphs off).
    """
    if compile_mode not in COMPILE_MODES:
        raise BackendError(f"unknown compile mode {compile_mode!r}", stage="backend", where="cuda.build",
                           hint=f"use one of: {', '.join(COMPILE_MODES)}")
    if device is None:
        require_cuda()
        device = torch.device("cuda")
    device = torch.device(device)
    module = copy.deepcopy(graph.module).to(device)  # a private copy: the user's weights stay put
    facts: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
                             "dtype": _graph_dtype(module), "compile_mode": compile_mode, "fallbacks": []}
    fn: Callable = module
    compiled_ok = False
    example = pytree.tree_map_only(torch.Tensor, lambda t: t.to(device), (graph.example_args, graph.example_kwargs))
    if compile_mode != "off":
        compile_fn = compiler or (lambda m, mode: torch.compile(m, mode=mode, dynamic=False))
        try:
            compiled = compile_fn(module, compile_mode)
            with torch.no_grad():
                compiled(*example[0], **example[1])  # compile now: a failure shows here, not at the user's call
            fn, compiled_ok = compiled, True
        except Exception as error:  # noqa: BLE001 - any compiler failure: run the eager copy, and say so
            facts["fallbacks"].append(f"torch.compile failed, eager copy used: {type(error).__name__}: "
                                      f"{str(error).splitlines()[0] if str(error) else ''}"[:300])
    compiled_label = f"torch.compile (inductor, {compile_mode})" if compiled_ok else "torch eager"
    runner_graphs = None
    if cuda_graphs and device.type == "cuda":
        from slimline.backends.cuda.graphs import GraphRunner

        runner_graphs = GraphRunner(fn, device)
        facts["cuda_graph_counts"] = runner_graphs.counts
        facts["cuda_graph_eager_reasons"] = runner_graphs.eager
    facts["runtime"] = (f"{compiled_label}{' + CUDA graphs per input shape' if runner_graphs else ''} on "
                        f"{facts['device']}, {facts['dtype']}"
                        + (f"; fallback: {facts['fallbacks'][0]}" if facts["fallbacks"] else ""))
    return CudaRunner(module, fn, device, runner_graphs), facts
