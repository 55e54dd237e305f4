"""The autotuner: device-derived search spaces, a measurement protocol, a persistent cache.

    from slimline.autotune import KernelInstance, Problem, tune
    records = tune([KernelInstance("layers.0.mlp.down_proj", Problem.make("dense_matmul", M=1,
                    N=2048, K=5632, dtype="bf16"), calls=16)], mode="lite", time_budget_s=60)

Modules: :mod:`~slimline.autotune.cache` (the JSON cache), :mod:`~slimline.autotune.space`
(devices, families, candidates), :mod:`~slimline.autotune.measure` (the protocol),
:mod:`~slimline.autotune.tuner` (budget and records).
"""

from slimline.autotune.cache import DeviceFingerprint, TuningCache
from slimline.autotune.measure import CpuTimer, Protocol, measure
from slimline.autotune.space import FAMILIES, H200, Candidate, DeviceLimits, Problem, family
from slimline.autotune.tuner import TUNE_MODES, KernelInstance, TuneRecord, report_rows, tune

__all__ = ["tune", "KernelInstance", "TuneRecord", "report_rows", "TUNE_MODES", "Problem", "Candidate",
           "DeviceLimits", "H200", "FAMILIES", "family", "TuningCache", "DeviceFingerprint", "Protocol",
           "CpuTimer", "measure"]
