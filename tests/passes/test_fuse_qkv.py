"""fuse_qkv: the Q, K, V projections of one attention site → one linear and a split.

Structural (Before: three ``aten.linear`` reading ``x``; Expected: one ``aten.linear`` with the
concatenated weight, ``split_with_sizes``; counts per model) and numerical (original vs fused,
fp32 relative error ≤ 1e-5; ONNX Runtime ≤ 1e-4), after ``canonicalize_linear`` and
``fuse_attention`` as in the pipeline.
"""

import warnings

import pytest
import torch
from torch import nn

import slimline
from slimline.ir.capture import capture
from slimline.ir.graph import PROVENANCE_PASS, module_path
from slimline.passes import canonicalize_linear, fuse_attention, fuse_qkv
from slimline.passes.base import PassContext
from tests.passes import attention_models as forms

aten = torch.ops.aten
LINEAR = aten.linear.default
SDPA = aten.scaled_dot_product_attention.default
FP32_RTOL = 1e-5
ORT_RTOL = 1e-4


def _calls(graph, *targets):
    return [n for n in graph.fx.nodes if n.op == "call_function" and (not targets or n.target in targets)]


def _relative_error(expected, actual) -> float:
    expected = [t for t in torch.utils._pytree.tree_leaves(expected) if isinstance(t, torch.Tensor)
                and t.is_floating_point()]
    actual = [t for t in torch.utils._pytree.tree_leaves(actual) if isinstance(t, torch.Tensor)
              and t.is_floating_point()]
    assert len(expected) == len(actual) and expected
    return max(((a - e).abs().max() / e.abs().max()).item() for e, a in zip(expected, actual))


def _prepared(model, args, kwargs=None, dynamic_shapes=None):
    """The graph as fuse_qkv sees it in the pipeline: linears canonical, attention fused."""
    context = PassContext("cpu", "lossless")
    graph = capture(model, args, kwargs or {}, dynamic_shapes=dynamic_shapes)
    graph = canonicalize_linear.run(graph.copy(), canonicalize_linear.Config(), context).graph
    return fuse_attention.run(graph.copy(), fuse_attention.Config(), context).graph


def _run_pass(graph, config=None):
    return fuse_qkv.run(graph.copy(), config or fuse_qkv.Config(), PassContext("cpu", "lossless"))


def test_three_projections_before_and_expected():
    """Before: linear(x, Wq, bq), linear(x, Wk, bk), linear(x, Wv, bv) → sdpa.
    Expected: linear(x, cat(Wq, Wk, Wv), cat(bq, bk, bv)) → split_with_sizes → sdpa."""
    model = forms.ScaledMasked().eval()
    inputs = forms.example_inputs(model)
    graph = _prepared(model, inputs)
    before = _calls(graph, LINEAR)
    assert len(before) == 3 and len({n.args[0] for n in before}) == 1

    result = _run_pass(graph)
    assert result.changed and result.stats == {"fused_qkv": 1}
    (fused,) = _calls(result.graph, LINEAR)
    (split,) = _calls(result.graph, aten.split_with_sizes.default)
    assert split.args[0] is fused and list(split.args[1]) == [forms.C, forms.C, forms.C]
    weight, bias = (result.graph.attribute(a) for a in fused.args[1:3])
    torch.testing.assert_close(weight, torch.cat([model.query.weight, model.key.weight, model.value.weight]),
                               rtol=0, atol=0)
    torch.testing.assert_close(bias, torch.cat([model.query.bias, model.key.bias, model.value.bias]),
                               rtol=0, atol=0)
    assert fused.meta[PROVENANCE_PASS] == "fuse_qkv" and fused.meta["val"].shape[-1] == 3 * forms.C
    (decision,) = result.decisions
    assert decision.decision == "3 projections → one linear"
    assert decision.params_before == decision.params_after == 3 * (forms.C * forms.C + forms.C)
    assert len(_calls(result.graph, SDPA)) == 1
    assert len(_calls(result.graph, aten.view.default)) == len(_calls(graph, aten.view.default)), \
        "the head splits still fit the split's strides: they stay views"
    assert _relative_error(model(*inputs), result.graph.run(inputs, {})) <= FP32_RTOL


class _FlatQuery(forms._Projections):
    """the query viewed flat first, (B, L, C) -> (B, L·C): on a column slice of the fused
    output no view can merge those dimensions."""

    def forward(self, x):
        _, k, v = self.heads(x)
        q = self.query(x).view(forms.B, forms.L * forms.C)
        q = q.view(forms.B, forms.L, forms.H, forms.E).transpose(1, 2)
        return forms.merge(nn.functional.scaled_dot_product_attention(q, k, v))


def test_a_view_that_no_longer_fits_becomes_reshape():
    model = _FlatQuery().eval()
    inputs = forms.example_inputs(model)
    graph = _prepared(model, inputs)
    result = _run_pass(graph)
    assert result.stats == {"fused_qkv": 1}
    (flat,) = [n for n in _calls(result.graph, aten.reshape.default)
               if list(n.args[1]) == [forms.B, forms.L * forms.C]]
    assert flat.args[0].target.__name__ == "getitem"
    assert len(_calls(result.graph, aten.view.default)) == len(_calls(graph, aten.view.default)) - 1
    assert _relative_error(model(*inputs), result.graph.run(inputs, {})) <= FP32_RTOL


class _SummedQuery(forms._Projections):
    """two linears of the same input both make the query: not Q, K and V of a site."""

    def __init__(self):
        super().__init__()
        self.query_extra = nn.Linear(forms.C, forms.C)

    def forward(self, x):
        q, k, v = self.heads(x)
        extra = self.query_extra(x).view(forms.B, forms.L, forms.H, forms.E).transpose(1, 2)
        y = nn.functional.scaled_dot_product_attention(q + extra, k, v)
        return forms.merge(y)


