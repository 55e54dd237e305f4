"""fuse_attention: hand-written attention → one ``aten.scaled_dot_product_attention`` per site.

Structural (which nodes go, which come, what the report counts) and numerical (original vs fused
on the example inputs, fp32 relative error ≤ 1e-5; ONNX Runtime ≤ 1e-4) on:
  - tiny modules, one per form the pass matches (``attention_models.py``) and per near-miss;
  - slimline's reference GPT / BERT / ViT;
  - transformers GPT-2, BERT, ViT, Llama, Qwen2, Mistral, Mixtral (GQA), T5, Whisper from the
    zoo (``slimline.models.zoo``), eager attention.
"""

import functools
import math
import warnings

import pytest
import torch

import slimline
from slimline.ir.capture import capture
from slimline.ir.graph import PROVENANCE_PASS, module_path
from slimline.passes import fuse_attention
from slimline.passes.base import PassContext
from tests.passes import attention_models as forms

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
SOFTMAXES = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
FP32_RTOL = 1e-5
ORT_RTOL = 1e-4


def _run_pass(module, inputs, config=None):
    graph = capture(module, inputs)
    result = fuse_attention.run(graph.copy(), config or fuse_attention.Config(),
                                PassContext("cpu", "lossless"))
    return graph, result


def _calls(graph, *targets):
    return [n for n in graph.fx.nodes if n.op == "call_function" and (not targets or n.target in targets)]


def _relative_error(expected, actual) -> float:
    expected = [t for t in torch.utils._pytree.tree_leaves(expected) if isinstance(t, torch.Tensor)
                and t.is_floating_point()]
    actual = [t for t in torch.utils._pytree.tree_leaves(actual) if isinstance(t, torch.Tensor)
              and t.is_floating_point()]
    assert len(expected) == len(actual) and expected
    return max(((a - e).abs().max() / e.abs().max()).item() for e, a in zip(expected, actual))


# ---------------------------------------------------------------------------------------------
# forms: each becomes exactly one SDPA call, with the same numbers


FORMS = [
    (forms.ScaledMasked, "fused_scaled_mask"),
    (forms.DividedBoolFill, "fused_scaled_mask"),
    (forms.WhereKeepMinimum, "fused_scaled_bias"),
    (forms.Einsum, "fused_scaled"),
    (forms.Batched3d, "fused_scaled_mask"),
    (forms.RepeatKV, "fused_scaled_gqa"),
    (forms.MultiQueryBroadcast, "fused_scaled"),
    (forms.RowMaxShifted, "fused_scaled"),
]


@pytest.mark.parametrize("form, pattern", FORMS, ids=[f.__name__ for f, _ in FORMS])
def test_form_becomes_one_sdpa_and_stays_exact(form, pattern):
    model = form().eval()
    inputs = forms.example_inputs(model)
    graph, result = _run_pass(model, inputs)

    assert len(_calls(graph, *SOFTMAXES)) == 1
    assert result.changed and result.stats[pattern] == 1 and result.stats["near_miss"] == 0
    assert _calls(result.graph, *SOFTMAXES) == []
    assert _calls(result.graph, aten.matmul.default, aten.bmm.default, aten.baddbmm.default,
                  aten.einsum.default) == []
    (fused,) = _calls(result.graph, SDPA)
    assert fused.meta[PROVENANCE_PASS] == "fuse_attention"
    assert fused.meta["val"].dim() == 4, "ONNX Attention takes 4-D operands"
    (decision,) = result.decisions
    assert decision.decision == "fused → sdpa" and decision.op == "attention" and not decision.why_not
    assert _relative_error(model(*inputs), result.graph.run(inputs, {})) <= FP32_RTOL


