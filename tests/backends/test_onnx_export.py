"""ONNX export of captured GraphModules, the onnxruntime check, atomic writes, OrtModule.

Shape letters: B batch, S sequence, D model width, H heads, Dh head width.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import onnx
import pytest
import torch
import torch.nn.functional as F
from torch.export import Dim

from slimline.backends import onnx_export
from slimline.backends.onnx_export import (
    CORE_OPS,
    ExportInfo,
    default_opset,
    export_onnx_model,
    exporter_max_opset,
    onnxruntime_max_opset,
)
from slimline.backends.onnxruntime import (
    OUTPUT_SPEC_KEY,
    OrtModule,
    load_ort_module,
    missing_cpu_kernels,
    onnx_op_histogram,
    ort_op_histogram,
)
from slimline.errors import ExportError, InputError

TOLERANCE = 1e-4


class MLP(torch.nn.Module):
    def __init__(self, width: int = 16, hidden: int = 32, out: int = 4):
        super().__init__()
        self.up = torch.nn.Linear(width, hidden)
        self.down = torch.nn.Linear(hidden, out)

    def forward(self, x_BD):
        return self.down(F.gelu(self.up(x_BD)))


class AttentionBlock(torch.nn.Module):
    """Pre-norm self-attention; returns a dict holding a tuple, to exercise output structure."""

    def __init__(self, width: int = 32, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.norm = torch.nn.LayerNorm(width)
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.proj = torch.nn.Linear(width, width)

    def forward(self, x_BSD, mask_BS):
        B, S, D = x_BSD.shape
        q_BSD, k_BSD, v_BSD = self.qkv(self.norm(x_BSD)).split(D, dim=-1)
        q_BHSDh, k_BHSDh, v_BHSDh = (t.view(B, S, self.heads, -1).transpose(1, 2)
                                     for t in (q_BSD, k_BSD, v_BSD))
        y_BHSDh = F.scaled_dot_product_attention(q_BHSDh, k_BHSDh, v_BHSDh)
        y_BSD = x_BSD + self.proj(y_BHSDh.transpose(1, 2).reshape(B, S, D))
        y_BSD = y_BSD * mask_BS.unsqueeze(-1)
        return {"hidden": y_BSD, "extras": (q_BHSDh, y_BSD.mean())}


def _inputs(kind: str, batch: int, seq: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        return (torch.randn(batch, 16, generator=generator),)
    return (torch.randn(batch, seq, 32, generator=generator),
            (torch.rand(batch, seq, generator=generator) > 0.2).float())


def _model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return (MLP() if kind == "mlp" else AttentionBlock()).eval()


def _dynamic_shapes(kind: str):
    batch, seq = Dim("batch", max=64), Dim("seq", max=128)
    if kind == "mlp":
        return {"x_BD": {0: batch}}
    return {"x_BSD": {0: batch, 1: seq}, "mask_BS": {0: batch, 1: seq}}


def _max_error(actual, expected) -> float:
    leaves_actual = torch.utils._pytree.tree_leaves(actual)
    leaves_expected = torch.utils._pytree.tree_leaves(expected)
    assert len(leaves_actual) == len(leaves_expected)
    return max(float((a - e).abs().max()) for a, e in zip(leaves_actual, leaves_expected))


def _leftovers(directory: Path) -> list[str]:
    return sorted(entry.name for entry in directory.iterdir())


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each (model, static|dynamic) captured with torch.export and exported once."""
    directory = tmp_path_factory.mktemp("onnx")
    results = {}
    for kind in ("mlp", "attention"):
        for dynamic in (False, True):
            model, example = _model(kind), _inputs(kind, batch=2, seq=5)
            shapes = _dynamic_shapes(kind) if dynamic else None
            gm = torch.export.export(model, example, dynamic_shapes=shapes, strict=False).module()
            path = directory / f"{kind}_{'dynamic' if dynamic else 'static'}.onnx"
            info = export_onnx_model(gm, example, None, path, dynamic_shapes=shapes)
            results[kind, dynamic] = (model, example, info)
    return results


# ---------------------------------------------------------------------------------------------
# export and check


@pytest.mark.parametrize("kind", ["mlp", "attention"])
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_export_matches_torch_in_onnxruntime(exported, kind, dynamic):
    model, example, info = exported[kind, dynamic]
    assert isinstance(info, ExportInfo)
    assert info.path.is_file() and info.file_size == info.path.stat().st_size
    assert info.opset == default_opset()
    assert info.output_checks and all(check.passed for check in info.output_checks)
    assert info.max_abs_error <= TOLERANCE
    assert sum(info.op_histogram.values()) > 0 and set(info.timings) >= {"capture", "convert",
                                                                           "check", "write"}
    with torch.no_grad():
        expected = model(*example)
    assert _max_error(load_ort_module(info.path)(*example), expected) <= TOLERANCE


