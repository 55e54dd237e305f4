"""Compile candidates in parallel worker processes before they are measured.

Triton compiles a kernel config on its first launch, in the launching process, mostly holding the
GIL, so threads overlap little of it. Worker processes (``python -m slimline.autotune.precompile``,
started fresh: they never re-run the user's script) each launch their share of the candidates once
on stand-in tensors of the problem's shape (``compile_workload``); Triton writes each compiled
kernel to its disk cache, and the measuring process then loads them from there instead of
compiling. Jobs go out most expensive problem first, round-robin over the workers; a worker starts
no job past ``deadline``. Anything that fails here is left to the measuring process, which
reports it. Jobs travel as JSON (family name, problem parameters, candidate label and config).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

__all__ = ["precompile"]


def _compile_jobs(jobs: list, deadline: float) -> dict:
    import torch

    from slimline.autotune.space import Candidate, Problem, family

    def pairs(items) -> tuple:
        return tuple((key, value) for key, value in items)

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    workloads: dict = {}
    done = failed = skipped = 0
    for family_name, params, label, config in jobs:
        if time.time() > deadline:
            skipped += 1
            continue
        fam = family(family_name)
        problem = Problem(family_name, pairs(params))
        try:
            if problem not in workloads:
                workloads.clear()                   # jobs come grouped by problem: keep one
                workloads[problem] = fam.compile_workload(problem, device)
            workloads[problem].run(Candidate(label, pairs(config)))()
            done += 1
        except Exception:  # noqa: BLE001 - the measuring process reports what does not compile
            failed += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {"compiled": done, "failed": failed, "skipped": skipped}


def precompile(jobs: Sequence[tuple], workers: int, deadline: float) -> dict:
    """Run ``(family, params, label, config)`` jobs in ``workers`` fresh worker processes."""
    jobs = [[name, list(map(list, params)), label, list(map(list, config))] for name, params, label, config in jobs]
    started = time.time()
    summary = {"jobs": len(jobs), "workers": workers, "compiled": 0, "failed": 0, "skipped": 0}
    if not jobs or workers < 1:
        return dict(summary, seconds=0.0)
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    processes = []
    with tempfile.TemporaryDirectory(prefix="slimline_precompile_") as scratch:
        try:
            for index in range(workers):
                chunk = jobs[index::workers]
                if not chunk:
                    continue
                path = Path(scratch) / f"jobs{index}.json"
                path.write_text(json.dumps({"jobs": chunk, "deadline": deadline}))
                processes.append(subprocess.Popen([sys.executable, "-m", "slimline.autotune.precompile", str(path)],
                                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True))
            for process in processes:
                # a worker finishes the compile it started at the deadline; allow for that, then stop it
                remaining = max(5.0, deadline - time.time() + 60.0)
                try:
                    output, _ = process.communicate(timeout=remaining)
                    result = json.loads(output.strip().splitlines()[-1])
                    for key in ("compiled", "failed", "skipped"):
                        summary[key] += result[key]
                except (subprocess.TimeoutExpired, ValueError, IndexError):
                    process.kill()
                    process.wait()
                    summary["lost_workers"] = summary.get("lost_workers", 0) + 1
        except OSError as error:  # no worker processes here: the measuring process compiles instead
            summary["error"] = f"{type(error).__name__}: {str(error)[:200]}"
            for process in processes:
                if process.poll() is None:
                    process.kill()
    summary["seconds"] = time.time() - started
    return summary


if __name__ == "__main__":
    request = json.loads(Path(sys.argv[1]).read_text())
    print(json.dumps(_compile_jobs(request["jobs"], request["deadline"])), flush=True)
