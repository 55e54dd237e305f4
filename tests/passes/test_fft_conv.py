"""fft_conv: long 1-D convolutions → ``rfft`` · filter spectrum → ``irfft``.

Structural (Before: one conv1d; Expected: no conv1d, one rfft of the input, one irfft, the
filter's spectrum registered once) and numerical (original vs rewritten on seeded inputs: fp32
relative error ≤ 1e-5, the pipeline's exact tolerance; ORT ≤ 1e-4) on causal / same / valid
padding, odd lengths, batch 1 and 3, one and many channels, grouped and depthwise, bias, stride;
the Hyena reference model through ``slimline.optimize``; refusals and bad shapes; the DFT-as-
matmul math of ``benchmarks/fft_conv_gpu.py`` on CPU.
"""

import importlib.util
import logging
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimline
from slimline.errors import ConfigError, InputError, SlimlineError
from slimline.ir.capture import capture
from slimline.ir.graph import PROVENANCE_PASS, PROVENANCE_SOURCE, module_path
from slimline.passes import fft_conv
from slimline.passes.base import PassContext

aten = torch.ops.aten
CONVS = (aten.conv1d.default, aten.conv1d.padding, aten.convolution.default)
FP32_RTOL = 1e-5
ORT_RTOL = 1e-4


class LongConv(nn.Module):
    """conv1d with a constant weight (Co, Ci/groups, K); ``padding='causal'`` is Hyena's form."""

    def __init__(self, channels_in, channels_out, kernel, padding, groups=None, bias=False, stride=1):
        super().__init__()
        self.groups = channels_in if groups is None else groups
        self.padding, self.stride, self.kernel = padding, stride, kernel
        self.conv = nn.Conv1d(channels_in, channels_out, kernel, groups=self.groups, bias=bias,
                              stride=stride, padding=0)
        with torch.no_grad():  # decaying filters, like Hyena's, so outputs stay O(1)
            self.conv.weight.mul_(torch.linspace(0.1, 1.0, kernel))

    def forward(self, x):  # (B, Ci, T) -> (B, Co, To)
        w, b = self.conv.weight, self.conv.bias
        if self.padding == "causal":
            return F.conv1d(x, w, b, padding=self.kernel - 1, groups=self.groups)[..., :x.shape[-1]]
        return F.conv1d(x, w, b, stride=self.stride, padding=self.padding, groups=self.groups)


class ComputedFilter(nn.Module):
    """A depthwise causal conv whose filter is computed in the forward (Hyena's implicit form)."""

    def __init__(self, channels, kernel):
        super().__init__()
        self.base = nn.Parameter(torch.randn(channels, kernel) / kernel ** 0.5)

    def forward(self, x):
        w = (self.base * torch.linspace(1.0, 0.1, self.base.shape[1])).flip(-1).unsqueeze(1)
        return F.conv1d(x, w, padding=w.shape[-1] - 1, groups=x.shape[1])[..., :x.shape[-1]]


def _run_pass(model, inputs, config=None, target="cpu", tune=None, dynamic_shapes=None):
    graph = capture(model, inputs, dynamic_shapes=dynamic_shapes)
    extra = {} if tune is None else {"tune": tune}
    result = fft_conv.run(graph.copy(), config or fft_conv.Config(),
                          PassContext(target, "lossless", extra=extra))
    return graph, result


def _calls(graph, *targets):
    return [n for n in graph.fx.nodes if n.op == "call_function" and (not targets or n.target in targets)]


def _relative_error(expected, actual) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


# ---------------------------------------------------------------------------------------------
# Before → Expected