def test_scaled_masked_before_and_expected():
    """Before: matmul, mul, add(mask), softmax, matmul.  Expected: sdpa(q, k, v, mask, scale);
    the mask is the constant causal one, so with constant masks on: sdpa(q, k, v, is_causal)."""
    model = forms.ScaledMasked().eval()
    graph, result = _run_pass(model, forms.example_inputs(model),
                              fuse_attention.Config(constant_masks=False))
    before = [n.target for n in _calls(graph)]
    assert [t for t in before if t in (aten.matmul.default, aten.mul.Tensor, aten.add.Tensor,
                                       aten.softmax.int)] == \
        [aten.matmul.default, aten.mul.Tensor, aten.add.Tensor, aten.softmax.int, aten.matmul.default]

    (fused,) = _calls(result.graph, SDPA)
    query, key, value = fused.args
    assert fused.kwargs["scale"] == pytest.approx(forms.E ** -0.5)
    assert "enable_gqa" not in fused.kwargs
    # the model's own tensors go in: q and k as the model shaped them (no transpose back), and
    # its (L, S) causal mask as is (already full length, no expand needed)
    assert query.target == aten.transpose.int and key.target == aten.transpose.int
    assert fused.kwargs["attn_mask"].target == aten.triu.default
    assert "is_causal" not in fused.kwargs and result.stats["causal_from_mask"] == 0

    _graph, causal = _run_pass(model, forms.example_inputs(model))
    (fused,) = _calls(causal.graph, SDPA)
    assert [a.target for a in fused.args] == [query.target, key.target, value.target]
    assert fused.kwargs["attn_mask"] is None and fused.kwargs["is_causal"] is True
    assert _calls(causal.graph, aten.triu.default) == [], "the mask's subgraph is gone"


def test_grouped_query_attention_gets_unrepeated_kv():
    model = forms.RepeatKV().eval()
    inputs = forms.example_inputs(model)
    _graph, result = _run_pass(model, inputs)
    (fused,) = _calls(result.graph, SDPA)
    assert fused.kwargs["enable_gqa"] is True
    assert fused.args[1].meta["val"].shape[1] == 2 and fused.args[2].meta["val"].shape[1] == 2
    assert _calls(result.graph, aten.expand.default) == [], "repeat_kv's copies are gone"

    _graph, kept = _run_pass(model, inputs, fuse_attention.Config(unrepeat_kv=False))
    (fused,) = _calls(kept.graph, SDPA)
    assert "enable_gqa" not in fused.kwargs and fused.args[1].meta["val"].shape[1] == forms.H
    assert kept.stats["fused_scaled"] == 1
    assert _relative_error(model(*inputs), kept.graph.run(inputs, {})) <= FP32_RTOL


def test_padding_mask_expanded_to_full_query_length():
    """ORT's CPU Attention rejects a (B, 1, 1, S) mask: the pass gives it (B, 1, L, S)."""
    model = forms.DividedBoolFill().eval()
    _graph, result = _run_pass(model, forms.example_inputs(model))
    (fused,) = _calls(result.graph, SDPA)
    assert tuple(fused.kwargs["attn_mask"].meta["val"].shape) == (forms.B, 1, forms.L, forms.L)
    assert fused.kwargs["attn_mask"].meta["val"].dtype == torch.float32


def test_existing_sdpa_counted_and_normalized():
    model = forms.AlreadySdpa().eval()
    inputs = forms.example_inputs(model)
    _graph, result = _run_pass(model, inputs)
    assert result.stats["already_sdpa"] == 1 and result.stats["normalized_sdpa"] == 1
    assert not any(k.startswith("fused_") for k in result.stats)
    (node,) = _calls(result.graph, SDPA)
    mask = node.args[3] if len(node.args) > 3 else node.kwargs["attn_mask"]
    assert tuple(mask.meta["val"].shape) == (forms.B, 1, forms.L, forms.L)
    assert [d.decision for d in result.decisions] == ["already sdpa"]
    assert _relative_error(model(*inputs), result.graph.run(inputs, {})) == 0.0


# ---------------------------------------------------------------------------------------------
# constant masks: causal -> is_causal=True, all zero -> no mask, anything else stays