def test_attention_exports_as_onnx_attention_with_ort_kernels(exported):
    _model_, _example, info = exported["attention", False]
    assert info.opset >= 23
    assert info.op_histogram.get("Attention") == 1  # not MatMul/Softmax/MatMul
    assert missing_cpu_kernels(info.op_histogram, info.opset) == []
    # ORT keeps it as its own Attention kernel rather than expanding the function body
    assert ort_op_histogram(info.path).get("Attention") == 1


@pytest.mark.skipif(not missing_cpu_kernels(["Attention"], 25),
                    reason="this onnxruntime has a kernel for Attention-25")
def test_opset_is_lowered_to_one_with_ort_kernels(tmp_path, monkeypatch):
    model, example = _model("attention"), _inputs("attention", batch=2, seq=5)
    gm = torch.export.export(model, example, strict=False).module()
    requested = export_onnx_model(gm, example, None, tmp_path / "requested.onnx", opset=25)
    assert requested.opset == 25 and requested.opset_source == "requested"
    assert any("no CPU kernel for Attention-25" in message for message in requested.warnings)
    assert "Attention" not in ort_op_histogram(requested.path)  # ORT expanded the function
    monkeypatch.setattr(onnx_export, "default_opset", lambda: 25)  # as if CORE_OPS missed it
    lowered = export_onnx_model(gm, example, None, tmp_path / "lowered.onnx")
    assert lowered.opset == 24 and "lowered from 25 to 24" in lowered.opset_source
    assert ort_op_histogram(lowered.path).get("Attention") == 1


@pytest.mark.parametrize("kind", ["mlp", "attention"])
def test_dynamic_axes_are_dynamic(exported, kind):
    model, _example, info = exported[kind, True]
    first_input = info.input_names[0]
    assert info.dynamic_axes[first_input][0] == "batch"
    if kind == "attention":
        assert info.input_names == ("x_bsd", "mask_bs")  # torch.export lower-cases names
        assert info.dynamic_axes == {
            "x_bsd": {0: "batch", 1: "seq"}, "mask_bs": {0: "batch", 1: "seq"},
            "hidden": {0: "batch", 1: "seq"}, "extras.0": {0: "batch", 2: "seq"}}
    other = _inputs(kind, batch=5, seq=11, seed=1)  # not the example's 2 x 5
    with torch.no_grad():
        expected = model(*other)
    assert _max_error(OrtModule(info.path)(*other), expected) <= TOLERANCE


@pytest.mark.parametrize("kind", ["mlp", "attention"])
def test_static_export_keeps_fixed_shapes(exported, kind):
    _model_, _example, info = exported[kind, False]
    assert info.dynamic_axes == {}
    with pytest.raises(InputError, match="onnxruntime rejected the inputs"):
        OrtModule(info.path)(*_inputs(kind, batch=3, seq=5))


def test_output_structure_round_trips(exported):
    model, example, info = exported["attention", True]
    assert info.output_names == ("hidden", "extras.0", "extras.1")
    runner = load_ort_module(info.path, intra_op_threads=1, graph_optimization_level="basic")
    result = runner(*example)
    assert isinstance(result, dict) and list(result) == ["hidden", "extras"]
    assert isinstance(result["extras"], tuple) and len(result["extras"]) == 2
    assert result["extras"][1].shape == () and result["hidden"].dtype == torch.float32
    with torch.no_grad():
        assert _max_error(result, model(*example)) <= TOLERANCE
    # an explicit spec overrides the stored one
    flat_spec = torch.utils._pytree.tree_flatten((1, 2, 3))[1]
    flat = OrtModule(info.path, output_spec=flat_spec)(*example)
    assert isinstance(flat, tuple) and len(flat) == 3


def test_file_without_stored_spec_returns_flat_outputs(exported, tmp_path):
    _model_, example, info = exported["attention", False]
    proto = onnx.load(str(info.path))
    assert [entry.key for entry in proto.metadata_props] == [OUTPUT_SPEC_KEY]
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "bare.onnx"))
    outputs = OrtModule(tmp_path / "bare.onnx")(*example)
    assert isinstance(outputs, tuple) and [tuple(t.shape) for t in outputs] == [
        (2, 5, 32), (2, 4, 5, 8), ()]


