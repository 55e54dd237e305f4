"""The onnxruntime target: export, ONNX rules checked against torch, tuned session options.

Shape letters: B batch, S sequence, D width, H heads, E head width.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimline
from slimline.backends import ort_target
from slimline.ir.capture import capture
from slimline.onnx import attention_heads_3d
from slimline.onnx.session import SessionSettings, TunedOrtModule

D, H = 32, 4


class Block(nn.Module):
    """Post-LayerNorm attention block calling SDPA with a padding mask (BERT-shaped)."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D)
        self.norm = nn.LayerNorm(D)

    def forward(self, x_BSD, mask_BS):
        b, s, _ = x_BSD.shape
        q, k, v = (t.view(b, s, H, D // H).transpose(1, 2) for t in self.qkv(x_BSD).split(D, -1))
        keep = mask_BS[:, None, None, :].bool().expand(b, 1, s, s)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)  # (B, H, S, E)
        return self.norm(x_BSD + self.proj(attended.transpose(1, 2).reshape(b, s, D)))


@pytest.fixture(scope="module")
def block():
    torch.manual_seed(0)
    x = torch.randn(2, 8, D)
    mask = torch.ones(2, 8, dtype=torch.int64)
    mask[1, 6:] = 0
    return Block().eval(), (x, mask)


@pytest.fixture(scope="module")
def graph(block):
    model, args = block
    return capture(model, args, {})


def _ops(path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def test_build_applies_rules_checked_against_torch(block, graph, tmp_path):
    model, args = block
    runner, facts = ort_target.build(graph, tmp_path, tune="off")
    summary = facts["export"]
    rules = {rule["name"]: rule for rule in summary["onnx_rules"]}
    assert rules["attention_heads_3d"]["rewrites"] == 1
    assert summary["rewrite_status"] == "applied"
    assert all(check["passed"] for check in summary["rewrite_check"])
    ops = _ops(tmp_path / "model.onnx")
    assert ops["Attention"] == 1 and "Transpose" not in ops  # head split and merge are gone
    assert isinstance(runner, TunedOrtModule)
    assert runner.settings == SessionSettings.from_json(summary["onnxruntime_session"]["settings"])
    assert summary["onnxruntime_session"]["source"].startswith("default")
    assert "SkipLayerNormFusion" in runner.settings.disabled_optimizers
    with torch.no_grad():
        torch.testing.assert_close(runner(*args), model(*args), rtol=1e-4, atol=1e-5)
    assert "1 ONNX rewrite" in facts["runtime"]


def test_a_rewrite_that_breaks_the_numbers_is_rolled_back(block, graph, tmp_path, monkeypatch):
    model, args = block
    original_replace = attention_heads_3d.replace

    def wrong_scale(onnx_model, site):
        original_replace(onnx_model, site)
        for node in onnx_model.graph:
            if node.op_type == "Attention":
                node.attributes["scale"] = ir.AttrFloat32("scale", 2.0)

    monkeypatch.setattr(attention_heads_3d, "replace", wrong_scale)
    runner, facts = ort_target.build(graph, tmp_path, tune="off")
    summary = facts["export"]
    assert summary["rewrite_status"] == "rolled back"
    assert "max abs error" in summary["rewrite_problem"]
    assert "Transpose" in _ops(tmp_path / "model.onnx")  # the export as it was
    with torch.no_grad():
        torch.testing.assert_close(runner(*args), model(*args), rtol=1e-4, atol=1e-5)


def test_optimize_measures_session_options(block, tmp_path):
    model, args = block
    opt = slimline.optimize(model, args, target="onnxruntime", workdir=tmp_path)
    session = opt.report.export["onnxruntime_session"]
    assert session["source"] == "measured" and session["load_average"] is not None
    stages = {m["stage"] for m in session["measurements"]}
    assert stages == {"threads", "graph"} or stages == {"graph"}  # one core: nothing to choose
    assert all(m["median_ms"] > 0 for m in session["measurements"] if "median_ms" in m)
    assert opt.report.verification["passed"]
    with torch.no_grad():
        torch.testing.assert_close(opt(*args), model(*args), rtol=1e-4, atol=1e-5)