CONSTANT_MASKS = [
    (forms.ScaledMasked, "causal_from_mask"),
    (forms.CausalFill, "causal_from_mask"),
    (forms.CausalBoolSdpa, "causal_from_mask"),
    (forms.ZeroMask, "zero_mask_dropped"),
    (forms.EmptyFilled, "zero_mask_dropped"),
    (forms.WrittenAfterView, "mask kept: mutated in place"),
    (forms.SlidingWindow, "mask kept: not causal"),
    (forms.ShiftedCausal, "mask kept: not causal"),
    (forms.ModerateCausal, "mask kept: not causal"),
    (forms.WhereKeepMinimum, "mask kept: not causal"),     # causal fill + a learned bias
    (forms.DividedBoolFill, "mask kept: depends on data"),  # padding from an input
    (forms.AlreadySdpa, "mask kept: depends on data"),
]


@pytest.mark.parametrize("form, counter", CONSTANT_MASKS, ids=[f.__name__ for f, _ in CONSTANT_MASKS])
def test_constant_mask_goes_or_stays_exactly(form, counter):
    model = form().eval()
    inputs = forms.example_inputs(model)
    _graph, result = _run_pass(model, inputs)
    assert result.stats[counter] == 1
    others = {"causal_from_mask", "zero_mask_dropped"} - {counter}
    assert all(result.stats[other] == 0 for other in others)
    assert not [k for k in result.stats if k.startswith("mask kept") and k != counter]
    (fused,) = _calls(result.graph, SDPA)
    mask = fused.args[3] if len(fused.args) > 3 else fused.kwargs.get("attn_mask")
    causal = fused.args[5] if len(fused.args) > 5 else fused.kwargs.get("is_causal", False)
    assert (mask is None) == (counter in ("causal_from_mask", "zero_mask_dropped"))
    assert causal is (counter == "causal_from_mask")
    assert "mask_sampled_sizes" not in result.stats, "static shapes: checked at the one size"
    assert _relative_error(model(*inputs), result.graph.run(inputs, {})) <= FP32_RTOL


def _causal_lm(name: str, sequence: int | None = None):
    """A zoo causal LM (eager attention) called with input_ids only: its mask is built from sizes."""
    model, args, _kwargs, sites = _transformers_model(name)
    input_ids = args[0] if sequence is None else args[0][:, :sequence]
    return model, input_ids, sites


def _logits(module, input_ids):
    with torch.no_grad():
        return module(input_ids).logits


CAUSAL_LMS = [("gpt2", False), ("gpt2", True), ("llama", False), ("llama", True),
              ("qwen2", False), ("qwen2", True)]


@pytest.mark.parametrize("name, dynamic", CAUSAL_LMS,
                         ids=[f"{n}-{'dynamic' if d else 'static'}" for n, d in CAUSAL_LMS])
def test_causal_lm_gets_is_causal_on_every_site(name, dynamic):
    """No attention_mask: transformers builds the causal mask from sizes (arange, compares,
    index); every site gets is_causal=True and no mask. Dynamic sequence 2..128: checked at
    every accepted length (exhaustive), then run at lengths it was not captured with."""
    from slimline.models.zoo import MAX_POSITIONS

    model, input_ids, sites = _causal_lm(name)
    dynamic_shapes = {"input_ids": {1: torch.export.Dim("seq", min=2, max=MAX_POSITIONS)}} \
        if dynamic else None
    graph = capture(model, (input_ids,), {}, dynamic_shapes=dynamic_shapes)
    result = fuse_attention.run(graph.copy(), fuse_attention.Config(), PassContext("cpu", "lossless"))
    assert result.stats["causal_from_mask"] == sites
    assert "mask_sampled_sizes" not in result.stats, "proven at every length, not sampled"
    fused = _calls(result.graph, SDPA)
    assert len(fused) == sites
    assert all(n.kwargs["is_causal"] is True and n.kwargs["attn_mask"] is None for n in fused)
    assert _calls(result.graph, aten.where.ScalarOther, aten.where.self) == [], "the mask is gone"
    lengths = [input_ids.shape[1]] + ([2, 7, MAX_POSITIONS] if dynamic else [])
    for length in lengths:
        ids = torch.randint(3, 256, (input_ids.shape[0], length), generator=torch.Generator().manual_seed(length))
        assert _relative_error(_logits(model, ids), _logits(result.graph.module, ids)) <= FP32_RTOL