def test_tuple_output_and_renamed_signature(tmp_path):
    class Pair(torch.nn.Module):  # forward(*xs): ep.module() takes (xs_0, xs_1)
        def forward(self, *xs):
            return xs[0] + xs[1], xs[0] * xs[1]

    example = (torch.randn(3, 4), torch.randn(3, 4))
    batch = Dim("batch")
    shapes = (({0: batch}, {0: batch}),)  # the form the caller captured with
    gm = torch.export.export(Pair(), example, dynamic_shapes=shapes, strict=False).module()
    info = export_onnx_model(gm, example, None, tmp_path / "pair.onnx", dynamic_shapes=shapes)
    assert info.output_names == ("output_0", "output_1")
    assert info.dynamic_axes["xs_0"] == {0: "batch"}
    other = (torch.randn(7, 4), torch.randn(7, 4))
    result = OrtModule(info.path)(*other)
    assert isinstance(result, tuple) and len(result) == 2
    assert _max_error(result, Pair()(*other)) <= TOLERANCE


def test_pass_added_parameter_and_none_outputs_round_trip(tmp_path):
    class Returns(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 4)

        def forward(self, x):
            y = self.linear(x)
            return y, None, {"again": y, "input": x}

    model, example = Returns().eval(), (torch.randn(2, 4),)
    gm = torch.export.export(model, example, strict=False).module()
    # what a pass does: register a new parameter and use it through a get_attr node
    gm.register_parameter("slimline_scale", torch.nn.Parameter(torch.full((4,), 2.0),
                                                               requires_grad=False))
    linear = next(node for node in gm.graph.nodes if node.target == torch.ops.aten.linear.default)
    with gm.graph.inserting_after(linear):
        scale = gm.graph.get_attr("slimline_scale")
    with gm.graph.inserting_after(scale):
        scaled = gm.graph.call_function(torch.ops.aten.mul.Tensor, (linear, scale))
    linear.replace_all_uses_with(scaled)
    scaled.args = (linear, scale)
    gm.recompile()

    info = export_onnx_model(gm, example, None, tmp_path / "model.onnx")
    assert info.output_names == ("output_0", "output_2.again", "output_2.input")
    assert any("None output" in message for message in info.warnings)  # logged, not printed
    result = OrtModule(info.path)(*example)
    assert result[1] is None and set(result[2]) == {"again", "input"}
    with torch.no_grad():
        expected = 2 * model.linear(example[0])
    assert float((result[0] - expected).abs().max()) <= TOLERANCE
    assert torch.equal(result[2]["input"], example[0])


def test_large_model_weights_go_to_external_data(tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_export, "LARGE_MODEL_BYTES", 1024)  # the MLP has ~2.6 KB of weights
    model, example = _model("mlp"), _inputs("mlp", batch=2, seq=0)
    gm = torch.export.export(model, example, strict=False).module()
    info = export_onnx_model(gm, example, {}, tmp_path / "mlp.onnx")
    data = tmp_path / "mlp.onnx.data"
    assert info.external_data_path == data and data.is_file()
    assert info.file_size == info.path.stat().st_size + data.stat().st_size
    assert _leftovers(tmp_path) == ["mlp.onnx", "mlp.onnx.data"]
    with torch.no_grad():
        assert _max_error(OrtModule(info.path)(*example), model(*example)) <= TOLERANCE


def test_export_info_is_json_ready(exported):
    _model_, _example, info = exported["attention", True]
    data = json.loads(json.dumps(info.to_json()))
    assert data["path"] == str(info.path) and data["opset"] == info.opset
    assert data["dynamic_axes"]["hidden"] == {"0": "batch", "1": "seq"}
    assert [check["name"] for check in data["output_checks"]] == list(info.output_names)
    assert data["output_spec"]  # the pytree spec as JSON text


def test_default_opset_is_supported_by_both_sides():
    opset = default_opset()
    assert 18 <= opset <= min(exporter_max_opset(), onnxruntime_max_opset())
    assert missing_cpu_kernels(CORE_OPS, opset) == []


# ---------------------------------------------------------------------------------------------
# failures: ExportError, nothing partial on disk


class Eigen(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x):
        return torch.linalg.eigh(self.proj(x) @ x.T)[0]  # aten._linalg_eigh has no ONNX function