def test_causal_depthwise_before_and_expected():
    """Before: conv1d(x, w, padding=K-1, groups=C)[..., :T].
    Expected: irfft(rfft(x, N) · W_CF, N)[..., 0:T] with W_CF a registered complex buffer."""
    model = LongConv(8, 8, 64, "causal").eval()
    x = torch.randn(2, 8, 100)
    graph, result = _run_pass(model, (x,))

    assert len(_calls(graph, *CONVS)) == 1 and len(_calls(graph, aten.slice.Tensor)) == 1
    assert _calls(graph, aten.fft_rfft.default) == []

    assert result.changed and result.stats["rewritten"] == 1 and result.stats["conv_sites"] == 1
    assert _calls(result.graph, *CONVS) == []
    (rfft,) = _calls(result.graph, aten.fft_rfft.default)
    (irfft,) = _calls(result.graph, aten.fft_irfft.default)
    (product,) = _calls(result.graph, aten.mul.Tensor)
    (window,) = _calls(result.graph, aten.slice.Tensor)
    n = 256  # T + K - 1 = 163 -> the next power of two
    assert rfft.args == (rfft.args[0], n) and rfft.args[0].op == "placeholder"
    assert irfft.args == (product, n) and window.args == (irfft, 2, 0, 100, 1)
    spectrum = next(a for a in product.args if isinstance(a, torch.fx.Node) and a.op == "get_attr")
    tensor = result.graph.attribute(spectrum)
    assert spectrum.target.startswith("slimline_") and tensor.dtype == torch.complex64
    assert tuple(tensor.shape) == (8, n // 2 + 1)
    for node in (rfft, irfft, product, window, spectrum):
        assert node.meta[PROVENANCE_PASS] == "fft_conv"
        assert node.meta[PROVENANCE_SOURCE] == module_path(_calls(graph, *CONVS)[0])
    assert tuple(window.meta["val"].shape) == (2, 8, 100)

    (decision,) = result.decisions
    assert decision.op == "conv1d" and decision.decision == f"fft (N={n})" and not decision.why_not
    assert int(decision.flops_after) < int(decision.flops_before)
    assert _relative_error(model(x), result.graph.run((x,), {})) <= FP32_RTOL


CASES = [  # Ci, Co, K, padding, groups, bias, stride, B, T
    pytest.param(8, 8, 64, "causal", None, False, 1, 3, 101, id="causal-depthwise-odd-T"),
    pytest.param(1, 1, 65, "causal", None, True, 1, 1, 65, id="causal-one-channel-batch1-bias"),
    pytest.param(6, 6, 71, "same", None, False, 1, 2, 99, id="same-str-odd-K"),
    pytest.param(6, 6, 64, 31, None, True, 1, 1, 97, id="same-int-even-K-bias"),
    pytest.param(4, 4, 65, "valid", None, False, 1, 3, 130, id="valid-str"),
    pytest.param(4, 4, 64, 0, None, True, 3, 2, 131, id="valid-int-stride3-bias"),
    pytest.param(6, 9, 64, 10, 3, True, 1, 2, 77, id="grouped-3-bias"),
    pytest.param(4, 8, 64, "causal", 4, False, 1, 1, 64, id="depthwise-multiplier-2"),
    pytest.param(5, 3, 64, "same", 1, True, 1, 2, 83, id="dense-groups-1"),
]


@pytest.mark.parametrize("channels_in, channels_out, kernel, padding, groups, bias, stride, batch, length", CASES)
def test_forms_become_fft_and_stay_exact(channels_in, channels_out, kernel, padding, groups, bias,
                                         stride, batch, length):
    model = LongConv(channels_in, channels_out, kernel, padding, groups, bias, stride).eval()
    x = torch.randn(batch, channels_in, length)
    _graph, result = _run_pass(model, (x,))
    assert result.stats["rewritten"] == 1 and _calls(result.graph, *CONVS) == []
    assert len(_calls(result.graph, aten.fft_rfft.default)) == 1  # constant filter: input only
    assert len(_calls(result.graph, aten.fft_irfft.default)) == 1
    grouped = model.groups != channels_in or channels_out != channels_in
    assert bool(_calls(result.graph, aten.matmul.default)) == grouped  # real block product
    assert bool(_calls(result.graph, aten.add.Tensor)) == bias
    expected = model(x)
    actual = result.graph.run((x,), {})
    assert actual.shape == expected.shape
    assert _relative_error(expected, actual) <= FP32_RTOL


def test_computed_filter_is_transformed_in_the_graph():
    model = ComputedFilter(4, 96).eval()
    x = torch.randn(2, 4, 96)
    _graph, result = _run_pass(model, (x,))
    assert result.stats["rewritten"] == 1
    assert len(_calls(result.graph, aten.fft_rfft.default)) == 2  # the input and the filter
    assert not any(n.target.startswith("slimline_") for n in result.graph.fx.nodes if n.op == "get_attr")
    assert _relative_error(model(x), result.graph.run((x,), {})) <= FP32_RTOL


def test_bfloat16_convolution_is_computed_in_float32():
    model = LongConv(4, 4, 64, "causal").eval().to(torch.bfloat16)
    x = torch.randn(2, 4, 80, dtype=torch.bfloat16)
    _graph, result = _run_pass(model, (x,))
    assert result.stats["rewritten"] == 1
    (rfft,) = _calls(result.graph, aten.fft_rfft.default)
    assert rfft.args[0].meta["val"].dtype == torch.float32
    actual = result.graph.run((x,), {})
    assert actual.dtype == torch.bfloat16
    reference = LongConv.forward(model.float(), x.float())  # what bf16 approximates
    assert _relative_error(reference, actual) <= 1e-2


def test_dynamic_length_with_a_bound_runs_at_other_lengths():
    model = LongConv(4, 4, 64, "causal").eval()
    x = torch.randn(2, 4, 100)
    dims = {"x": {0: "batch", 2: torch.export.Dim("seq", max=128)}}
    _graph, result = _run_pass(model, (x,), dynamic_shapes=dims)
    assert result.stats["rewritten"] == 1
    (rfft,) = _calls(result.graph, aten.fft_rfft.default)
    assert rfft.args[1] == 256  # sized for the longest T, 128 + 64 - 1
    for shape in ((3, 4, 128), (1, 4, 37)):
        other = torch.randn(shape)
        assert _relative_error(model(other), result.graph.module(other)) <= FP32_RTOL


def test_dynamic_length_without_a_bound_is_refused():
    model = LongConv(4, 4, 64, "causal").eval()
    _graph, result = _run_pass(model, (torch.randn(2, 4, 100),),
                               dynamic_shapes={"x": {2: "seq"}})
    assert not result.changed and result.stats["refused"] == 1
    assert "without an upper bound" in result.decisions[0].why_not


# ---------------------------------------------------------------------------------------------
# refusals: the reason reaches the decision


@pytest.mark.parametrize("build, reason", [
    (lambda: LongConv(4, 4, 3, "causal"), "kernel 3 < threshold 32"),
    (lambda: nn.Conv1d(4, 4, 64, dilation=2, groups=4), "dilation 2 not supported"),
    (lambda: nn.ConvTranspose1d(4, 4, 64, groups=4), None),  # not a conv1d site at all
])
def test_refusals_say_why(build, reason):
    model = build().eval()
    _graph, result = _run_pass(model, (torch.randn(2, 4, 200),))
    assert not result.changed
    if reason is None:
        assert result.stats["conv_sites"] == 0 and result.decisions == []
        return
    (decision,) = result.decisions
    assert decision.decision == "kept" and decision.why_not == reason


def test_threshold_is_a_config_knob():
    model = LongConv(4, 4, 16, "causal").eval()
    x = torch.randn(1, 4, 50)
    _graph, kept = _run_pass(model, (x,))
    assert kept.stats["kept_short"] == 1 and kept.decisions[0].why_not == "kernel 16 < threshold 32"
    _graph, rewritten = _run_pass(model, (x,), fft_conv.Config(min_kernel=16))
    assert rewritten.stats["rewritten"] == 1
    with pytest.raises(ConfigError, match="min_kernel"):
        _run_pass(model, (x,), fft_conv.Config(min_kernel=0))
    # onnxruntime's DFT is slow: its own, higher threshold
    _graph, for_ort = _run_pass(LongConv(4, 4, 64, "causal").eval(), (x,), target="onnxruntime")
    assert for_ort.decisions[0].why_not == "kernel 64 < threshold 1024"
    _graph, for_cpu = _run_pass(LongConv(4, 4, 64, "causal").eval(), (x,), target="cpu")
    assert for_cpu.stats["rewritten"] == 1


def test_measured_choice_records_both_times_and_keeps_the_faster(monkeypatch):
    model = LongConv(4, 4, 16, "causal").eval()  # below the threshold, above the measured floor
    x = torch.randn(1, 4, 64)
    _graph, measured = _run_pass(model, (x,), tune="lite")
    assert measured.stats["measured"] == 1
    path = measured.decisions[0].module_path
    direct, fft = measured.stats[f"direct_ms:{path}"], measured.stats[f"fft_ms:{path}"]
    assert direct > 0 and fft > 0
    assert measured.stats["rewritten"] == (1 if fft < direct else 0)

    monkeypatch.setattr(fft_conv, "_measure", lambda *args: (0.001, 0.002))
    _graph, slower = _run_pass(LongConv(4, 4, 128, "causal").eval(), (x,), tune="max")
    assert slower.stats["kept_direct_faster"] == 1 and not slower.changed
    assert slower.decisions[0].why_not == "measured: direct 1 ms <= FFT 2 ms"
    for tune, target in (("off", "cpu"), ("cache", "cpu"), (None, "cpu"), ("lite", "onnxruntime")):
        _graph, by_threshold = _run_pass(model, (x,), tune=tune, target=target)
        assert by_threshold.stats["measured"] == 0 and by_threshold.stats["kept_short"] == 1


# ---------------------------------------------------------------------------------------------
# the reference model, the pipeline, ONNX


def test_hyena_reference_model_is_exact_after_optimize():
    from slimline.models import REFERENCE_MODELS

    model, inputs = REFERENCE_MODELS["hyena"]()
    optimized = slimline.optimize(model, inputs, mode="lossless", tune="off")
    record = next(p for p in optimized.report.passes if p.name == "fft_conv")
    assert record.status == "applied" and record.stats["rewritten"] == model.config.n_layer
    convs = [layer for layer in optimized.report.layers if layer.op == "conv1d"]
    assert len(convs) == model.config.n_layer
    assert all(layer.decision == "fft (N=2048)" for layer in convs)
    assert _calls(optimized.graph, *CONVS) == []
    with torch.no_grad():
        expected = model(*inputs)
    assert _relative_error(expected, optimized(*inputs)) <= 1e-4  # the bar
    assert optimized.report.verification["passed"]


def _quiet_export():
    warnings.filterwarnings("ignore")
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)