def test_causal_lm_through_optimize_reports_is_causal():
    model, input_ids, sites = _causal_lm("gpt2")
    optimized = slimline.optimize(model, (input_ids,), mode="lossless", target="cpu")
    (record,) = [p for p in optimized.report.passes if p.name == "fuse_attention"]
    assert record.status == "applied" and record.stats["causal_from_mask"] == sites
    assert all(n.kwargs.get("is_causal") for n in _calls(optimized.graph, SDPA))
    assert _relative_error(_logits(model, input_ids), optimized(input_ids).logits) <= FP32_RTOL


def test_batch_and_sequence_dynamic_is_sampled_and_counted():
    """Batch 2..64 × sequence 2..128 is too many combinations to check each: the mask is checked
    at a sample of sizes, and the stats say so."""
    from slimline.models.zoo import MAX_POSITIONS

    model, input_ids, sites = _causal_lm("gpt2")
    dynamic_shapes = {"input_ids": {0: torch.export.Dim("batch", max=64),
                                    1: torch.export.Dim("seq", min=2, max=MAX_POSITIONS)}}
    graph = capture(model, (input_ids,), {}, dynamic_shapes=dynamic_shapes)
    result = fuse_attention.run(graph.copy(), fuse_attention.Config(), PassContext("cpu", "lossless"))
    assert result.stats["causal_from_mask"] == sites and result.stats["mask_sampled_sizes"] == sites
    ids = torch.randint(3, 256, (5, 33), generator=torch.Generator().manual_seed(5))
    assert _relative_error(_logits(model, ids), _logits(result.graph.module, ids)) <= FP32_RTOL


@pytest.mark.parametrize("sequence, maximum, mask_check_sizes, counter", [
    (16, None, 256, "mask kept: not causal"),                 # 16 > window 8: not causal here
    (4, None, 256, "causal_from_mask"),                       # 4 <= window 8, static: causal
    (4, 15, 256, "mask kept: not causal at every size"),      # 2..15 crosses the window: proven
    (4, 15, 8, "mask kept: not causal at every size"),        # the same, sampled sizes
], ids=["seq16", "seq4-static", "seq4-dynamic-exhaustive", "seq4-dynamic-sampled"])
def test_sliding_window_is_causal_only_where_the_window_covers_every_length(
        sequence, maximum, mask_check_sizes, counter):
    """Mistral's window of 8 keys: causal for sequences up to 8, not beyond."""
    model, input_ids, sites = _causal_lm("mistral", sequence)
    dynamic_shapes = {"input_ids": {1: torch.export.Dim("seq", min=2, max=maximum)}} if maximum else None
    graph = capture(model, (input_ids,), {}, dynamic_shapes=dynamic_shapes)
    config = fuse_attention.Config(mask_check_sizes=mask_check_sizes)
    result = fuse_attention.run(graph.copy(), config, PassContext("cpu", "lossless"))
    assert result.stats[counter] == sites
    fused = _calls(result.graph, SDPA)
    assert all((n.kwargs["attn_mask"] is None) == (counter == "causal_from_mask") for n in fused)
    lengths = [sequence] + ([12] if maximum else [])
    for length in lengths:
        ids = torch.randint(3, 256, (2, length), generator=torch.Generator().manual_seed(length))
        assert _relative_error(_logits(model, ids), _logits(result.graph.module, ids)) <= FP32_RTOL