class WithEigen(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.spectral = Eigen()

    def forward(self, x):
        return self.spectral(x) + 1


def test_failing_export_leaves_no_file(tmp_path):
    example = (torch.randn(4, 4),)
    gm = torch.export.export(WithEigen(), example, strict=False).module()
    existing = tmp_path / "model.onnx"
    existing.write_bytes(b"previous export")
    with pytest.raises(ExportError) as caught:
        export_onnx_model(gm, example, None, existing)
    assert "_linalg_eigh" in caught.value.where and "spectral" in caught.value.where
    assert caught.value.hint
    assert existing.read_bytes() == b"previous export"
    assert _leftovers(tmp_path) == ["model.onnx"]
    with pytest.raises(ExportError):  # directories it would have created are gone again
        export_onnx_model(gm, example, None, tmp_path / "new" / "deeper" / "model.onnx")
    assert _leftovers(tmp_path) == ["model.onnx"]


def test_unwritable_destination_raises_before_exporting(tmp_path):
    a_file = tmp_path / "not_a_directory"
    a_file.write_text("")
    gm = MLP().eval()
    example = _inputs("mlp", batch=2, seq=0)
    with pytest.raises(ExportError, match="is a file, not a directory") as caught:
        export_onnx_model(gm, example, None, a_file / "sub" / "model.onnx")
    assert caught.value.where.endswith("model.onnx")
    with pytest.raises(ExportError, match="is a directory"):
        export_onnx_model(gm, example, None, tmp_path)
    assert _leftovers(tmp_path) == ["not_a_directory"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_directory_raises(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(ExportError, match="not writable"):
            export_onnx_model(MLP().eval(), _inputs("mlp", 2, 0), None, locked / "model.onnx")
    finally:
        locked.chmod(0o700)
    assert _leftovers(locked) == []


def test_failure_while_moving_into_place_leaves_old_file(tmp_path, monkeypatch):
    model, example = _model("mlp"), _inputs("mlp", batch=2, seq=0)
    gm = torch.export.export(model, example, strict=False).module()
    destination = tmp_path / "model.onnx"
    destination.write_bytes(b"previous export")
    real_replace = os.replace

    def refuse_the_model(source, target):
        if Path(target) == destination:
            raise PermissionError(13, "Permission denied")
        real_replace(source, target)

    monkeypatch.setattr(onnx_export.os, "replace", refuse_the_model)
    with pytest.raises(ExportError, match="cannot write") as caught:
        export_onnx_model(gm, example, None, destination)
    assert caught.value.where == str(destination)
    assert destination.read_bytes() == b"previous export"
    assert _leftovers(tmp_path) == ["model.onnx"]  # no temporary directory, no stray file


def test_onnxruntime_mismatch_raises_and_writes_nothing(tmp_path):
    class CountsCalls(torch.nn.Module):
        """Python-side state: the exported graph freezes one call count, eager sees another."""

        def __init__(self):
            super().__init__()
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            return x * self.calls

    with pytest.raises(ExportError, match="disagrees with torch") as caught:
        export_onnx_model(CountsCalls(), (torch.ones(3),), None, tmp_path / "model.onnx")
    assert caught.value.where == "output 'output'"
    checks = caught.value.output_checks
    assert len(checks) == 1 and not checks[0].passed and checks[0].max_abs_error >= 1.0
    assert _leftovers(tmp_path) == []
    unchecked = export_onnx_model(CountsCalls(), (torch.ones(3),), None, tmp_path / "model.onnx",
                                  check=False)
    assert unchecked.output_checks == () and unchecked.path.is_file()


def test_non_tensor_output_is_refused(tmp_path):
    class ReturnsSize(torch.nn.Module):
        def forward(self, x):
            return x * 2, x.shape[0]

    with pytest.raises(ExportError, match="not a tensor") as caught:
        export_onnx_model(ReturnsSize(), (torch.ones(3),), None, tmp_path / "model.onnx")
    assert caught.value.where == "output '1'"
    assert _leftovers(tmp_path) == []


def test_ort_module_checks_its_inputs(exported):
    _model_, example, info = exported["attention", False]
    with pytest.raises(InputError, match="takes 2 tensor inputs"):
        OrtModule(info.path)(example[0])
    with pytest.raises(InputError, match="no ONNX file"):
        load_ort_module(info.path.with_name("missing.onnx"))


def test_op_histograms_count_file_and_ort_graph(exported):
    _model_, _example, info = exported["mlp", False]
    assert onnx_op_histogram(info.path) == info.op_histogram
    assert info.op_histogram.get("Gemm", 0) + info.op_histogram.get("MatMul", 0) == 2
    unoptimized = ort_op_histogram(info.path, graph_optimization_level="disable")
    assert unoptimized == info.op_histogram
    assert sum(ort_op_histogram(info.path).values()) <= sum(unoptimized.values())
