"""FFT convolution: long 1-D ``conv1d`` → ``rfft`` · filter spectrum → ``irfft``.

Exact (the same function up to float rounding; FlashFFTConv, Fu et al. 2023, and the Hyena
paper use this form). Runs after ``fuse_attention`` and before ``dead_code``, which drops the
time-domain weights the rewrite leaves unread. It needs nothing from earlier passes.

Shape letters: B batch, Ci/Co input/output channels, G groups, Cig = Ci/G and Cog = Co/G
channels per group, T input length, K kernel length, N the FFT size, F = N/2 + 1 frequencies,
To output length.

The rule, as pattern + check + replacement::

    pattern   y_BCoTo = conv1d(x_BCiT, w_CoCigK, bias, stride, padding, dilation, groups)
                        [..., start:stop:step]           # optional: Hyena's causal slice
              (aten.conv1d, aten.conv1d.padding "same"/"valid", or a 1-D aten.convolution)
    check     K >= Config.min_kernel (or, measured on this machine, FFT faster than direct);
              dilation 1; not transposed; 3-D input; static K; T static or bounded; kept
              outputs inside the full convolution (padding <= K - 1); a float dtype
    replace   X_BCiF = rfft(x, N)                                        # complex
              Y_BCoF = X · W_CoF              depthwise (Cig = Cog = 1)
                       [Xr Xi] · [[Wr Wi], [-Wi Wr]] per group and frequency      otherwise
              y      = irfft(Y, N)[..., start':stop':step'] (+ bias)

Semantics, in full-convolution coordinates: ``conv1d`` is a cross-correlation, so with the
filter reversed, ``v[k] = w[K-1-k]``, the *full* convolution ``full = x ∗ v`` has length
``T + K - 1`` and ``conv1d(x, w, padding=p, stride=s)[t] = full[t·s + K - 1 - p]``. Causal
(``padding=K-1`` then ``[..., :T]``), same and valid padding are three windows of ``full``;
a slice after the convolution is folded into the window. A circular convolution of size N
equals ``full`` at every kept index i when ``N >= T + K - 1 - first`` and ``N > last`` (no
wrap-around reaches a kept index), so "valid" needs only ``N >= T``. N is then rounded up to a
power of two by default (``Config.fft_size``): onnxruntime 1.32's ``DFT`` on other lengths is
3-8× slower and only ~1e-4 accurate in fp32 (powers of two: ~5e-7), and a graph optimized for
'cpu' may be exported later. On CPU alone a 2·3·5-smooth N is up to 2× faster when T + K - 1
lies just above a power of two (T=8192, K=64: N=8640 0.77 ms, N=16384 1.6 ms).

Filters: a constant weight (``get_attr``) gets its spectrum computed once, here, in float64,
and registered with :meth:`Graph.add_parameter` — a complex buffer (C, F) for depthwise, a real
block matrix (G, F, 2·Cig, 2·Cog) otherwise. A computed filter (Hyena's implicit MLP filter) is
transformed in the graph. float16/bfloat16 convolutions are computed in float32 and cast back
(CPU FFTs have no half precision).

ONNX (torch 2.13 dynamo exporter, onnxruntime 1.32): ``rfft``/``irfft`` become ONNX ``DFT``
(opset ≥ 17) and complex values a trailing dimension of 2; complex *constants* and the complex
product export, but complex ``unsqueeze``/``einsum``/sums do not, which is why the grouped
product is written in real arithmetic (``view_as_real`` → one batched ``matmul``).

Direct or FFT, per site: with ``tune`` 'lite'/'max' in ``context.extra`` and target 'cpu'
(``Config.measure``), both are timed at the captured shape and the faster kept; otherwise the
kernel-length threshold decides (deterministic): ``min_kernel`` for cpu and cuda (the CUDA
crossover awaits ``benchmarks/fft_conv_gpu.py``), ``min_kernel_onnxruntime`` for onnxruntime,
whose ``DFT`` kernel is 10-40× slower than MKL's FFT (T=K=8192, C=16, one thread: ~70 ms in
ORT, 1.9 ms in torch; ORT's direct Conv 2.2 s). Timing takes the fastest of interleaved runs. Stats: ``conv_sites``, ``rewritten``,
``kept_short``, ``kept_direct_faster``, ``refused``, ``measured``, and per measured site
``direct_ms:<path>`` / ``fft_ms:<path>``. FLOPs after the rewrite add ``2.5·N·log2 N`` per
real transform of length N (``slimline.ir.cost`` does not count FFT nodes).
"""