def test_reference_gpt_cache_steps_keep_their_masks():
    """Prefill (T queries against the whole Tm-slot cache, mask from arange: constant, but
    L != S) and decode (1 query, mask from the input_pos input: data) keep their masks."""
    from slimline.models import GPT, GPTConfig, GPTDecode, GPTPrefill

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        gpt = GPT(GPTConfig(context_length=32, n_layer=2, n_head=2, d_model=32)).eval()
    generator = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 256, (1, 8), generator=generator)
    k_cache, v_cache = gpt.new_kv_cache(batch_size=1)
    with torch.no_grad():
        _, k_cache, v_cache = GPTPrefill(gpt)(prompt, k_cache, v_cache)
    steps = [(GPTPrefill(gpt), (prompt, *gpt.new_kv_cache(batch_size=1)),
              "mask kept: not zero, and query and key lengths differ"),
             (GPTDecode(gpt), (torch.randint(0, 256, (1, 1), generator=generator),
                               torch.tensor([8]), k_cache, v_cache), "mask kept: depends on data")]
    for step, inputs, counter in steps:
        _graph, result = _run_pass(step.eval(), inputs)
        assert result.stats[counter] == len(gpt.blocks) and result.stats["causal_from_mask"] == 0
        assert all(n.kwargs["attn_mask"] is not None for n in _calls(result.graph, SDPA))
        with torch.no_grad():
            assert _relative_error(step(*inputs), result.graph.run(inputs, {})) <= FP32_RTOL


# ---------------------------------------------------------------------------------------------
# near-misses: left alone, with the reason in the report


NEAR_MISSES = [
    (forms.ScoreDependentMask, "mask depends on data"),
    (forms.SoftmaxOverQueries, "softmax not over the last dim"),
    (forms.ReturnsProbabilities, "probabilities are also used outside"),
    (forms.ModerateFill, "not -inf"),
    (forms.SoftCapped, "soft-capped"),
]


@pytest.mark.parametrize("form, why", NEAR_MISSES, ids=[f.__name__ for f, _ in NEAR_MISSES])
def test_near_miss_is_kept_with_a_reason(form, why):
    model = form().eval()
    inputs = forms.example_inputs(model)
    graph, result = _run_pass(model, inputs)
    assert not result.changed and result.stats["near_miss"] == 1
    assert _calls(result.graph, SDPA) == [] and len(_calls(result.graph, *SOFTMAXES)) == 1
    (decision,) = result.decisions
    assert decision.decision == "kept" and decision.op == "attention"
    assert why in decision.why_not
    assert [n.target for n in result.graph.fx.nodes] == [n.target for n in graph.fx.nodes]


def test_near_miss_reaches_the_report():
    model = forms.ScoreDependentMask().eval()
    optimized = slimline.optimize(model, forms.example_inputs(model), mode="lossless", target="cpu")
    attention = [layer for layer in optimized.report.layers if layer.op == "attention"]
    assert len(attention) == 1 and "mask depends on data" in attention[0].why_not


# ---------------------------------------------------------------------------------------------
# whole models, through slimline.optimize


def _transformers_model(name: str):
    """A zoo model (tiny transformers architecture, eager attention), its inputs, its site count."""
    pytest.importorskip("transformers")
    from slimline.models.zoo import build_zoo_model

    model, args, kwargs = build_zoo_model(f"hf-{name}", attn_implementation="eager")
    config = model.config
    if config.is_encoder_decoder:  # encoder self-attention; decoder self- and cross-attention
        encoder = getattr(config, "encoder_layers", None) or config.num_layers
        decoder = getattr(config, "decoder_layers", None) or config.num_decoder_layers
        return model, args, kwargs, encoder + 2 * decoder
    return model, args, kwargs, config.num_hidden_layers


def _reference_model(name: str):
    from slimline.models import REFERENCE_MODELS

    model, inputs = REFERENCE_MODELS[name]()
    return model, tuple(inputs), {}, len(model.blocks)


@functools.lru_cache(maxsize=None)
def _optimized(source: str, name: str):
    build = _reference_model if source == "reference" else _transformers_model
    model, args, kwargs, sites = build(name)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimized = slimline.optimize(model, (args, kwargs), mode="lossless", target="cpu")
    return model, args, kwargs, sites, optimized


