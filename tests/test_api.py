"""The public flow: optimize → run → verify → report, and what bad input gets."""

import json
import pytest
import torch

import slimline
from slimline.errors import (BackendError, CaptureError, ConfigError, InputError, SlimlineError)
from tests.small_models import DataDependent, MatmulMLP


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_lossless_cpu_flow_is_exact_and_reports_every_linear():
    model = MatmulMLP().eval()
    x = torch.randn(2, 5, 8)
    opt = slimline.optimize(model, (x,), target="cpu", mode="lossless",
                            dynamic_shapes={"x": {0: "batch", 1: "seq"}})
    torch.testing.assert_close(opt(x), model(x), rtol=1e-5, atol=1e-6)
    other = torch.randn(3, 7, 8)  # dynamic dims really are dynamic
    torch.testing.assert_close(opt(other), model(other), rtol=1e-5, atol=1e-6)
    report = opt.report.to_json()
    assert report["symbols"] == ["batch", "seq"]
    linears = [layer for layer in report["layers"] if layer["op"] == "linear"]
    assert len(linears) == 3
    assert all("batch" in layer["flops_after"] and "seq" in layer["flops_after"] for layer in linears)
    assert report["verification"]["passed"] and report["verification"]["verdict"].startswith("equivalent")
    assert [s["name"] for s in report["stages"]][:3] == ["check inputs", "reference run", "capture"]
    json.dumps(report)  # serialisable


def test_verify_uses_exact_vocabulary_for_lossless():
    model = MatmulMLP().eval()
    x = torch.randn(2, 3, 8)
    opt = slimline.optimize(model, (x,))
    result = slimline.verify(model, opt, (torch.randn(2, 3, 8),))
    assert result.passed and result.exact
    assert "equivalent" in result.verdict


def test_static_capture_refuses_other_sizes_clearly():
    model = MatmulMLP().eval()
    opt = slimline.optimize(model, (torch.randn(2, 3, 8),))
    with pytest.raises(InputError, match="dynamic_shapes"):
        opt(torch.randn(4, 3, 8))


def test_users_model_is_not_modified_bit_for_bit():
    model = MatmulMLP().eval()
    x = torch.randn(2, 5, 8)
    before_state, before_out = _state(model), model(x).detach().clone()
    opt = slimline.optimize(model, (x,), target="cpu")
    opt(x)
    after = _state(model)
    assert before_state.keys() == after.keys()
    for key in before_state:
        assert torch.equal(before_state[key], after[key]), key
    assert torch.equal(model(x), before_out)
    assert not model.training or model.training == before_out.requires_grad


def test_training_flags_are_restored_module_by_module():
    model = MatmulMLP().train()
    model.fc.eval()  # a mixed state must come back exactly
    slimline.optimize(model, (torch.randn(1, 2, 8),))
    assert model.training and not model.fc.training


def test_model_in_train_mode_is_captured_for_inference():
    class WithDropout(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 8)
            self.drop = torch.nn.Dropout(0.5)

        def forward(self, x):
            return self.drop(self.fc(x))

    model = WithDropout().train()
    x = torch.randn(4, 8)
    opt = slimline.optimize(model, (x,))
    torch.testing.assert_close(opt(x), model.eval()(x))


@pytest.mark.parametrize("bad_model", [lambda x: x, "model.pt", None])
def test_not_a_module(bad_model):
    with pytest.raises(InputError, match="nn.Module"):
        slimline.optimize(bad_model, (torch.randn(2),))


def test_inputs_of_wrong_type():
    with pytest.raises(InputError, match="example inputs"):
        slimline.optimize(MatmulMLP(), 3.0)


def test_inputs_of_wrong_shape_name_the_module():
    with pytest.raises(InputError) as info:
        slimline.optimize(MatmulMLP(), (torch.randn(2, 5, 7),))
    assert "fc" in str(info.value) and "shape" in str(info.value)


def test_too_many_inputs():
    with pytest.raises(InputError, match="do not fit"):
        slimline.optimize(MatmulMLP(), (torch.randn(2, 5, 8), torch.randn(1)))


def test_data_dependent_control_flow_is_a_capture_error():
    with pytest.raises(CaptureError) as info:
        slimline.optimize(DataDependent(), (torch.randn(2, 4),))
    assert "data-dependent" in str(info.value)
    assert info.value.stage == "capture" and info.value.hint


def test_nan_in_weights_is_reported_by_name():
    model = MatmulMLP()
    with torch.no_grad():
        model.w3[0, 0] = float("nan")
    with pytest.raises(InputError, match="w3"):
        slimline.optimize(model, (torch.randn(2, 5, 8),))


def test_inf_in_inputs_is_reported():
    x = torch.randn(2, 5, 8)
    x[0, 0, 0] = float("inf")
    with pytest.raises(InputError, match="NaN or inf"):
        slimline.optimize(MatmulMLP(), (x,))


@pytest.mark.parametrize("option, value, listed", [
    ("target", "tpu", "cpu, cuda, onnxruntime"),
    ("mode", "fast", "lossless, balanced, max"),
    ("passes", ["no_such_pass"], "canonicalize_linear"),
    ("tune", "forever", "lite, max, cache, off"),
])
def test_unknown_options_list_the_valid_ones(option, value, listed):
    with pytest.raises(ConfigError) as info:
        slimline.optimize(MatmulMLP(), (torch.randn(1, 2, 8),), **{option: value})
    assert listed in str(info.value)


def test_cuda_target_without_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(BackendError, match="GPU"):
        slimline.optimize(MatmulMLP(), (torch.randn(1, 2, 8),), target="cuda")


def test_bad_budget():
    with pytest.raises(ConfigError, match="max_loss"):
        slimline.Budget(metric="cosine", max_loss=5)
    with pytest.raises(ConfigError, match="unknown budget metric"):
        slimline.Budget(metric="vibes", max_loss=0.1)


def test_every_error_is_a_slimline_error():
    for error in (InputError, ConfigError, CaptureError, BackendError, slimline.ExportError,
                  slimline.VerificationError, slimline.PassError):
        assert issubclass(error, SlimlineError)


def test_report_json_written_atomically_and_unwritable_path(tmp_path):
    opt = slimline.optimize(MatmulMLP(), (torch.randn(1, 2, 8),))
    path = tmp_path / "out" / "report.json"
    opt.report.write_json(path)
    assert json.loads(path.read_text())["schema_version"] == 1
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(InputError, match="cannot create directory"):
        opt.report.write_json(blocker / "sub" / "report.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "out"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["report.json"]  # no temp files left


def test_low_precision_model_is_judged_against_a_float32_copy():
    model = MatmulMLP().to(torch.bfloat16).eval()
    x = torch.randn(2, 5, 8, dtype=torch.bfloat16)
    opt = slimline.optimize(model, (x,))
    stages = {s.name: s.detail for s in opt.report.stages}
    assert "float32 reference" in stages["reference run"]
    assert opt.report.verification["passed"]
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())  # the user's model untouched
    torch.testing.assert_close(opt(x), model(x), rtol=2e-2, atol=2e-2)


def test_capture_error_names_the_submodule():
    class Outer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = torch.nn.Sequential(torch.nn.Linear(4, 4))
            self.router = DataDependent()

        def forward(self, x):
            return self.router(self.encoder(x))

    with pytest.raises(CaptureError) as info:
        slimline.optimize(Outer(), (torch.randn(2, 4),))
    assert "'router'" in str(info.value)