from __future__ import annotations

import math
import operator
import time
from dataclasses import dataclass
from typing import Any, Callable

import sympy
import torch
import torch.fx as fx
from torch._dispatch.python import enable_python_dispatcher
from torch._guards import detect_fake_mode

from slimline.errors import ConfigError, InputError
from slimline.ir.graph import Graph, module_path, stamp
from slimline.passes.base import LayerDecision, PassContext, PassResult, Reason, tunable

__all__ = ["NAME", "EXACT", "TARGETS", "Config", "run", "FFTPlan", "ConvSite", "match_conv",
           "plan_site", "fft_conv1d", "fft_size", "filter_spectrum"]

NAME = "fft_conv"
EXACT = True
TARGETS = {"cpu", "cuda", "onnxruntime"}

aten = torch.ops.aten

CONV1D = "conv1d"
_CONVS = {aten.conv1d.default, aten.conv1d.padding, aten.convolution.default}
_ASSERTS = {aten._assert_tensor_metadata.default}
_LOW_PRECISION = (torch.float16, torch.bfloat16)
_FLOATS = (torch.float32, torch.float64) + _LOW_PRECISION
_MEASURED_TUNE_MODES = ("lite", "max")


@dataclass
class Config:
    min_kernel: int = tunable(32, (8, 16, 32, 64, 128, 256, 512),
                              "rewrite convolutions whose kernel is at least this long, when "
                              "nothing is measured (this CPU: FFT wins from K=32 at T=8192 and "
                              "from K=8 at T=1024, benchmarks/results/fft_conv_cpu.json)")
    min_kernel_onnxruntime: int = tunable(1024, (256, 512, 1024, 2048),
                                          "the same for target 'onnxruntime', whose DFT is far "
                                          "slower than MKL's FFT: measured with 1 thread, FFT "
                                          "wins from K=256 at T=1024 and from K=1024 at T=8192")
    measure: bool = tunable(True, (True, False),
                            "target 'cpu' with tune 'lite'/'max': time direct and FFT at the "
                            "captured shape and keep the faster (kernels >= min_measured_kernel)")
    min_measured_kernel: int = tunable(8, (4, 8, 16),
                                       "shorter kernels are never measured: direct wins")
    measure_repeats: int = tunable(5, (3, 5, 9), "timed runs of each form, interleaved; the fastest counts")
    fft_size: str = tunable("pow2", ("pow2", "smooth"),
                            "round N up to a power of two, or to a 2·3·5-smooth length (cpu/cuda "
                            "only; onnxruntime always gets a power of two)")


# ---------------------------------------------------------------------------------------------
# sizes


def fft_size(length: int, rule: str = "pow2") -> int:
    """The FFT size for a circular convolution that must hold ``length`` samples."""
    if length < 1:
        raise InputError(f"FFT length must be positive, got {length}", stage="fft_conv",
                         where="fft_size", hint="pass the number of samples the transform must hold")
    power = 1 << (length - 1).bit_length()
    if rule == "pow2":
        return power
    if rule != "smooth":
        raise ConfigError(f"unknown fft_size rule {rule!r}", stage="fft_conv",
                          where="Config.fft_size", hint="use 'pow2' or 'smooth'")
    best = power
    fives = 1
    while fives < best:
        threes = fives
        while threes < best:
            size = threes
            while size < length:
                size *= 2
            best = min(best, size)
            threes *= 3
        fives *= 5
    return best


def _upper_bound(size: Any) -> int | None:
    """The largest value a (symbolic) size can take, or None when unbounded."""
    if isinstance(size, int):
        return size
    try:
        bound = size.node.shape_env.bound_sympy(size.node.expr).upper
    except Exception:  # not a SymInt we can reason about
        return None
    return int(bound) if isinstance(bound, sympy.Integer) else None


def _example_value(size: Any) -> int:
    """The value a (symbolic) size had in the example inputs."""
    if isinstance(size, int):
        return size
    hint = getattr(size.node, "hint", None)
    return int(hint) if hint is not None else int(_upper_bound(size) or 1)


# ---------------------------------------------------------------------------------------------
# the match


