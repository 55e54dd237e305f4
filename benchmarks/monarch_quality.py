"""Monarch on trained models: what b=4 costs in task quality, against SVD at equal parameters.

    PYTHONPATH=. python3 benchmarks/monarch_quality.py --out benchmarks/results/monarch_quality_cpu.json

For each trained reference model whose checkpoint exists (the digits ViT, gpt-tiny, gpt-small),
on CPU, one run:

* ``dense``            the captured model (its metric should match the model card);
* ``monarch``          every MLP linear (``up``/``down``) projected onto Monarch with b=4, T=min(P,S)/b
                       (slimline's ``monarch`` pass with ``gate="none"``, ``include`` = the MLP);
* ``monarch+recover``  the same, then the pass's recovery (feature distillation of the factors
                       on calibration data disjoint from the scored data);
* ``svd``              the same layers replaced by their truncated SVD with as many weights
                       (rank b·T) — the low-rank alternative the gate compares against;
* ``gated``            the pass as the pipeline runs it (``svd+budget``, the balanced budget):
                       which layers it converts and why the others stay dense.

Metrics: digits test accuracy (360 images; target ≥ 96 %); held-out stdlib bits/byte on the
quick slice (gpt-tiny: 65,536 bytes, gpt-small: 16,384) with relative change against dense
(issue target for gpt-small after recovery: ≤ 3 %). Calibration: digits train images; for the GPTs,
validation windows after the scored slice. Per-layer Monarch and SVD output errors are listed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

from slimline.ir.capture import capture
from slimline.models.checkpoint import CHECKPOINT_DIR
from slimline.monarch import lowrank_equal_params_rank, monarch_shape
from slimline.passes import canonicalize_linear, monarch
from slimline.passes.base import PassContext

MODELS = {"vit": "blocks.*.*", "gpt-tiny": "blocks.*.mlp.*", "gpt-small": "blocks.*.mlp.*"}
MLP_NAMES = ("up", "down")


def _prepare(name: str, calibration_count: int):
    """(model, captured graph, calibration samples, scored eval set, metric name, metric function)."""
    from slimline.models import REFERENCE_MODELS, reference_dynamic_shapes
    from slimline.models.quality import (QUICK_BYTES, TextEvalSet, accuracy, bits_per_byte, digits_eval_set,
                                         digits_split, held_out_text, text_eval_set, trained_model)

    model = trained_model(name).eval()
    _random, example = REFERENCE_MODELS[name]()
    graph = capture(model, example, dynamic_shapes=reference_dynamic_shapes(name))
    graph = canonicalize_linear.run(graph.copy(), canonicalize_linear.Config(),
                                    PassContext("cpu", "balanced")).graph
    if name == "vit":
        images = digits_split()["train_images"]
        samples = [((images[i * 64:(i + 1) * 64],), {}) for i in range(calibration_count)]
        return model, graph, samples, digits_eval_set("test", batch_size=64), "accuracy", accuracy
    window = model.config.context_length if hasattr(model, "config") else 256
    window = min(window, 256)
    scored = QUICK_BYTES[name]
    rest = held_out_text()[scored + 1:]
    calibration = TextEvalSet.from_bytes(rest, window, batch_size=4, max_bytes=4 * window * calibration_count)
    samples = [((calibration.windows[i * 4:(i + 1) * 4, :-1],), {}) for i in range(calibration_count)]
    eval_set = text_eval_set(name, quick=True, window=window, batch_size=8)
    return model, graph, samples, eval_set, "bits_per_byte", bits_per_byte


def _svd_copy(graph, pattern: str, nblocks: int):
    """The graph with every matched MLP weight replaced by its truncated SVD at Monarch's parameters."""
    import fnmatch

    from slimline.ir.graph import module_path

    trial = graph.copy()
    aten = torch.ops.aten
    replaced = 0
    for node in list(trial.fx.nodes):
        if node.op != "call_function" or node.target != aten.linear.default:
            continue
        path = module_path(node)
        if not fnmatch.fnmatchcase(path, pattern) or path.rsplit(".", 1)[-1] not in MLP_NAMES:
            continue
        weight = trial.attribute(node.args[1]).detach().double()
        shape = monarch_shape(weight.shape[1], weight.shape[0], nblocks)
        rank = lowrank_equal_params_rank(shape)
        left, singular, right = torch.linalg.svd(weight, full_matrices=False)
        approximation = ((left[:, :rank] * singular[:rank]) @ right[:rank]).to(weight.dtype)
        node.args = (node.args[0], trial.add_parameter("svd_trial", approximation.float(), before=node),
                     *node.args[2:])
        replaced += 1
    trial.recompile()
    return trial, replaced


def _include(pattern: str) -> tuple:
    return tuple(f"{pattern.rsplit('.', 1)[0]}.{name}" for name in MLP_NAMES)