MODELS = [("reference", "gpt-tiny"), ("reference", "bert"), ("reference", "vit"),
          ("transformers", "gpt2"), ("transformers", "bert"), ("transformers", "vit"),
          ("transformers", "llama"), ("transformers", "qwen2"), ("transformers", "mistral"),
          ("transformers", "mixtral"), ("transformers", "t5"), ("transformers", "whisper")]


# constant masks the zoo's example inputs leave: the reference GPT's causal bias; ViT's all-zero
# mask; Whisper's decoder self-attention (no decoder attention_mask). The others read
# attention_mask (padding), or are not causal (T5's position bias), or have no mask.
CONSTANT_MASK_SITES = {("reference", "gpt-tiny"): ("causal_from_mask", 5),
                       ("transformers", "vit"): ("zero_mask_dropped", 2),
                       ("transformers", "whisper"): ("causal_from_mask", 2)}


@pytest.mark.parametrize("source, name", MODELS, ids=[f"{s}-{n}" for s, n in MODELS])
def test_every_attention_site_fuses_exactly(source, name):
    model, args, kwargs, sites, optimized = _optimized(source, name)
    (record,) = [p for p in optimized.report.passes if p.name == "fuse_attention"]
    assert record.status == "applied", record.reason
    fused = sum(v for k, v in record.stats.items() if k.startswith("fused_"))
    assert fused == sites and record.stats["near_miss"] == 0
    if name in ("qwen2", "mistral", "mixtral"):  # the zoo's Llama is MHA, these GQA 4:2
        assert record.stats["fused_scaled_mask_gqa"] == sites
    if name == "t5":
        assert record.stats["fused_unscaled_bias"] == sites  # no scaling; relative bias + mask
    counter, count = CONSTANT_MASK_SITES.get((source, name), (None, 0))
    for key in ("causal_from_mask", "zero_mask_dropped"):
        assert record.stats[key] == (count if key == counter else 0), key

    graph = optimized.graph
    assert len(_calls(graph, SDPA)) == sites
    left = _calls(graph, *SOFTMAXES)
    if name == "mixtral":  # the routers' softmax over experts stays, and is no near-miss
        assert len(left) == model.config.num_hidden_layers
        assert all("attn" not in module_path(n) for n in left)
    else:
        assert left == [], "these models have no softmax outside attention"
    layers = [layer for layer in optimized.report.layers if layer.op == "attention"]
    assert len(layers) == sites and all(layer.decision == "fused → sdpa" for layer in layers)
    assert len({layer.module_path for layer in layers}) == sites, "one line per attention module"
    assert all(module_path(n) for n in _calls(graph, SDPA))
    with torch.no_grad():
        assert _relative_error(model(*args, **kwargs), optimized(*args, **kwargs)) <= FP32_RTOL


@pytest.mark.parametrize("name, opset", [("gpt2", 23), ("bert", 23), ("qwen2", 23), ("llama", None)])
def test_onnx_export_holds_attention_and_matches_in_onnxruntime(name, opset, tmp_path):
    """Opset 23 is the first with Attention; None is the exporter's default (24 here)."""
    onnx_export = pytest.importorskip("slimline.backends.onnx_export")
    model, args, kwargs, sites, optimized = _optimized("transformers", name)
    graph = optimized.graph
    info = onnx_export.export_onnx_model(graph.module, args, kwargs, tmp_path / f"{name}.onnx",
                                         opset=opset)
    assert info.opset >= 23
    assert info.op_histogram.get("Attention") == sites
    assert "Softmax" not in info.op_histogram
    assert info.output_checks and info.max_rel_error <= ORT_RTOL
    _check_in_onnxruntime(tmp_path / f"{name}.onnx", model, args, kwargs)


