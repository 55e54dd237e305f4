"""ONNX-level rewrites for onnxruntime, and onnxruntime session options chosen by measurement.

One rule per file (``fuse_attention``, ``attention_heads_3d``, ``unfuse_skip_layer_norm``);
:mod:`slimline.onnx.pipeline` lists them in the order they run; :mod:`slimline.onnx.session`
chooses and applies session options. ``slimline.backends.ort_target`` uses them on slimline's
own exports, ``slimline.onnx_in`` on ONNX files from any exporter.
"""

from slimline.onnx.base import RuleResult
from slimline.onnx.pipeline import RULE_NAMES, RULES, run_rules
from slimline.onnx.session import (SessionChoice, SessionSettings, TunedOrtModule,
                                   choose_settings, default_settings)

__all__ = ["RULES", "RULE_NAMES", "RuleResult", "run_rules", "SessionSettings", "SessionChoice",
           "TunedOrtModule", "choose_settings", "default_settings"]
