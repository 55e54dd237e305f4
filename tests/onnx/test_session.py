"""Session options: defaults, JSON, the measured choice (with a deterministic clock), the runner."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto
from onnx import helper as h

from slimline.onnx import session as session_module
from slimline.onnx.session import (SKIP_LAYER_NORM_FUSION, SessionSettings, TunedOrtModule,
                                   choose_settings, default_settings)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    graph = h.make_graph([h.make_node("Relu", ["x"], ["y"])], "g",
                         [h.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                         [h.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])])
    path = tmp_path_factory.mktemp("session") / "relu.onnx"
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 18)], ir_version=9), str(path))
    return path


def test_defaults_and_json_round_trip():
    settings = default_settings(threads=2)
    assert settings == SessionSettings(2, False, (SKIP_LAYER_NORM_FUSION,), "all")
    assert SessionSettings.from_json(settings.to_json()) == settings
    options = settings.options()
    assert options.intra_op_num_threads == 2
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert "2 threads, spinning off" in settings.describe()


@pytest.mark.parametrize("tune", ["off", "cache"])
def test_no_measurement_without_tuning(tiny_path, tune):
    choice = choose_settings(tiny_path, {"x": np.ones((1, 4), np.float32)}, tune)
    assert choice.source.startswith("default") and choice.measurements == []
    assert choice.settings == default_settings()


def _fake_clock(monkeypatch, medians_ms: dict):
    """Make measure() report fixed medians, by describe() text of each candidate."""
    def fake_measure(runs, budget_s, **_):
        for run in runs.values():
            run()  # the sessions really run once
        return {key: [medians_ms(key) / 1e3] * 5 for key in runs}
    monkeypatch.setattr(session_module, "measure", fake_measure)


def test_a_faster_candidate_must_beat_the_default_by_the_margin(tiny_path, monkeypatch):
    feed = {"x": np.ones((2, 4), np.float32)}
    # within the 5% margin: the default stays
    _fake_clock(monkeypatch, lambda key: 9.8 if "1 thread" in key or "extended" in key else 10.0)
    choice = choose_settings(tiny_path, feed, "lite", threads=None)
    assert choice.settings.graph_optimization_level == "all"
    assert choice.settings.intra_op_threads == default_settings().intra_op_threads
    # clearly faster: it wins, and every candidate's median is in the record
    _fake_clock(monkeypatch, lambda key: 5.0 if "extended" in key else 10.0)
    choice = choose_settings(tiny_path, feed, "lite", add_feeds_norm=True)
    assert choice.settings.graph_optimization_level == "extended"
    graph_stage = [m for m in choice.measurements if m["stage"] == "graph"]
    assert len(graph_stage) == 3 and sum(m["chosen"] for m in graph_stage) == 1
    assert choice.source == "measured"


def test_tuned_module_runs_numpy_and_torch(tiny_path):
    import torch

    runner = TunedOrtModule(tiny_path, SessionSettings(1))
    x = np.array([[-1.0, 2.0, -3.0, 4.0]], np.float32)
    np.testing.assert_array_equal(runner.run_feed({"x": x})[0], np.maximum(x, 0))
    torch.testing.assert_close(runner(torch.from_numpy(x)), torch.relu(torch.from_numpy(x)))
    assert "1 thread" in repr(runner)
