"""Compile candidates in parallel worker processes before they are measured.

Triton compiles a kernel config on its first launch, in the launching process, mostly holding the
GIL, so threads overlap little of it. Spawned worker processes each launch their share of the
candidates once on small stand-in tensors of the problem's shape (``compile_workload``); Triton
writes each compiled kernel to its disk cache, and the measuring process then loads them from
there instead of compiling. Jobs go out most expensive problem first, round-robin over the
workers; a worker starts no job past ``deadline``. Anything that fails here is simply left to
the measuring process, which reports it.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Sequence

__all__ = ["precompile"]


def _compile_jobs(jobs: list[tuple], deadline: float) -> dict:
    import torch

    from slimline.autotune.space import Candidate, Problem, family

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    workloads: dict = {}
    done = failed = skipped = 0
    for family_name, params, label, config in jobs:
        if time.time() > deadline:
            skipped += 1
            continue
        fam = family(family_name)
        problem = Problem(family_name, params)
        try:
            if problem not in workloads:
                workloads.clear()                   # jobs come grouped by problem: keep one
                workloads[problem] = fam.compile_workload(problem, device)
            workloads[problem].run(Candidate(label, config))()
            done += 1
        except Exception:  # noqa: BLE001 - the measuring process reports what does not compile
            failed += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {"compiled": done, "failed": failed, "skipped": skipped}


def precompile(jobs: Sequence[tuple], workers: int, deadline: float) -> dict:
    """Run ``(family, params, label, config)`` jobs in ``workers`` spawned processes."""
    jobs = list(jobs)
    started = time.time()
    summary = {"jobs": len(jobs), "workers": workers, "compiled": 0, "failed": 0, "skipped": 0}
    if not jobs or workers < 1:
        return dict(summary, seconds=0.0)
    chunks = [jobs[i::workers] for i in range(workers)]
    env_before = os.environ.get("TRITON_CACHE_DIR")
    try:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for result in pool.map(_compile_jobs, chunks, [deadline] * len(chunks)):
                for key in ("compiled", "failed", "skipped"):
                    summary[key] += result[key]
    except Exception as error:  # no worker processes here: the measuring process compiles instead
        summary["error"] = f"{type(error).__name__}: {str(error)[:200]}"
    finally:
        if env_before is not None:
            os.environ["TRITON_CACHE_DIR"] = env_before
    summary["seconds"] = time.time() - started
    return summary
