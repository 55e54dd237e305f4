"""ONNX in: optimize(path, target="onnxruntime") on files from the legacy and the dynamo exporter,
and clear errors for files slimline cannot take.

Shape letters: B batch, S sequence, D width, H heads, E head width.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import slimline
from slimline.errors import ConfigError, InputError
from slimline.onnx_in import optimize_onnx
from slimline.onnx.session import SessionSettings

VOCAB, D, H, LAYERS = 50, 32, 4, 2


class TinyEncoder(nn.Module):
    """A post-LayerNorm BERT-like encoder with attention written out by hand (eager style)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.layers = nn.ModuleList(nn.ModuleDict({
            "qkv": nn.Linear(D, 3 * D), "proj": nn.Linear(D, D), "norm1": nn.LayerNorm(D),
            "up": nn.Linear(D, 2 * D), "down": nn.Linear(2 * D, D), "norm2": nn.LayerNorm(D)})
            for _ in range(LAYERS))

    def forward(self, input_ids, attention_mask):
        x = self.embed(input_ids)  # (B, S, D)
        b, s, _ = x.shape
        bias = (1.0 - attention_mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        for layer in self.layers:
            q, k, v = layer["qkv"](x).split(D, dim=-1)
            q, k, v = (t.view(b, s, H, D // H).transpose(1, 2) for t in (q, k, v))  # (B, H, S, E)
            scores = q @ k.transpose(-1, -2) / math.sqrt(D // H) + bias
            attended = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, D)
            x = layer["norm1"](x + layer["proj"](attended))
            x = layer["norm2"](x + layer["down"](torch.nn.functional.gelu(layer["up"](x))))
        return x


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return TinyEncoder().eval()


def _inputs(batch, length, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.int64)
    mask[-1, length - 2:] = 0
    return ids, mask


@pytest.fixture(scope="module")
def exported(encoder, tmp_path_factory):
    """The encoder exported by torch's legacy exporter (opset 17) and by the dynamo one (18)."""
    folder = tmp_path_factory.mktemp("onnx-in")
    args = _inputs(2, 16)
    legacy, dynamo = folder / "legacy" / "model.onnx", folder / "dynamo" / "model.onnx"
    legacy.parent.mkdir()
    dynamo.parent.mkdir()
    names = ["input_ids", "attention_mask"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(encoder, args, str(legacy), dynamo=False, opset_version=17,
                          input_names=names, output_names=["hidden"],
                          dynamic_axes={n: {0: "batch", 1: "sequence"} for n in names})
        batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
        program = torch.onnx.export(encoder, args, dynamo=True, opset_version=18,
                                    input_names=names, output_names=["hidden"], verbose=False,
                                    dynamic_shapes={n: {0: batch, 1: sequence} for n in names})
        program.save(str(dynamo), external_data=True)
    return {"legacy": legacy, "dynamo": dynamo}


def _kernels(path: Path, settings: SessionSettings, tmp_path: Path) -> int:
    """Nodes in the graph onnxruntime runs after its own optimizations."""
    options = settings.options()
    optimized = tmp_path / f"ort-{path.parent.name}-{settings.graph_optimization_level}.onnx"
    options.optimized_model_filepath = str(optimized)
    import onnxruntime as ort
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                         disabled_optimizers=list(settings.disabled_optimizers))
    return len(onnx.load(str(optimized), load_external_data=False).graph.node)


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_exported_file_goes_through_and_gets_leaner(exporter, exported, encoder, tmp_path):
    source = exported[exporter]
    opt = slimline.optimize(source, target="onnxruntime", tune="off", workdir=tmp_path)
    report = opt.report
    assert report.verification["passed"] and report.verification["samples"] == 2
    assert {p.name: p.status for p in report.passes}["fuse_attention"] == "applied"
    fused = next(p for p in report.passes if p.name == "fuse_attention")
    assert fused.stats["rewrites"] == LAYERS
    export = report.export
    assert export["opset"] == 24 and export["source_opset"] == (17 if exporter == "legacy" else 18)
    assert "converted from" in export["opset_source"]
    assert export["dynamic_axes"]["input_ids"] == export["source_dynamic_axes"]["input_ids"]
    assert export["op_histogram"].get("Softmax", 0) == 0 and export["op_histogram"]["Attention"] == LAYERS
    assert (export["external_data_path"] is not None) == (exporter == "dynamo")
    # still the model: torch's numbers at a batch and length never seen before
    ids, mask = _inputs(3, 7, seed=1)
    with torch.no_grad():
        expected = encoder(ids, mask)
    np.testing.assert_allclose(opt(ids, mask).numpy(), expected.numpy(), rtol=1e-4, atol=1e-5)
    # leaner in onnxruntime: fewer kernels than ORT makes of the source file with its defaults
    ours = _kernels(opt.path, SessionSettings.from_json(export["onnxruntime_session"]["settings"]),
                    tmp_path)
    theirs = _kernels(source, SessionSettings(1, disabled_optimizers=()), tmp_path)
    assert ours < theirs


def test_given_inputs_model_proto_and_numpy_calls(exported, tmp_path):
    proto = onnx.load(str(exported["legacy"]))
    ids, mask = (t.numpy() for t in _inputs(1, 5))
    opt = optimize_onnx(proto, {"input_ids": ids, "attention_mask": mask}, tune="off",
                        output=tmp_path / "out.onnx")
    assert opt.report.export["inputs"] == [{"generated": False,
                                           "shapes": {"input_ids": [1, 5], "attention_mask": [1, 5]}}]
    assert opt.path == tmp_path / "out.onnx" and opt.path.exists()
    hidden = opt(input_ids=ids, attention_mask=mask)
    assert isinstance(hidden, np.ndarray) and hidden.shape == (1, 5, D)


def test_rules_can_be_narrowed_and_lossy_modes_say_so(exported, tmp_path):
    opt = slimline.optimize(exported["legacy"], target="onnxruntime", tune="off", workdir=tmp_path,
                            passes=["unfuse_skip_layer_norm"], mode="balanced")
    assert [p.name for p in opt.report.passes] == ["unfuse_skip_layer_norm"]
    assert opt.report.export["opset"] == 17  # no attention fusion asked for: no conversion
    assert any("no approximate ONNX-level pass" in note for note in opt.report.notes)


# ---------------------------------------------------------------------------------------------
# errors


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_corrupt_file(tmp_path):
    path = _write(tmp_path / "noise.onnx", np.random.default_rng(0).bytes(4096))
    with pytest.raises(InputError, match="corrupt or truncated|not a valid ONNX|holds no graph"):
        slimline.optimize(path, target="onnxruntime", tune="off")


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_file(exported, tmp_path, keep):
    data = exported["legacy"].read_bytes()
    path = _write(tmp_path / "cut.onnx", data[: int(len(data) * keep)])
    with pytest.raises(InputError) as caught:
        slimline.optimize(path, target="onnxruntime", tune="off")
    assert caught.value.stage == "load" and "cut.onnx" in str(caught.value)


def test_empty_file_and_directory(tmp_path):
    with pytest.raises(InputError, match="empty"):
        slimline.optimize(_write(tmp_path / "empty.onnx", b""), target="onnxruntime")
    folder = tmp_path / "folder.onnx"
    folder.mkdir()
    with pytest.raises(InputError, match="directory"):
        slimline.optimize(str(folder), target="onnxruntime")
    with pytest.raises(InputError, match="no ONNX file"):
        slimline.optimize(tmp_path / "absent.onnx", target="onnxruntime")


def test_missing_and_truncated_external_data(exported, tmp_path):
    source = exported["dynamo"]
    data = Path(str(source) + ".data")
    model = _write(tmp_path / "model.onnx", source.read_bytes())
    with pytest.raises(InputError, match="external data file .* is missing") as caught:
        slimline.optimize(model, target="onnxruntime", tune="off")
    assert "copy the .data file" in caught.value.hint
    _write(tmp_path / data.name, data.read_bytes()[:-100])
    with pytest.raises(InputError, match="is truncated"):
        slimline.optimize(model, target="onnxruntime", tune="off")


@pytest.mark.parametrize("version, words", [(99, "unsupported opset 99"), (5, "unsupported opset 5")])
def test_unsupported_opset(exported, tmp_path, version, words):
    proto = onnx.load(str(exported["legacy"]), load_external_data=False)
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = version
    path = tmp_path / "opset.onnx"
    onnx.save(proto, str(path))
    with pytest.raises(InputError, match=words):
        slimline.optimize(path, target="onnxruntime", tune="off")


def test_option_errors(exported):
    with pytest.raises(ConfigError, match="target='onnxruntime'"):
        slimline.optimize(exported["legacy"], target="cpu")
    with pytest.raises(ConfigError, match="unknown ONNX rule"):
        slimline.optimize(exported["legacy"], target="onnxruntime", passes=["lowrank"])
    with pytest.raises(InputError, match="missing \\['attention_mask'\\]"):
        slimline.optimize(exported["legacy"], {"input_ids": np.zeros((1, 4), np.int64)},
                          target="onnxruntime", tune="off")