def _check_in_onnxruntime(path, model, args, kwargs):
    """Run the file ourselves: inputs in torch.export's flat order, first output vs torch."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    flat = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), flat)}
    first = session.run(None, feeds)[0]
    with torch.no_grad():
        expected = torch.utils._pytree.tree_leaves(model(*args, **kwargs))[0]
    error = (torch.from_numpy(first) - expected).abs().max() / expected.abs().max()
    assert error.item() <= ORT_RTOL
    assert math.isfinite(error.item())


@pytest.mark.parametrize("name, opset, dynamic", [("gpt2", 23, False), ("qwen2", None, True)],
                         ids=["gpt2-opset23-static", "qwen2-gqa-default-opset-dynamic"])
def test_onnx_export_of_is_causal_runs_in_onnxruntime(name, opset, dynamic, tmp_path):
    """SDPA(is_causal=True) exports as Attention(is_causal=1) with no mask input, which ORT's CPU
    kernel runs (GQA included), matching torch; a dynamic sequence also at a new length."""
    onnx_export = pytest.importorskip("slimline.backends.onnx_export")
    import onnx
    import onnxruntime

    from slimline.models.zoo import MAX_POSITIONS

    model, input_ids, sites = _causal_lm(name)
    dynamic_shapes = {"input_ids": {1: torch.export.Dim("seq", min=2, max=MAX_POSITIONS)}} \
        if dynamic else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimized = slimline.optimize(model, (input_ids,), mode="lossless", target="cpu",
                                      dynamic_shapes=dynamic_shapes)
    assert all(n.kwargs.get("is_causal") for n in _calls(optimized.graph, SDPA))
    path = tmp_path / f"{name}.onnx"
    info = onnx_export.export_onnx_model(optimized.graph.module, (input_ids,), {}, path,
                                         dynamic_shapes=dynamic_shapes, opset=opset)
    assert info.op_histogram.get("Attention") == sites and "Softmax" not in info.op_histogram
    assert info.output_checks and info.max_rel_error <= ORT_RTOL
    attention = [n for n in onnx.load(str(path)).graph.node if n.op_type == "Attention"]
    assert all({a.name: a.i for a in n.attribute}.get("is_causal") == 1 for n in attention)
    assert all(len(n.input) < 4 or n.input[3] == "" for n in attention), "no mask input"

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for length in [input_ids.shape[1]] + ([9] if dynamic else []):
        ids = torch.randint(3, 256, (2, length), generator=torch.Generator().manual_seed(length))
        logits = session.run(None, {session.get_inputs()[0].name: ids.numpy()})[0]
        assert _relative_error(_logits(model, ids), torch.from_numpy(logits)) <= ORT_RTOL


def test_dynamic_batch_and_sequence(tmp_path):
    """Reference BERT's (B, 1, 1, S) padding mask is expanded to a symbolic query length; the
    export runs in ORT at a shape it was not captured with."""
    onnx_export = pytest.importorskip("slimline.backends.onnx_export")
    import onnxruntime

    from slimline.models import REFERENCE_MODELS

    model, inputs = REFERENCE_MODELS["bert"]()
    batch, seq = torch.export.Dim("batch", max=64), torch.export.Dim("seq", max=512)
    dynamic = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    optimized = slimline.optimize(model, inputs, dynamic_shapes=dynamic)
    fused = _calls(optimized.graph, SDPA)
    assert len(fused) == len(model.blocks)
    mask = fused[0].kwargs["attn_mask"]
    assert mask.target == aten.expand.default
    assert any(getattr(size, "target", None) == aten.sym_size.int for size in mask.args[1])

    path = tmp_path / "bert.onnx"
    info = onnx_export.export_onnx_model(optimized.graph.module, inputs, {}, path,
                                         dynamic_shapes=dynamic, opset=23)
    assert info.op_histogram.get("Attention") == len(model.blocks)
    input_ids = torch.randint(1, 256, (3, 20))
    attention_mask = torch.ones(3, 20, dtype=torch.int64)
    attention_mask[2, 9:] = 0
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    (embeddings,) = session.run(None, dict(zip(names, (input_ids.numpy(), attention_mask.numpy()))))
    with torch.no_grad():
        expected = model(input_ids, attention_mask)
    assert _relative_error(expected, optimized(input_ids, attention_mask)) <= FP32_RTOL
    assert _relative_error(expected, torch.from_numpy(embeddings)) <= ORT_RTOL