def test_onnx_export_runs_in_onnxruntime(tmp_path):
    """rfft/irfft become ONNX DFT; ORT 1.32 runs them (implicit Hyena filter, dynamic T)."""
    pytest.importorskip("onnxruntime")
    from slimline.models.hyena import Hyena, HyenaConfig

    _quiet_export()
    model = Hyena(HyenaConfig(filter_length=64, n_layer=1, d_model=16, filter="implicit")).eval()
    idx = torch.randint(0, 256, (2, 64))
    dims = {"idx": {0: "batch", 1: torch.export.Dim("seq", max=64)}}
    optimized = slimline.optimize(model, (idx,), target="onnxruntime", dynamic_shapes=dims,
                                  workdir=tmp_path,  # K=64 is below ORT's default threshold
                                  passes={"fft_conv": {"min_kernel_onnxruntime": 64}})
    export = optimized.report.export
    # the input's rfft and the irfft; the filter's rfft depends on weights only, and the
    # exporter's optimizer folds it (and the filter MLP) into a constant
    assert export["op_histogram"].get("DFT", 0) == 2
    assert "Conv" not in export["op_histogram"]
    assert export["output_checks"] and all(c["passed"] and c["max_rel_error"] <= ORT_RTOL
                                           for c in export["output_checks"])
    assert optimized.report.verification["passed"]
    other = torch.randint(0, 256, (3, 41))
    with torch.no_grad():
        expected = model(other)
    assert _relative_error(expected, torch.as_tensor(optimized(other))) <= ORT_RTOL


