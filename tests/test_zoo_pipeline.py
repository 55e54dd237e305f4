"""Every zoo architecture and reference model through slimline's whole lossless path.

capture → optimize(mode="lossless", target="cpu") → verify against the original (relative error
≤ 1e-5, fp32) → export_onnx → run in onnxruntime and compare with the original (≤ 1e-4).
"""

from __future__ import annotations

import pytest
import torch
import torch.utils._pytree as pytree

import slimline
from slimline.backends.onnxruntime import load_ort_module
from slimline.models import REFERENCE_MODELS
from slimline.models.zoo import ZOO, build_zoo_model

pytest.importorskip("transformers")

REFERENCE = ["gpt-tiny", "bert", "vit", "mixer", "hyena", "gpt-small-decode"]


def _relative_errors(expected, actual) -> list[float]:
    expected = [t for t in pytree.tree_leaves(expected) if isinstance(t, torch.Tensor)]
    actual = [t for t in pytree.tree_leaves(actual) if isinstance(t, torch.Tensor)]
    assert len(expected) == len(actual)
    errors = []
    for e, a in zip(expected, actual):
        assert e.shape == a.shape
        if not e.is_floating_point():
            assert torch.equal(e, a)
            continue
        scale = e.abs().max().clamp_min(1e-30)
        errors.append(float((a.double() - e.double()).abs().max() / scale))
    return errors


def _build(name):
    if name in REFERENCE_MODELS:
        model, args = REFERENCE_MODELS[name]()
        return model, args, {}
    return build_zoo_model(name)


@pytest.mark.parametrize("name", sorted(ZOO) + REFERENCE)
def test_lossless_cpu_then_onnxruntime(name, tmp_path):
    model, args, kwargs = _build(name)
    with torch.no_grad():
        expected = model(*args, **kwargs)
    opt = slimline.optimize(model, (args, kwargs), target="cpu", mode="lossless", name=name)

    assert opt.report.verification["passed"], opt.report.verification["verdict"]
    assert max(_relative_errors(expected, opt(*args, **kwargs))) <= 1e-5
    assert slimline.verify(model, opt, (args, kwargs)).passed
    assert opt.report.to_json()["layers"], "every model here has linear layers in the report"

    info = slimline.export_onnx(opt, tmp_path / f"{name}.onnx")
    assert (tmp_path / f"{name}.onnx").exists() and info["opset"] >= 18
    ort_model = load_ort_module(tmp_path / f"{name}.onnx")
    ort_out = ort_model(*args, **kwargs)
    assert max(_relative_errors(expected, ort_out)) <= 1e-4