def test_two_projections_into_one_operand_are_refused_with_a_reason():
    model = _SummedQuery().eval()
    inputs = forms.example_inputs(model)
    result = _run_pass(_prepared(model, inputs))
    assert not result.changed
    assert result.stats == {"refused: two projections feed the same attention operand": 1}
    assert len(_calls(result.graph, LINEAR)) == 4


def _zoo(name):
    pytest.importorskip("transformers")
    from slimline.models.zoo import build_zoo_model

    return build_zoo_model(f"hf-{name}", attn_implementation="eager")


# (model, pattern → count); the zoo has 2 layers; T5 and Whisper also cross-attend (K, V fused)
MODELS = [("gpt2", {}),  # c_attn is one projection already
          ("llama", {"fused_qkv": 2}), ("qwen2", {"fused_qkv": 2}),  # Qwen2: GQA widths 64, 32, 32
          ("bert", {"fused_qkv": 2}), ("vit", {"fused_qkv": 2}),
          ("t5", {"fused_qkv": 4, "fused_kv": 2}),
          ("whisper", {"fused_qkv": 4, "fused_kv": 2})]  # k_proj has no bias: a zero bias


@pytest.mark.parametrize("name, expected", MODELS, ids=[n for n, _ in MODELS])
def test_zoo_models_fuse_their_projections_exactly(name, expected):
    model, args, kwargs = _zoo(name)
    graph = _prepared(model, args, kwargs)
    result = _run_pass(graph)
    assert result.stats == expected
    fused = sum(expected.values())
    assert len(_calls(result.graph, aten.split_with_sizes.default)) == fused
    removed = sum(3 * v if k == "fused_qkv" else 2 * v for k, v in expected.items()) - fused
    assert len(_calls(result.graph, LINEAR)) == len(_calls(graph, LINEAR)) - removed
    assert all(d.module_path and not d.module_path.endswith(("q_proj", "query", "q"))
               for d in result.decisions), "named by the module the projections share"
    with torch.no_grad():
        assert _relative_error(model(*args, **kwargs), result.graph.run(args, kwargs)) <= FP32_RTOL


def test_mlp_siblings_are_not_projections():
    """Llama's gate_proj and up_proj read one input too, but feed no attention: left alone."""
    model, args, kwargs = _zoo("llama")
    result = _run_pass(_prepared(model, args, kwargs))
    paths = [module_path(n) for n in _calls(result.graph, LINEAR)]
    assert sum(p.endswith("mlp.gate_proj") for p in paths) == 2
    assert sum(p.endswith("mlp.up_proj") for p in paths) == 2
    assert not any(p.endswith(("q_proj", "k_proj", "v_proj")) for p in paths)


def test_dynamic_sequence_runs_at_new_lengths():
    model, args, kwargs = _zoo("qwen2")
    seq = torch.export.Dim("seq", min=2, max=128)
    graph = _prepared(model, args, kwargs, {"input_ids": {1: seq}, "attention_mask": {1: seq}})
    result = _run_pass(graph)
    assert result.stats == {"fused_qkv": 2}
    for length in (5, 40):
        ids = torch.randint(3, 256, (2, length), generator=torch.Generator().manual_seed(length))
        mask = torch.ones(2, length, dtype=torch.int64)
        with torch.no_grad():
            expected = model(input_ids=ids, attention_mask=mask).logits
            actual = result.graph.module(input_ids=ids, attention_mask=mask).logits
        assert _relative_error(expected, actual) <= FP32_RTOL


def test_pipeline_runs_fuse_qkv_after_fuse_attention():
    from slimline.models import REFERENCE_MODELS

    model, inputs = REFERENCE_MODELS["gpt-tiny"]()
    optimized = slimline.optimize(model, tuple(inputs), mode="lossless", target="cpu")
    names = [p.name for p in optimized.report.passes]
    assert names.index("fuse_qkv") == names.index("fuse_attention") + 1
    (record,) = [p for p in optimized.report.passes if p.name == "fuse_qkv"]
    assert record.status == "applied" and record.stats["fused_qkv"] == len(model.blocks)
    with torch.no_grad():
        assert _relative_error(model(*inputs), optimized(*inputs)) <= FP32_RTOL


@pytest.mark.parametrize("name", ["llama", "whisper"])
def test_onnx_export_has_one_projection_and_a_split_and_matches_in_onnxruntime(name, tmp_path):
    onnx_export = pytest.importorskip("slimline.backends.onnx_export")
    model, args, kwargs = _zoo(name)
    graph = _prepared(model, args, kwargs)
    before = onnx_export.export_onnx_model(graph.module, args, kwargs, tmp_path / "before.onnx", opset=23)
    result = _run_pass(graph)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        after = onnx_export.export_onnx_model(result.graph.module, args, kwargs, tmp_path / "after.onnx",
                                              opset=23)
    products = lambda info: info.op_histogram.get("MatMul", 0) + info.op_histogram.get("Gemm", 0)  # noqa: E731
    fused = sum(result.stats.values())
    removed = sum(3 * v if k == "fused_qkv" else 2 * v for k, v in result.stats.items()) - fused
    assert products(after) == products(before) - removed
    assert after.op_histogram.get("Split", 0) >= fused
    assert after.op_histogram.get("Attention") == before.op_histogram.get("Attention")
    assert after.output_checks and after.max_rel_error <= ORT_RTOL
