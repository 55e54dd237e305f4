"""The command line: optimize writes report.json and model.onnx and prints the table."""

import json

import onnxruntime
import pytest

from slimline.cli import main


def test_optimize_writes_report_and_onnx(tmp_path, capsys):
    assert main(["optimize", "gpt-tiny", "--target", "cpu", "--mode", "lossless",
                 "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "slimline report" in printed and "verification: equivalent" in printed
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["symbols"] == ["batch", "seq"]
    linear = [layer for layer in report["layers"] if layer["op"] == "linear"]
    attention = [layer for layer in report["layers"] if layer["op"] == "attention"]
    fused_qkv = next(p for p in report["passes"] if p["name"] == "fuse_qkv")
    assert fused_qkv["status"] == "applied"
    # 5 blocks of (q, k, v fused into one), proj, up, down; and the head
    assert len(linear) == 5 * 4 + 1 and len(attention) == 5
    assert all(layer["module_path"] and "batch" in layer["flops_after"] for layer in linear + attention)
    assert all("seq**2" in layer["flops_after"] for layer in attention)
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["idx"]


def test_verify_command(capsys):
    assert main(["verify", "vit"]) == 0
    assert "verify: equivalent" in capsys.readouterr().out


def test_bad_model_spec_is_a_clear_error(capsys):
    assert main(["optimize", "no-such-model", "--no-onnx"]) == 2
    error = capsys.readouterr().err
    assert "slimline: error" in error and "gpt-small" in error


def test_bad_budget_text(capsys):
    assert main(["optimize", "vit", "--budget", "lots", "--no-onnx"]) == 2
    assert "--budget 1%" in capsys.readouterr().err


def test_unknown_target_lists_valid_ones(capsys):
    assert main(["optimize", "vit", "--target", "tpu", "--no-onnx"]) == 2
    assert "cpu, cuda, onnxruntime" in capsys.readouterr().err
