"""The generic ``optimize(target="cuda")`` path on a GPU: gpt-small, lossless, checked and timed.

One run: ``slimline.optimize`` (capture, exact passes, the CUDA backend: Inductor + CUDA graphs),
its own final verification against the float32 reference, then the optimized model against the
eager model on the GPU (median of CUDA-event timings, interleaved). Writes JSON.

    PYTHONPATH=. python benchmarks/cuda_optimize_smoke.py --out $OUT/cuda_optimize_smoke.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
import traceback

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt-small")
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--out", default="cuda_optimize_smoke.json")
    args = parser.parse_args()

    import slimline
    from slimline.models import REFERENCE_MODELS

    model, example = REFERENCE_MODELS[args.model](weights=args.model)
    model = model.eval()
    result: dict = {"benchmark": "cuda_optimize_smoke", "model": args.model,
                    "date": datetime.datetime.now().isoformat(timespec="seconds"),
                    "device": torch.cuda.get_device_name(), "torch": torch.__version__}
    begin = time.perf_counter()
    try:
        optimized = slimline.optimize(model, example, target="cuda", mode="lossless")
    except Exception as error:
        result["failed"] = f"{type(error).__name__}: {error}"[:1000]
        result["traceback"] = traceback.format_exc()[-3000:]
        print(result["failed"])
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=1)
        return 1
    result["optimize_seconds"] = time.perf_counter() - begin
    report = optimized.report
    result["stages"] = [[s.name, s.status, round(s.seconds, 2), s.detail[:200]] for s in report.stages]
    result["passes"] = {p.name: p.status for p in report.passes}
    result["verification"] = report.verification.get("verdict") if report.verification else None
    gpu_model = model.cuda()
    gpu_inputs = tuple(t.cuda() for t in example)
    with torch.no_grad():
        eager_out = gpu_model(*gpu_inputs)
        slim_out = optimized(*example)
    eager_logits = eager_out[0] if isinstance(eager_out, tuple) else eager_out
    slim_logits = slim_out[0] if isinstance(slim_out, tuple) else slim_out
    difference = (slim_logits.float().to(eager_logits.device) - eager_logits.float()).abs().max()
    result["max_abs_vs_eager_gpu"] = float(difference)
    result["max_abs_eager"] = float(eager_logits.float().abs().max())
    calls = {"eager": lambda: gpu_model(*gpu_inputs), "slimline": lambda: optimized(*example)}
    samples = {name: [] for name in calls}
    with torch.no_grad():
        for _ in range(3):
            for call in calls.values():
                call()
        for _ in range(args.rounds):
            for name, call in calls.items():
                torch.cuda.synchronize()
                start = time.perf_counter()
                call()
                torch.cuda.synchronize()
                samples[name].append((time.perf_counter() - start) * 1e3)
    result["ms"] = {name: statistics.median(s) for name, s in samples.items()}
    result["eager_over_slimline"] = result["ms"]["eager"] / result["ms"]["slimline"]
    print(json.dumps(result, indent=1))
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
