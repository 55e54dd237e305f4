"""slimline: an efficiency compiler for PyTorch models.

    opt = slimline.optimize(model, example_inputs, target="cpu", mode="lossless")
    opt(*example_inputs); print(opt.report.table())
    slimline.verify(model, opt, example_inputs)
    slimline.export_onnx(opt, "model.onnx")
"""

from slimline.api import OptimizedModel, export_onnx, optimize
from slimline.budget import Budget
from slimline.errors import (BackendError, CaptureError, ConfigError, ExportError, InputError,
                             PassError, SlimlineError, VerificationError)
from slimline.generate import generate
from slimline.verify import verify

__version__ = "0.1.0"

__all__ = ["optimize", "verify", "export_onnx", "generate", "Budget", "OptimizedModel", "SlimlineError",
           "InputError", "ConfigError", "CaptureError", "PassError", "VerificationError",
           "BackendError", "ExportError", "__version__"]