@dataclass
class ConvSite:
    """A 1-D convolution, and the slice after it when there is one (folded into the rewrite)."""

    conv: fx.Node
    output: fx.Node                 # the last node the rewrite replaces: the slice, or conv
    input: fx.Node                  # x_BCiT
    weight: fx.Node                 # w_CoCigK
    bias: fx.Node | None
    stride: int
    dilation: int
    groups: int
    padding: int | str              # left padding, or "same" / "valid"
    transposed: bool
    slice_start: Any = 0            # of the conv output, before the slice folds in
    slice_end: Any = None
    slice_step: int = 1


@dataclass(frozen=True)
class FFTPlan:
    """What the replacement computes: N, the kept window of the full convolution, groups."""

    n: int                          # FFT size N
    start: int                      # first kept index of the full convolution
    step: int                       # distance between kept indices
    count: int | None               # kept outputs; None: T of them (a dynamic T, step 1)
    groups: int
    in_per_group: int               # Cig
    out_per_group: int              # Cog
    kernel: int                     # K
    dtype: torch.dtype              # the convolution's dtype

    @property
    def depthwise(self) -> bool:
        return self.in_per_group == 1 and self.out_per_group == 1

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.float32 if self.dtype in _LOW_PRECISION else self.dtype

    @property
    def frequencies(self) -> int:
        return self.n // 2 + 1


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _users(node: fx.Node) -> list[fx.Node]:
    return [user for user in node.users if user.target not in _ASSERTS]


def _bind(node: fx.Node) -> dict[str, Any]:
    """The node's arguments by schema name, defaults filled in."""
    values = {}
    for index, argument in enumerate(node.target._schema.arguments):
        if index < len(node.args):
            values[argument.name] = node.args[index]
        elif argument.name in node.kwargs:
            values[argument.name] = node.kwargs[argument.name]
        else:
            values[argument.name] = argument.default_value if argument.has_default_value() else None
    return values


def _single(value: Any) -> Any:
    """``[3]`` / ``(3,)`` / ``3`` → 3; a longer list stays a list (not 1-D)."""
    if isinstance(value, (list, tuple)):
        return value[0] if len(value) == 1 else list(value)
    return value


def match_conv(node: fx.Node) -> ConvSite | Reason:
    """The pattern: a 1-D convolution node, with the slice that follows it folded in."""
    if node.op != "call_function" or node.target not in _CONVS:
        return Reason("not a convolution")
    arguments = _bind(node)
    weight_value = _val(arguments["weight"])
    if weight_value is None or weight_value.dim() != 3:
        return Reason("not a 1-D convolution")
    site = ConvSite(conv=node, output=node, input=arguments["input"], weight=arguments["weight"],
                    bias=arguments["bias"], stride=_single(arguments["stride"]),
                    dilation=_single(arguments["dilation"]), groups=arguments["groups"],
                    padding=_single(arguments["padding"]),
                    transposed=bool(arguments.get("transposed", False)))
    users = _users(node)
    if len(users) == 1 and users[0].target == aten.slice.Tensor:
        sliced = _bind(users[0])
        if sliced["dim"] in (2, -1) and isinstance(sliced["step"], int) and sliced["step"] >= 1:
            site.output = users[0]
            site.slice_start = sliced["start"] if sliced["start"] is not None else 0
            site.slice_end = sliced["end"]
            site.slice_step = sliced["step"]
    return site


# ---------------------------------------------------------------------------------------------
# the check


def _window(padding: int | str, stride: int, kernel: int, length: Any,
            kept_slice: tuple[Any, Any, int] = (0, None, 1),
            kept_length: Any = None) -> tuple[int, int, int | None] | Reason:
    """(first full-convolution index, step, count) of the outputs kept; count None: T of them.

    ``kept_slice`` is the (start, end, step) of a slice after the convolution, ``kept_length``
    the length of what is kept (needed only when T is dynamic).
    """
    if padding == "valid":
        left = 0
    elif padding == "same":
        left = (kernel - 1) // 2  # torch puts the odd extra pad on the right
    elif isinstance(padding, int):
        left = padding
    else:
        return Reason(f"padding {padding!r} not supported")
    if padding == "same":
        outputs = length
    else:
        outputs = (length + 2 * left - kernel) // stride + 1  # conv1d's own length
    start = kernel - 1 - left  # conv1d output t is full[t·stride + K - 1 - left]
    slice_start, slice_end, slice_step = kept_slice
    if isinstance(outputs, int):
        if outputs < 1:
            return Reason(f"no outputs: length {length} + 2·padding < kernel {kernel}")
        if not isinstance(slice_start, int) or not (slice_end is None or isinstance(slice_end, int)):
            return Reason("slice bounds are not static")
        first, stop, step = slice(slice_start, slice_end, slice_step).indices(outputs)
        count = len(range(first, stop, step))
        if count == 0:
            return Reason("the convolution keeps no outputs")
        return start + stride * first, stride * step, count
    # dynamic T: the kept window must be T long (Hyena's [..., :T], or "same"), step 1
    if stride != 1 or slice_step != 1 or slice_start != 0 or kept_length is None or \
            sympy.simplify(_sym(kept_length) - _sym(length)) != 0:
        return Reason("dynamic length: only windows as long as the input (causal, same) are "
                      "supported")
    return start, 1, None


