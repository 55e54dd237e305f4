"""Monarch + a low-rank residual on gpt-small's MLP, against Monarch alone and SVD, at equal parameters.

    PYTHONPATH=. python3 benchmarks/monarch_residual_quality.py --out benchmarks/results/monarch_residual_quality.json

Issue 5's quality line asks for gpt-small's MLP layers at b=4 within 3 % bits/byte of dense after
recovery; session 1 measured +47.8 % after 100 recovery steps (+408 % projected, SVD at equal
parameters +31.2 %). This asks a narrower question, on the CPU and without recovery: at the same
parameter count, does a Monarch matrix with a smaller slab rank plus a low-rank residual
(``W ≈ M + U·V``, the residual ``W − M`` truncated by SVD) approximate the trained weights better
than Monarch alone or plain SVD? Two budgets: Monarch b=4 with the automatic slab rank (31 % of a
768×3072 layer's weights) and half the weights (``param_fraction=0.5``).

Each variant is plugged in as the dense matrix its factors compute (the quality of a structured
layer does not depend on how it is evaluated). Metrics: held-out stdlib bits/byte on the quick
slice (16,384 bytes) and the mean relative Frobenius error of the replaced weights.
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import json
import platform
import sys
import time
from pathlib import Path

import torch

from slimline.ir.capture import capture
from slimline.ir.graph import module_path
from slimline.monarch import monarch_shape, project
from slimline.passes import canonicalize_linear
from slimline.passes.base import PassContext

PATTERN, MLP_NAMES = "blocks.*.mlp.*", ("up", "down")


def monarch_plus_residual(weight: torch.Tensor, nblocks: int, slab_rank: int, budget: int) -> tuple[torch.Tensor, int]:
    """Monarch with ``slab_rank`` plus the residual's best rank-r part, r filling ``budget`` weights."""
    N, K = weight.shape
    shape = monarch_shape(K, N, nblocks, slab_rank=slab_rank)
    base = project(weight, shape).dense()[:N, :K]
    rank = max(0, (budget - shape.params) // (K + N))
    if rank == 0:
        return base, shape.params
    left, singular, right = torch.linalg.svd(weight - base, full_matrices=False)
    return base + (left[:, :rank] * singular[:rank]) @ right[:rank], shape.params + rank * (K + N)


def svd_at(weight: torch.Tensor, budget: int) -> tuple[torch.Tensor, int]:
    N, K = weight.shape
    rank = budget // (K + N)
    left, singular, right = torch.linalg.svd(weight, full_matrices=False)
    return (left[:, :rank] * singular[:rank]) @ right[:rank], rank * (K + N)


def variants(nblocks: int) -> list[tuple[str, object]]:
    """(label, weight → (approximation, params)) at the two budgets."""
    def auto(weight):
        N, K = weight.shape
        return monarch_shape(K, N, nblocks)

    def half(weight):
        N, K = weight.shape
        return monarch_shape(K, N, nblocks, param_fraction=0.5)

    found = []
    for budget_name, shape_of in (("b4-auto", auto), ("half", half)):
        def monarch_only(weight, shape_of=shape_of):
            shape = shape_of(weight)
            return project(weight, shape).dense()[: weight.shape[0], : weight.shape[1]], shape.params

        def svd(weight, shape_of=shape_of):
            return svd_at(weight, shape_of(weight).params)

        def mixed(fraction):
            def run(weight, shape_of=shape_of):
                shape = shape_of(weight)
                return monarch_plus_residual(weight, nblocks, max(1, int(shape.slab_rank * fraction)), shape.params)
            return run

        found += [(f"{budget_name} monarch", monarch_only), (f"{budget_name} svd", svd),
                  (f"{budget_name} monarch(T/2)+residual", mixed(0.5)),
                  (f"{budget_name} monarch(T/4)+residual", mixed(0.25))]
    return found


def replaced_copy(graph, approximate):
    trial = graph.copy()
    errors, params, dense = [], 0, 0
    for node in list(trial.fx.nodes):
        if node.op != "call_function" or node.target != torch.ops.aten.linear.default:
            continue
        path = module_path(node)
        if not fnmatch.fnmatchcase(path, PATTERN) or path.rsplit(".", 1)[-1] not in MLP_NAMES:
            continue
        weight = trial.attribute(node.args[1]).detach().double()
        approximation, count = approximate(weight)
        errors.append(float((approximation - weight).norm() / weight.norm()))
        params, dense = params + count, dense + weight.numel()
        node.args = (node.args[0], trial.add_parameter("approx", approximation.float(), before=node), *node.args[2:])
    trial.recompile()
    return trial, {"layers": len(errors), "mean_weight_error": sum(errors) / max(1, len(errors)),
                   "params": params, "dense_params": dense}


def table(report: dict) -> str:
    rows = report["rows"]
    lines = [f"gpt-small MLP (20 layers), b={report['nblocks']}, no recovery; {report['eval']}",
             "", "| variant | MLP weights kept | mean weight error | bits/byte | vs dense |", "|---|---|---|---|---|",
             f"| dense | 100 % | 0 | {rows['dense']['bits_per_byte']:.4f} | — |"]
    for label, row in rows.items():
        if label == "dense":
            continue
        lines.append(f"| {label} | {row['params'] / row['dense_params']:.1%} | {row['mean_weight_error']:.3f} | "
                     f"{row['bits_per_byte']:.4f} | {row['relative_change']:+.1%} |")
    lines += ["", f"`{report['command']}`, {report['date']}, torch {report['torch']}, 1 thread, "
              f"{report['seconds']:.0f} s"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from slimline.models import REFERENCE_MODELS, reference_dynamic_shapes
    from slimline.models.quality import bits_per_byte, text_eval_set, trained_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/monarch_residual_quality.json"))
    parser.add_argument("--nblocks", type=int, default=4)
    parser.add_argument("--only", nargs="*", default=None, help="labels to run (default: all)")
    parser.add_argument("--table-from", type=Path, default=None, help="print the table of a JSON result")
    args = parser.parse_args(argv)
    if args.table_from:
        print(table(json.loads(args.table_from.read_text())))
        return 0
    torch.set_num_threads(1)
    started = time.time()
    name = "gpt-small"
    model = trained_model(name).eval()
    _random, example = REFERENCE_MODELS[name]()
    graph = capture(model, example, dynamic_shapes=reference_dynamic_shapes(name))
    graph = canonicalize_linear.run(graph.copy(), canonicalize_linear.Config(), PassContext("cpu", "balanced")).graph
    eval_set = text_eval_set(name, quick=True, window=256, batch_size=8)

    def score(module) -> float:
        with torch.no_grad():
            return float(bits_per_byte(lambda *inputs: module(*inputs), eval_set))

    rows = {"dense": {"bits_per_byte": score(graph.module)}}
    print(f"dense {rows['dense']['bits_per_byte']:.4f} ({time.time() - started:.0f} s)", flush=True)
    for label, approximate in variants(args.nblocks):
        if args.only and label not in args.only:
            continue
        trial, info = replaced_copy(graph, approximate)
        rows[label] = dict(info, bits_per_byte=score(trial.module))
        rows[label]["relative_change"] = rows[label]["bits_per_byte"] / rows["dense"]["bits_per_byte"] - 1
        print(f"{label:<32} {rows[label]['bits_per_byte']:.4f} b/B {rows[label]['relative_change']:+.2%} "
              f"weight err {info['mean_weight_error']:.3f} params {info['params']}/{info['dense_params']} "
              f"({time.time() - started:.0f} s)", flush=True)
    report = {"benchmark": "monarch_residual_quality", "model": name, "nblocks": args.nblocks,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "python": platform.python_version(), "torch": torch.__version__, "threads": 1,
              "command": "PYTHONPATH=. python3 benchmarks/monarch_residual_quality.py " + " ".join(sys.argv[1:]),
              "eval": "held-out stdlib text, quick slice (16384 bytes), window 256",
              "recovery": "none", "rows": rows, "seconds": time.time() - started}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from slimline.fileio import atomic_write_text
    atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    atomic_write_text(args.out.with_suffix(".md"), table(report))
    print(table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