def test_grouped_conv_exports_to_onnx(tmp_path):
    pytest.importorskip("onnxruntime")
    from slimline.backends.onnx_export import export_onnx_model

    _quiet_export()
    model = LongConv(6, 9, 64, "same", groups=3, bias=True).eval()
    x = torch.randn(2, 6, 90)
    _graph, result = _run_pass(model, (x,), fft_conv.Config(min_kernel_onnxruntime=64),
                               target="onnxruntime")
    info = export_onnx_model(result.graph.module, (x,), {}, tmp_path / "grouped.onnx")
    assert info.op_histogram["DFT"] == 2 and info.op_histogram["MatMul"] == 1
    assert info.max_rel_error <= ORT_RTOL


# ---------------------------------------------------------------------------------------------
# the public FFT convolution: bad shapes get clear errors


def test_fft_conv1d_matches_conv1d():
    x, w, b = torch.randn(2, 6, 45), torch.randn(9, 2, 20), torch.randn(9)
    assert _relative_error(F.conv1d(x, w, b, padding=7, groups=3, stride=2),
                           fft_conv.fft_conv1d(x, w, b, padding=7, groups=3, stride=2)) <= FP32_RTOL
    depthwise = torch.randn(6, 1, 45)
    assert _relative_error(F.conv1d(x, depthwise, padding=44, groups=6)[..., :45],
                           fft_conv.fft_conv1d(x, depthwise, groups=6, causal=True)) <= FP32_RTOL