def _sym(size: Any) -> sympy.Expr:
    return size.node.expr if isinstance(size, torch.SymInt) else sympy.Integer(size)


def plan_site(site: ConvSite, config: Config, target: str) -> FFTPlan | Reason:
    """The check: a :class:`FFTPlan` for the site, or the reason it cannot be rewritten."""
    x_value, weight_value = _val(site.input), _val(site.weight)
    if site.transposed:
        return Reason("transposed convolution not supported")
    if x_value is None or x_value.dim() != 3:
        rank = "unknown" if x_value is None else x_value.dim()
        return Reason(f"input rank {rank}, only batched (B, C, T) input is supported")
    kernel = weight_value.shape[-1]
    if not isinstance(kernel, int):
        return Reason("dynamic kernel length")
    if site.dilation != 1:
        return Reason(f"dilation {site.dilation} not supported")
    if not isinstance(site.stride, int) or not isinstance(site.groups, int):
        return Reason("stride and groups must be static")
    if x_value.dtype not in _FLOATS:
        return Reason(f"dtype {x_value.dtype} not supported")
    if weight_value.dtype != x_value.dtype:
        return Reason(f"weight dtype {weight_value.dtype} differs from input {x_value.dtype}")
    length = x_value.shape[-1]
    length_bound = _upper_bound(length)
    if length_bound is None:
        return Reason("dynamic sequence length without an upper bound (declare Dim(max=...))")
    slice_end = site.slice_end
    if isinstance(slice_end, fx.Node):  # a size read from the graph: static, or symbolic
        slice_end = _val(slice_end)
    window = _window(site.padding, site.stride, kernel, length,
                     (site.slice_start, slice_end, site.slice_step), _val(site.output).shape[-1])
    if isinstance(window, Reason):
        return window
    start, step, count = window
    last = start + step * ((count if count is not None else length_bound) - 1)
    if start < 0 or last > length_bound + kernel - 2:
        return Reason(f"padding {site.padding} > kernel - 1 = {kernel - 1}: outputs outside the "
                      f"full convolution")
    needed = max(length_bound + kernel - 1 - start, last + 1)
    rule = "pow2" if target == "onnxruntime" else config.fft_size
    channels_in, channels_out = x_value.shape[1], weight_value.shape[0]
    return FFTPlan(n=fft_size(needed, rule), start=start, step=step, count=count,
                   groups=site.groups, in_per_group=channels_in // site.groups,
                   out_per_group=channels_out // site.groups, kernel=kernel, dtype=x_value.dtype)


# ---------------------------------------------------------------------------------------------
# the replacement, written once as plain torch ops over an `op` that either runs them (eager:
# the public fft_conv1d and the timing) or records them as graph nodes (the rewrite)


def _run_op(target: Callable, *args: Any, **kwargs: Any) -> Any:
    return target(*args, **kwargs)


def filter_spectrum(op: Callable, plan: FFTPlan, weight_CoCigK: Any) -> Any:
    """The filter in the form the product reads: W_CF (complex) or the block W_GF2Cig2Cog."""
    reversed_CoCigK = op(aten.flip.default, weight_CoCigK, [-1])  # conv1d correlates: v = w reversed
    if plan.dtype != plan.compute_dtype:
        reversed_CoCigK = op(aten._to_copy.default, reversed_CoCigK, dtype=plan.compute_dtype)
    G, Cig, Cog, F = plan.groups, plan.in_per_group, plan.out_per_group, plan.frequencies
    if plan.depthwise:
        reversed_CK = op(aten.reshape.default, reversed_CoCigK, [G, plan.kernel])
        return op(aten.fft_rfft.default, reversed_CK, plan.n)  # (C, F) complex
    spectrum_CoCigF = op(aten.fft_rfft.default, reversed_CoCigK, plan.n)
    pairs_CoCigF2 = op(aten.view_as_real.default, spectrum_CoCigF)
    pairs_GCogCigF2 = op(aten.reshape.default, pairs_CoCigF2, [G, Cog, Cig, F, 2])
    pairs_GFCigCog2 = op(aten.permute.default, pairs_GCogCigF2, [0, 3, 2, 1, 4])
    real_GFCigCog = op(aten.select.int, pairs_GFCigCog2, -1, 0)
    imag_GFCigCog = op(aten.select.int, pairs_GFCigCog2, -1, 1)
    # output columns interleave (Cog, real/imag); rows are [real inputs | imaginary inputs]:
    # Yr = Xr·Wr - Xi·Wi,  Yi = Xr·Wi + Xi·Wr
    top = op(aten.stack.default, [real_GFCigCog, imag_GFCigCog], -1)
    bottom = op(aten.stack.default, [op(aten.neg.default, imag_GFCigCog), real_GFCigCog], -1)
    top = op(aten.reshape.default, top, [G, F, Cig, 2 * Cog])
    bottom = op(aten.reshape.default, bottom, [G, F, Cig, 2 * Cog])
    return op(aten.cat.default, [top, bottom], 2)  # (G, F, 2Cig, 2Cog) real


def _grouped_product(op: Callable, plan: FFTPlan, x_BCiF: Any, block: Any) -> Any:
    """Y_BCoF = Σ over a group's input channels of X · W, as one real batched matmul."""
    G, Cig, Cog, F = plan.groups, plan.in_per_group, plan.out_per_group, plan.frequencies
    pairs_BCiF2 = op(aten.view_as_real.default, x_BCiF)
    pairs_BGCigF2 = op(aten.reshape.default, pairs_BCiF2, [-1, G, Cig, F, 2])
    pairs_GFB2Cig = op(aten.permute.default, pairs_BGCigF2, [1, 3, 0, 4, 2])
    rows_GFBR = op(aten.reshape.default, pairs_GFB2Cig, [G, F, -1, 2 * Cig])  # R = 2·Cig
    out_GFBS = op(aten.matmul.default, rows_GFBR, block)  # S = 2·Cog, (Cog, re/im) interleaved
    out_GFBCog2 = op(aten.reshape.default, out_GFBS, [G, F, -1, Cog, 2])
    out_BGCogF2 = op(aten.permute.default, out_GFBCog2, [2, 0, 3, 1, 4])
    out_BCoF2 = op(aten.reshape.default, out_BGCogF2, [-1, G * Cog, F, 2])  # a contiguous copy
    return op(aten.view_as_complex.default, out_BCoF2)


def _fft_conv(op: Callable, plan: FFTPlan, x_BCiT: Any, spectrum: Any, bias_Co: Any,
              length: Any) -> Any:
    """The replacement: y_BCoTo from x, the filter's spectrum, the bias and T (int or node)."""
    if plan.dtype != plan.compute_dtype:
        x_BCiT = op(aten._to_copy.default, x_BCiT, dtype=plan.compute_dtype)
    x_BCiF = op(aten.fft_rfft.default, x_BCiT, plan.n)
    if plan.depthwise:
        y_BCoF = op(aten.mul.Tensor, x_BCiF, spectrum)
    else:
        y_BCoF = _grouped_product(op, plan, x_BCiF, spectrum)
    full_BCoN = op(aten.fft_irfft.default, y_BCoF, plan.n)  # = the full convolution, at kept i
    if plan.count is not None:
        stop = plan.start + plan.step * (plan.count - 1) + 1
    else:
        stop = op(operator.add, length, plan.start) if plan.start else length
    y_BCoTo = op(aten.slice.Tensor, full_BCoN, 2, plan.start, stop, plan.step)
    if bias_Co is not None:
        y_BCoTo = op(aten.add.Tensor, y_BCoTo, op(aten.unsqueeze.default, bias_Co, -1))
    if plan.dtype != plan.compute_dtype:
        y_BCoTo = op(aten._to_copy.default, y_BCoTo, dtype=plan.dtype)
    return y_BCoTo


def fft_conv1d(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               stride: int = 1, padding: int | str = 0, groups: int = 1, *,
               causal: bool = False, fft_size_rule: str = "pow2") -> torch.Tensor:
    """``F.conv1d`` computed by FFT: the same function, up to float rounding.

    ``input`` (B, Ci, T), ``weight`` (Co, Ci/groups, K); ``causal=True`` is Hyena's form,
    ``conv1d(x, w, padding=K-1)[..., :T]``. Raises :class:`InputError` on shapes ``conv1d``
    would reject.
    """
    where = "fft_conv1d"
    if input.dim() != 3 or weight.dim() != 3:
        raise InputError(f"expected input (B, C, T) and weight (Co, C/groups, K), got "
                         f"{tuple(input.shape)} and {tuple(weight.shape)}", stage="fft_conv",
                         where=where, hint="add the batch dimension with x.unsqueeze(0)")
    channels_in, length = input.shape[1], input.shape[2]
    kernel = weight.shape[-1]
    if groups < 1 or channels_in % groups or weight.shape[0] % groups or \
            weight.shape[1] * groups != channels_in:
        raise InputError(f"{channels_in} input channels, weight {tuple(weight.shape)} and "
                         f"groups={groups} do not fit: need Ci = groups·weight.shape[1] and "
                         f"Co divisible by groups", stage="fft_conv", where=where,
                         hint="use the weight and groups F.conv1d accepts")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise InputError(f"bias of shape {tuple(bias.shape)} for {weight.shape[0]} output channels",
                         stage="fft_conv", where=where, hint="bias must be (Co,)")
    if causal and (padding != 0 or stride != 1):
        raise InputError("causal=True takes neither padding nor stride", stage="fft_conv",
                         where=where, hint="causal is conv1d(x, w, padding=K-1)[..., :T]")
    if kernel < 1 or stride < 1:
        raise InputError(f"kernel length {kernel} and stride {stride} must be positive",
                         stage="fft_conv", where=where)
    if padding == "same" and stride != 1:
        raise InputError("padding='same' needs stride 1 (as in F.conv1d)", stage="fft_conv",
                         where=where, hint="pad explicitly, or use stride=1")
    if isinstance(padding, int) and not 0 <= padding <= kernel - 1:
        raise InputError(f"padding {padding} outside 0..K-1 = 0..{kernel - 1}", stage="fft_conv",
                         where=where, hint="pad the input with F.pad first for wider padding")
    window = _window(kernel - 1 if causal else padding, stride, kernel, length,
                     (0, length if causal else None, 1))
    if isinstance(window, Reason):
        raise InputError(f"cannot convolve length {length} with kernel {kernel}, padding "
                         f"{padding!r}: {window}", stage="fft_conv", where=where,
                         hint="padding 'same', 'valid' or 0..K-1, and T + 2·padding >= K")
    start, step, count = window
    needed = max(length + kernel - 1 - start, start + step * (count - 1) + 1)
    plan = FFTPlan(n=fft_size(needed, fft_size_rule), start=start, step=step, count=count,
                   groups=groups, in_per_group=channels_in // groups,
                   out_per_group=weight.shape[0] // groups, kernel=kernel, dtype=input.dtype)
    spectrum = filter_spectrum(_run_op, plan, weight)
    return _fft_conv(_run_op, plan, input, spectrum, bias, length)


# ---------------------------------------------------------------------------------------------
# graph building


class _Builder:
    """Inserts stamped nodes before a site, with FakeTensor metadata computed as it goes."""

    def __init__(self, graph: Graph, before: fx.Node, source: fx.Node):
        self.graph, self.before, self.source = graph, before, source
        self.created: list[fx.Node] = []
        self.fake_mode = detect_fake_mode([n.meta.get("val") for n in graph.fx.nodes
                                           if isinstance(n.meta.get("val"), torch.Tensor)])

    def __call__(self, target: Callable, *args: Any, **kwargs: Any) -> fx.Node:
        with self.graph.fx.inserting_before(self.before):
            node = self.graph.fx.call_function(target, args, kwargs)
        node.meta["val"] = self._fake(target, args, kwargs)
        self.created.append(node)
        return stamp(node, NAME, self.source)

    def _fake(self, target: Callable, args: tuple, kwargs: dict) -> Any:
        def value(argument: Any) -> Any:
            if isinstance(argument, fx.Node):
                found = argument.meta.get("val")
                if found is None and argument.op == "get_attr":
                    found = self.graph.attribute(argument)
                if isinstance(found, torch.Tensor) and self.fake_mode is not None and \
                        not isinstance(found, torch._subclasses.FakeTensor):
                    found = self.fake_mode.from_tensor(found)
                return found
            if isinstance(argument, (list, tuple)):
                return type(argument)(value(a) for a in argument)
            return argument

        if self.fake_mode is None:
            return None
        try:
            # the Python dispatcher runs decompositions that take symbolic sizes (rfft's pad)
            with self.fake_mode, enable_python_dispatcher():
                return target(*value(args), **value(kwargs))
        except Exception:  # metadata is best effort; the graph itself stays correct
            return None


def _constant_spectrum(graph: Graph, site: ConvSite, plan: FFTPlan, weight: torch.Tensor) -> fx.Node:
    """The filter's spectrum, computed once in float64, registered on the graph."""
    complex_dtype = torch.complex128 if plan.compute_dtype == torch.float64 else torch.complex64
    real_dtype = plan.compute_dtype
    with torch.no_grad():
        exact = filter_spectrum(_run_op, FFTPlan(**{**vars(plan), "dtype": torch.float64}),
                                weight.detach().to(torch.float64))
    tensor = exact.to(complex_dtype if plan.depthwise else real_dtype).contiguous()
    node = graph.add_parameter(f"{module_path(site.conv) or 'conv'}.filter_spectrum", tensor,
                               before=site.conv)
    return stamp(node, NAME, site.conv)


def _replace(graph: Graph, site: ConvSite, plan: FFTPlan) -> tuple[fx.Node, list[fx.Node]]:
    constant = graph.attribute(site.weight)
    if constant is not None:
        spectrum = _constant_spectrum(graph, site, plan, constant)
        created = [spectrum]
    else:
        created = []
    emit = _Builder(graph, site.output, site.conv)
    if constant is None:
        spectrum = filter_spectrum(emit, plan, site.weight)
    length = _val(site.input).shape[2]
    if not isinstance(length, int):
        length = emit(aten.sym_size.int, site.input, 2)
    output = _fft_conv(emit, plan, site.input, spectrum, site.bias, length)
    site.output.replace_all_uses_with(output)
    for node in ([site.output, site.conv] if site.output is not site.conv else [site.conv]):
        for user in list(node.users):
            if user.target in _ASSERTS:
                graph.fx.erase_node(user)
        graph.fx.erase_node(node)
    return output, created + emit.created


# ---------------------------------------------------------------------------------------------
# direct or FFT: measured on this machine, or by the threshold


def _example_tensor(graph: Graph, node: Any, generator: torch.Generator) -> Any:
    if not isinstance(node, fx.Node):
        return node
    constant = graph.attribute(node)
    if constant is not None:
        return constant.detach()
    value = _val(node)
    shape = [_example_value(size) for size in value.shape]
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(value.dtype)


def _measure(graph: Graph, site: ConvSite, plan: FFTPlan, repeats: int) -> tuple[float, float]:
    """Seconds of (direct, FFT) at the captured shape: the fastest of interleaved runs.

    The minimum, not the median: on a shared machine the other runs measure the neighbours.
    """
    generator = torch.Generator().manual_seed(0)
    x = _example_tensor(graph, site.input, generator)
    weight = _example_tensor(graph, site.weight, generator)
    bias = _example_tensor(graph, site.bias, generator)
    length = x.shape[-1]
    arguments = [x if a is site.input else weight if a is site.weight else bias if a is site.bias
                 else a for a in site.conv.args]
    keywords = {k: (bias if v is site.bias else v) for k, v in site.conv.kwargs.items()}
    end = site.slice_end if not isinstance(site.slice_end, fx.Node) else \
        _example_value(_val(site.slice_end))

    def direct() -> torch.Tensor:
        y = site.conv.target(*arguments, **keywords)
        if site.output is not site.conv:
            y = y[..., site.slice_start:end:site.slice_step]
        return y

    with torch.no_grad():
        spectrum = filter_spectrum(_run_op, plan, weight)

        def fft() -> torch.Tensor:
            return _fft_conv(_run_op, plan, x, spectrum, bias, length)

        times: dict[Callable, list[float]] = {direct: [], fft: []}
        for function in times:  # warm-up: plans, caches
            function()
        start = time.perf_counter()
        direct()
        if time.perf_counter() - start > 0.25:
            repeats = 1  # a long direct convolution: one timed run is plenty
        for _ in range(repeats):
            for function in times:
                start = time.perf_counter()
                function()
                times[function].append(time.perf_counter() - start)
    return min(times[direct]), min(times[fft])


def _flops(graph: Graph, nodes: list[fx.Node], n: int = 0) -> sympy.Expr:
    """node_cost FLOPs, plus 2.5·N·log2 N per real transform of length N (cost.py has no FFT rule)."""
    from slimline.ir.cost import node_cost
    from slimline.ir.shapes import sympy_numel

    total = sympy.Integer(0)
    for node in nodes:
        total += node_cost(node, graph.rename).flops
        if node.target in (aten.fft_rfft.default, aten.fft_irfft.default):
            spectrum = _val(node.args[0] if node.target == aten.fft_irfft.default else node)
            rows = sympy_numel(spectrum, graph.rename) / _sym(spectrum.shape[-1])
            total += rows * sympy.Rational(5, 2) * n * int(math.log2(n))
    return sympy.expand(total)


def _params(graph: Graph, nodes: list[Any]) -> int:
    tensors = [graph.attribute(n) for n in nodes if isinstance(n, fx.Node)]
    return sum(t.numel() for t in tensors if t is not None)


def _validate(config: Config) -> None:
    for name in ("min_kernel", "min_kernel_onnxruntime"):
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name} must be a positive int, got {value!r}", stage="fft_conv",
                              where=f"passes['fft_conv'].{name}",
                              hint=f"e.g. {{'fft_conv': {{'{name}': 64}}}}")
    if config.fft_size not in ("pow2", "smooth"):
        raise ConfigError(f"unknown fft_size {config.fft_size!r}", stage="fft_conv",
                          where="passes['fft_conv'].fft_size", hint="use 'pow2' or 'smooth'")


