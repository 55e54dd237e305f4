"""Whole-process time of optimize(gpt-small, lossless, cpu, dynamic batch/seq): run with /usr/bin/time."""
import time
t0 = time.perf_counter()
import slimline
from slimline.models import REFERENCE_MODELS, reference_dynamic_shapes
model, inputs = REFERENCE_MODELS["gpt-small"]()
opt = slimline.optimize(model, inputs, target="cpu", mode="lossless",
                        dynamic_shapes=reference_dynamic_shapes("gpt-small"))
print({s.name: round(s.seconds, 2) for s in opt.report.stages})
print("in-process seconds", round(time.perf_counter() - t0, 1))