def run_model(name: str, nblocks: int, recover_steps: int, calibration_count: int, log) -> dict:
    started = time.time()
    model, graph, samples, eval_set, metric_name, metric = _prepare(name, calibration_count)
    with torch.no_grad():
        references = [model(*args, **kwargs) for args, kwargs in samples]
    context = PassContext("cpu", "balanced", calibration=samples, budget_share=1.0,
                          reference_outputs=references)
    include = _include(MODELS[name])
    rows = {}

    def measure(label: str, module) -> float:
        # the exported GraphModule reports training=True (it was captured in eval mode, and its
        # .eval() raises): the metrics get a plain callable instead
        with torch.no_grad():
            value = float(metric(lambda *inputs: module(*inputs), eval_set))
        rows[label] = {metric_name: value}
        log(f"  {name:<10} {label:<18} {metric_name} {value:.4f}  ({time.time() - started:.0f} s)")
        return value

    dense = measure("dense", graph.module)
    forced = monarch.Config(nblocks=nblocks, gate="none", include=include, min_params=0)
    plain = monarch.run(graph.copy(), forced, context)
    measure("monarch", plain.graph.module)
    layers = [{"layer": d.module_path, "decision": d.decision, "monarch_error": d.error,
               "svd_error": d.svd_error, "svd_rank": d.svd_rank, "params_before": d.params_before,
               "params_after": d.params_after, "how": d.how}
              for d in plain.decisions if d.decision.startswith("converted")]
    rows["monarch"].update(converted=plain.stats["converted"],
                           mlp_params_before=sum(l["params_before"] for l in layers),
                           mlp_params_after=sum(l["params_after"] for l in layers))
    if recover_steps:
        recovered = monarch.run(graph.copy(), monarch.Config(nblocks=nblocks, gate="none", include=include,
                                                             min_params=0, recover=recover_steps,
                                                             recover_lr=3e-3), context)
        measure("monarch+recover", recovered.graph.module)
        rows["monarch+recover"].update({k: v for k, v in recovered.stats.items() if k.startswith("recover")})
    svd_graph, replaced = _svd_copy(graph, MODELS[name], nblocks)
    measure("svd", svd_graph.module)
    rows["svd"]["replaced"] = replaced
    gated = monarch.run(graph.copy(), monarch.Config(nblocks=nblocks, include=include), context)
    measure("gated", gated.graph.module)
    rows["gated"].update(converted=gated.stats["converted"],
                         reasons=sorted({str(d.why_not) for d in gated.decisions if d.why_not}))
    higher = metric_name == "accuracy"
    for label, row in rows.items():
        value = row[metric_name]
        row["relative_change"] = (value - dense) / abs(dense)
        row["worse_by"] = (dense - value) / abs(dense) if higher else (value - dense) / abs(dense)
    return {"model": name, "metric": metric_name, "nblocks": nblocks, "eval": eval_set.description
            if hasattr(eval_set, "description") else "", "calibration_samples": len(samples),
            "rows": rows, "layers": layers, "seconds": time.time() - started}


def _table(results: list) -> str:
    lines = ["Monarch b=4 on the MLP layers of trained models (CPU)",
             f"{'model':<10}{'variant':<18}{'metric':>16}{'vs dense':>10}  notes", "-" * 72]
    for result in results:
        if "error" in result:
            lines.append(f"{result['model']:<10}{'—':<18}{'':>16}{'':>10}  {result['error'][:60]}")
            continue
        for label, row in result["rows"].items():
            value = row[result["metric"]]
            shown = f"{value:.2%}" if result["metric"] == "accuracy" else f"{value:.4f} b/B"
            notes = ""
            if label == "monarch":
                notes = f"{row['converted']} layers, MLP weights {row['mlp_params_before']}→{row['mlp_params_after']}"
            elif label == "gated":
                notes = f"{row['converted']} converted"
            elif label == "monarch+recover":
                notes = f"{row.get('recover_steps')} steps"
            lines.append(f"{result['model']:<10}{label:<18}{shown:>16}{row['relative_change']:>+10.2%}  {notes}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/monarch_quality_cpu.json"))
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--nblocks", type=int, default=4)
    parser.add_argument("--recover", type=int, default=100, help="recovery steps (0: skip)")
    parser.add_argument("--calibration", type=int, default=8, help="calibration batches")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (more is slower on a shared CPU)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    started = time.time()
    results = []
    for name in args.models:
        if not (CHECKPOINT_DIR / f"{name}.safetensors").exists():
            results.append({"model": name, "error": "no trained checkpoint yet"})
            print(f"{name}: no trained checkpoint in {CHECKPOINT_DIR}", flush=True)
            continue
        try:
            results.append(run_model(name, args.nblocks, args.recover, args.calibration, print))
        except Exception as error:  # one model's failure must not lose the others
            results.append({"model": name, "error": f"{type(error).__name__}: {error}"[:400]})
            print(f"{name}: FAILED {type(error).__name__}: {error}", flush=True)
    report = {"benchmark": "monarch_quality", "date": datetime.datetime.now(datetime.timezone.utc)
              .isoformat(timespec="seconds"), "python": platform.python_version(), "torch": torch.__version__,
              "machine": platform.machine(), "threads": args.threads,
              "command": "PYTHONPATH=. python3 benchmarks/monarch_quality.py " + " ".join(sys.argv[1:]),
              "targets": {"vit_accuracy": 0.96, "gpt_small_bits_per_byte_relative_increase": 0.03},
              "results": results, "seconds": time.time() - started}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    table = _table(results)
    args.out.with_suffix(".md").write_text(f"```\n{table}\n```\n\n{report['command']}, {report['date']}, "
                                           f"torch {report['torch']}, {args.threads} thread(s)\n")
    print()
    print(table)
    print(f"({time.time() - started:.0f} s; JSON: {args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