@pytest.mark.parametrize("x_shape, w_shape, kwargs, match", [
    ((6, 45), (6, 1, 8), {"groups": 6}, "expected input"),
    ((2, 6, 45), (6, 2, 8), {"groups": 6}, "do not fit"),
    ((2, 6, 45), (6, 1, 8), {"groups": 6, "padding": 9}, "padding 9 outside"),
    ((2, 6, 5), (6, 1, 8), {"groups": 6}, "no outputs"),
    ((2, 6, 45), (6, 1, 8), {"groups": 6, "padding": "same", "stride": 2}, "needs stride 1"),
    ((2, 6, 45), (6, 1, 8), {"groups": 6, "causal": True, "padding": 3}, "causal"),
])
def test_fft_conv1d_bad_shapes_raise_clear_errors(x_shape, w_shape, kwargs, match):
    with pytest.raises(InputError, match=match) as caught:
        fft_conv.fft_conv1d(torch.randn(x_shape), torch.randn(w_shape), **kwargs)
    assert isinstance(caught.value, SlimlineError) and caught.value.where == "fft_conv1d"


def test_fft_sizes():
    assert [fft_conv.fft_size(m) for m in (1, 2, 3, 1000, 1024, 1025)] == [1, 2, 4, 1024, 1024, 2048]
    assert [fft_conv.fft_size(m, "smooth") for m in (7, 1000, 1025, 2047)] == [8, 1000, 1080, 2048]
    with pytest.raises(InputError):
        fft_conv.fft_size(0)


# ---------------------------------------------------------------------------------------------
# benchmarks/fft_conv_gpu.py: the DFT-as-matmul (Monarch) math, on CPU


def _gpu_benchmark():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "fft_conv_gpu.py"
    spec = importlib.util.spec_from_file_location("fft_conv_gpu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("n1, n2", [(4, 8), (16, 16), (8, 32)])
def test_monarch_dft_conv_matches_direct_conv_on_cpu(n1, n2):
    bench = _gpu_benchmark()
    batch, channels, length = 2, 3, (n1 * n2) // 2
    x = torch.randn(batch, channels, length, dtype=torch.float64)
    w = torch.randn(channels, 1, length, dtype=torch.float64) / length ** 0.5
    expected = F.conv1d(x, w, padding=length - 1, groups=channels)[..., :length]
    monarch = bench.MonarchConv(w, n1, n2, dtype=torch.float64)
    assert _relative_error(expected, monarch(x)) <= 1e-12
    torch_fft = bench.torch_fft_causal_conv(x, bench.filter_spectrum_causal(w, n1 * n2), n1 * n2)
    assert _relative_error(expected, torch_fft) <= 1e-12
    # fp32 operands (what tensor cores get on the GPU): still exact to fp32 rounding
    monarch32 = bench.MonarchConv(w.float(), n1, n2, dtype=torch.float32)
    assert _relative_error(expected, monarch32(x.float())) <= 1e-5


def test_monarch_split_picks_square_factors():
    bench = _gpu_benchmark()
    assert bench.monarch_split(16384) == (128, 128)
    assert bench.monarch_split(2048) == (32, 64)