def run(graph: Graph, config: Config, context: PassContext) -> PassResult:
    _validate(config)
    stats: dict[str, float] = {"conv_sites": 0, "rewritten": 0, "kept_short": 0,
                               "kept_direct_faster": 0, "refused": 0, "measured": 0}
    decisions: list[LayerDecision] = []
    measure = config.measure and context.target == "cpu" and \
        context.extra.get("tune") in _MEASURED_TUNE_MODES
    threshold = config.min_kernel_onnxruntime if context.target == "onnxruntime" else config.min_kernel
    timed: dict[tuple, tuple[float, float]] = {}  # identical sites are measured once
    for node in list(graph.fx.nodes):
        if node.op != "call_function" or node.target not in _CONVS:
            continue
        site = match_conv(node)
        if isinstance(site, Reason):
            continue
        stats["conv_sites"] += 1
        path = module_path(node)
        before_nodes = [site.conv] + ([site.output] if site.output is not site.conv else [])
        before = _flops(graph, before_nodes)
        params = _params(graph, [site.weight, site.bias])
        decision = LayerDecision(path, CONV1D, "kept", NAME, params_before=params,
                                 params_after=params, flops_before=str(before),
                                 flops_after=str(before))
        decisions.append(decision)
        kernel = _val(site.weight).shape[-1]
        floor = config.min_measured_kernel if measure else threshold
        if isinstance(kernel, int) and kernel < floor:  # short: not worth a reason beyond this
            stats["kept_short"] += 1
            decision.why_not = f"kernel {kernel} < threshold {floor}"
            continue
        plan = plan_site(site, config, context.target)
        if isinstance(plan, Reason):
            stats["refused"] += 1
            decision.why_not = str(plan)
            continue
        if measure:  # else the threshold (the floor above) has decided
            key = (plan, tuple(_example_value(size) for size in _val(site.input).shape),
                   site.bias is None, graph.attribute(site.weight) is None)
            if key not in timed:
                timed[key] = _measure(graph, site, plan, config.measure_repeats)
                stats["measured"] += 1
            direct_s, fft_s = timed[key]
            label = path if f"direct_ms:{path}" not in stats else f"{path}#{stats['conv_sites']:g}"
            stats[f"direct_ms:{label}"] = round(direct_s * 1e3, 4)
            stats[f"fft_ms:{label}"] = round(fft_s * 1e3, 4)
            if direct_s <= fft_s:
                stats["kept_direct_faster"] += 1
                decision.why_not = (f"measured: direct {direct_s * 1e3:.3g} ms <= FFT "
                                    f"{fft_s * 1e3:.3g} ms")
                continue
        _output, created = _replace(graph, site, plan)
        stats["rewritten"] += 1
        decision.decision = f"fft (N={plan.n})"
        decision.flops_after = str(_flops(graph, created, plan.n))
        decision.params_after = _params(graph, created) + _params(graph, [site.bias])
    if stats["rewritten"]:
        graph.fx.eliminate_dead_code()
        graph.recompile()
    return PassResult(graph, stats["rewritten"] > 0, stats, decisions)
