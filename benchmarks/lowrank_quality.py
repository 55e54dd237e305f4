"""Low-rank quality: Linear-parameter reduction against the task metric (a Pareto table + PNG).

For each trained reference model, for each target reduction of the Linear parameters (25%, 40%,
50%; MiniLM also 30%, its acceptance point), three variants of the ``lowrank`` pass:

    svd            plain truncated SVD, the same ratio in every layer (uses no data)
    data-aware     whitened-or-plain per layer (whichever is better on held-out calibration data),
                   ranks spent least-sensitive-first (each layer probed once on calibration data)
    data-aware-uniform  whitened-or-plain per layer, the same ratio in every layer (no probes)
    data-aware+rec the data-aware ranks (the variant run before it), then PELA's recovery: ``--recover`` steps of feature
                   distillation (factors only, backbone frozen) on the calibration samples
    data-aware+out the data-aware ranks, then ``--out-recover`` steps of recovery on the model's *outputs*
                   (``recover_loss=--out-recover-loss``: relative squared error of the outputs,
                   for MiniLM 2·(1 − embedding cosine); factors only) on the calibration samples

Each variant runs the pass itself (capture → canonicalize_linear → lowrank) and the result is
judged on held-out data the pass never saw:

    vit        digits test split (360 images)              accuracy
    minilm     stdlib docstring sentences 0..N             mean embedding cosine, Spearman of
                                                           pairwise similarities (vs the original)
                                                           (64 tokens, padded, as the quality harness)
    gpt-tiny   first --text-bytes of the stdlib validation bits/byte
    gpt-small  first --text-bytes of the stdlib validation bits/byte (a short slice on a CPU)

Calibration (what the pass may look at): digits *train* images; for MiniLM ``--minilm-calibration``
docstring sentences from :func:`calibration_sentences` (library files that gave no evaluated
sentence), sorted by length and batched 16 at a time, each batch padded only to its longest
sentence, batches in a seeded order: MiniLM is captured with a dynamic sequence length, so the
covariances, the probes and the recovery see real tokens, not the 64-token padding the model
masks out; windows of the stdlib *training* stream for the GPTs. "Linear params" are the weights and
biases of every ``aten.linear`` site in the captured graph (a GPT's tied head is counted once and
stays dense). Run::

    PYTHONPATH=. python3 benchmarks/lowrank_quality.py --models vit gpt-tiny minilm \\
        --out benchmarks/results/lowrank_quality.json

The JSON holds device, versions, date, every point (metrics, measured reduction, seconds, pass
stats, ranks and methods per layer) and the acceptance checks; the PNG sits beside it.

gpt-small's points come from ``lowrank_recovery_gpu.py`` (the same pass and calibration, judged
on the whole validation stream, recovery on the H200 with a logit term added); runs of several
processes or machines are merged, with a markdown table (``.md``) beside the JSON and PNG::

    python3 benchmarks/lowrank_quality.py --combine vit.json minilm.json lowrank_recovery_gpu.json \
        --out benchmarks/results/lowrank_quality.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from slimline.ir.capture import capture
from slimline.ir.graph import Graph
from slimline.ir.sites import find_sites
from slimline.passes import canonicalize_linear, lowrank
from slimline.passes.base import PassContext

VARIANTS = {
    "svd": dict(method="svd", allocation="uniform"),
    "data-aware": dict(method="best", allocation="sensitivity"),
    "data-aware-uniform": dict(method="best", allocation="uniform"),  # no probes: cheap on big models
    "data-aware+rec": dict(method="best", allocation="sensitivity"),   # + recover, ranks reused
    "data-aware+out": dict(method="best", allocation="sensitivity"),   # + output recovery, ranks reused
}
RECOVERY_VARIANTS = ("data-aware+rec", "data-aware+out")
REDUCTIONS = (0.25, 0.40, 0.50)
EXTRA_REDUCTIONS = {"minilm": (0.30,), "vit": (0.67, 0.80)}
METRICS = {"vit": ("accuracy",), "minilm": ("embedding_cosine", "similarity_spearman"),
           "gpt-tiny": ("bits_per_byte",), "gpt-small": ("bits_per_byte",)}  # also the tables' order
HIGHER_IS_BETTER = {"accuracy": True, "embedding_cosine": True, "similarity_spearman": True,
                    "bits_per_byte": False}


# ---------------------------------------------------------------------------------------------
# models, held-out data, calibration


class Evaluated:
    """A model prepared for the benchmark: its graph, calibration samples and a metric function."""

    def __init__(self, name: str, graph: Graph, samples: list, evaluate, eval_data: str, calibration: str):
        self.name, self.graph, self.samples = name, graph, samples
        self.evaluate, self.eval_data, self.calibration = evaluate, eval_data, calibration


def _canonical(model: torch.nn.Module, example: tuple, dynamic: dict) -> Graph:
    graph = capture(model, example, dynamic_shapes=dynamic)
    return canonicalize_linear.run(graph.copy(), canonicalize_linear.Config(),
                                   PassContext("cpu", "balanced")).graph


def _prepare_vit(args) -> Evaluated:
    from slimline.models.quality import accuracy, digits_eval_set, digits_split, trained_model

    model = trained_model("vit")
    train = digits_split()["train_images"]
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(train), generator=generator)
    samples = [((train[order[i:i + 64]],), {}) for i in range(0, 64 * args.calibration_samples, 64)]
    graph = _canonical(model, samples[0][0], {"images": {0: "batch"}})
    eval_set = digits_eval_set()
    return Evaluated("vit", graph, samples, lambda m: {"accuracy": accuracy(m, eval_set)},
                     eval_set.description,
                     f"{len(samples)} batches of 64 digits train images (seeded shuffle)")


def _prepare_minilm(args) -> Evaluated:
    from slimline.models import minilm
    from slimline.models.quality import embedding_cosine, similarity_spearman

    model = minilm.load_minilm()
    count = args.sentences
    eval_set = minilm.sentence_eval_set(count, batch_size=32).with_reference(model)
    sentences, skipped = calibration_sentences(list(eval_set.sentences), args.minilm_calibration)
    tokenizer = minilm.load_tokenizer()
    lengths = [len(tokenizer(s, truncation=True, max_length=minilm.MAX_LENGTH)["input_ids"]) for s in sentences]
    by_length = [s for _length, s in sorted(zip(lengths, sentences), key=lambda pair: pair[0])]
    batches = [by_length[i:i + 16] for i in range(0, len(by_length) - 15, 16)]  # whole batches of 16
    order = torch.randperm(len(batches), generator=torch.Generator().manual_seed(0)).tolist()
    samples = []
    for index in order:
        tokens = tokenizer(batches[index], padding="longest", truncation=True, max_length=minilm.MAX_LENGTH,
                           return_tensors="pt")
        samples.append(((tokens["input_ids"].long(), tokens["attention_mask"].long()), {}))
    real = sum(int(sample[0][1].sum()) for sample in samples)
    padded = sum(sample[0][1].numel() for sample in samples)
    tokens = torch.export.Dim("tokens", min=2, max=512)
    longest = max(range(len(samples)), key=lambda i: samples[i][0][0].shape[1])
    graph = _canonical(model, samples[longest][0], {"input_ids": {0: "batch", 1: tokens},
                                                    "attention_mask": {0: "batch", 1: tokens}})

    def evaluate(m):
        return {"embedding_cosine": embedding_cosine(m, eval_set),
                "similarity_spearman": similarity_spearman(m, eval_set)}

    return Evaluated("minilm", graph, samples, evaluate, eval_set.description,
                     f"{len(samples)} batches of 16 stdlib docstring sentences from files that gave no "
                     f"evaluated sentence ({skipped} files skipped; batched by length, padded to each "
                     f"batch's longest: {real} real tokens of {padded})")


def calibration_sentences(evaluated: list[str], count: int) -> tuple[list[str], int]:
    """Up to ``count`` docstring sentences of stdlib files that gave *no* evaluated sentence.

    Every paragraph of every module, class and function docstring of the library (non-test) files
    is split into sentences (20–300 characters, starting with a capital, ending in . ! or ?,
    at least four words); files are visited in the order of the SHA-256 of their path, and a file
    whose docstrings hold any evaluated sentence is skipped whole, so calibration and evaluation
    share no text and no file. Returns the sentences and the number of files skipped.
    """
    import ast
    import hashlib
    import re

    from slimline.models.corpus import list_sources, stdlib_root

    ending = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
    root = stdlib_root()
    files = sorted(list_sources(root, include_tests=False),
                   key=lambda f: hashlib.sha256(f.path.encode()).hexdigest())
    chosen, seen, skipped = [], set(evaluated), 0
    for source in files:
        try:
            tree = ast.parse((root / source.path).read_bytes())
        except (SyntaxError, ValueError):
            continue
        found = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                for paragraph in (ast.get_docstring(node, clean=True) or "").split("\n\n"):
                    found += ending.split(" ".join(paragraph.split()))
        text = " ".join(" ".join(d.split()) for d in found)
        if any(sentence in text for sentence in evaluated):
            skipped += 1
            continue
        for sentence in found:
            if 20 <= len(sentence) <= 300 and sentence[0].isupper() and sentence[-1] in ".!?" \
                    and len(sentence.split()) >= 4 and sentence not in seen:
                seen.add(sentence)
                chosen.append(sentence)
                if len(chosen) == count:
                    return chosen, skipped
    return chosen, skipped


def _prepare_gpt(name: str, args) -> Evaluated:
    from slimline.models.corpus import build_corpus
    from slimline.models.gpt import GPT_CONFIGS
    from slimline.models.quality import bits_per_byte, text_eval_set, trained_model

    model = trained_model(name)
    window = GPT_CONFIGS[name].context_length
    batch = 4 if window <= 256 else 2  # not 1: export would specialise the batch dimension
    stream = build_corpus(include_tests=False).train
    generator = torch.Generator().manual_seed(0)
    data = torch.frombuffer(bytearray(stream), dtype=torch.uint8)
    starts = torch.randint(0, len(data) - window - 1, (args.calibration_samples * batch,), generator=generator)
    windows = torch.stack([data[s:s + window].long() for s in starts.tolist()])  # (S·B, W)
    samples = [((windows[i:i + batch],), {}) for i in range(0, len(windows), batch)]
    graph = _canonical(model, samples[0][0], {"idx": {0: "batch"}})
    text_bytes = args.text_bytes or {"gpt-tiny": 65536, "gpt-small": 32768}[name]
    eval_set = text_eval_set(name, max_bytes=text_bytes, batch_size=8)
    return Evaluated(name, graph, samples, lambda m: {"bits_per_byte": bits_per_byte(m, eval_set)},
                     eval_set.description,
                     f"{len(samples)} batches of {batch}×{window} bytes from the stdlib training stream "
                     f"(core library files, seeded random windows)")


def prepare(name: str, args) -> Evaluated:
    if name == "vit":
        return _prepare_vit(args)
    if name == "minilm":
        return _prepare_minilm(args)
    return _prepare_gpt(name, args)


# ---------------------------------------------------------------------------------------------
# one point


def linear_params(graph: Graph) -> int:
    return sum(site.params for site in find_sites(graph) if site.kind == "linear")


def run_point(model: Evaluated, variant: str, reduction: float, args, ranks: dict | None) -> tuple[dict, dict]:
    options = dict(VARIANTS[variant], rank="param_reduction", param_reduction=reduction,
                   rank_multiple=args.rank_multiple)
    if variant == "data-aware+rec":
        options.update(recover=args.recover, recover_lr=args.recover_lr, ranks=ranks or {})
    if variant == "data-aware+out":
        options.update(recover=args.out_recover, recover_lr=args.out_recover_lr, recover_loss=args.out_recover_loss,
                       recover_perturbation=args.out_recover_perturbation, ranks=ranks or {})
    config = lowrank.Config(**options)
    context = PassContext("cpu", "max", calibration=model.samples)
    start = time.perf_counter()
    result = lowrank.run(model.graph.copy(), config, context)
    seconds = time.perf_counter() - start
    module = result.graph.module.eval()
    start = time.perf_counter()
    metrics = model.evaluate(module)
    eval_seconds = time.perf_counter() - start
    before, after = linear_params(model.graph), linear_params(result.graph)
    layers = [{"layer": d.module_path, "decision": d.decision, "rank": d.rank, "method": d.method,
               "method_errors": d.method_errors, "error": d.error, "why_not": d.why_not}
              for d in result.decisions]
    chosen = {d.module_path: d.rank for d in result.decisions if d.rank is not None}
    wins = {}
    for d in result.decisions:
        if d.method:
            wins[d.method] = wins.get(d.method, 0) + 1
    point = {"variant": variant, "target_reduction": reduction,
             "linear_params_before": before, "linear_params_after": after,
             "reduction": round(1 - after / before, 4), **{k: float(v) for k, v in metrics.items()},
             "pass_seconds": round(seconds, 2), "eval_seconds": round(eval_seconds, 2),
             "methods_chosen": wins, "stats": result.stats, "layers": layers}
    if variant in RECOVERY_VARIANTS:
        point["recovery_options"] = {k: options[k] for k in options if k.startswith("recover")}
    return point, chosen


# ---------------------------------------------------------------------------------------------
# acceptance, table, plot


def relative_change(value: float, baseline: float, metric: str) -> float:
    """Relative loss: positive is worse."""
    if HIGHER_IS_BETTER[metric]:
        return (baseline - value) / abs(baseline)
    return (value - baseline) / abs(baseline)


def acceptance(results: dict) -> list[dict]:
    checks = []
    small = results["models"].get("gpt-small")
    if small:
        base = small["baseline"]["bits_per_byte"]
        points = [p for p in small["points"] if p["variant"] == "data-aware+rec" and p["reduction"] >= 0.40]
        best = min(points, key=lambda p: p["bits_per_byte"], default=None)
        increase = None if best is None else relative_change(best["bits_per_byte"], base, "bits_per_byte")
        checks.append({"target": "gpt-small ≥40% fewer Linear params, ≤2% relative bits/byte increase "
                                 "after recovery", "met": increase is not None and increase <= 0.02,
                       "measured": None if best is None else
                       {"reduction": best["reduction"], "relative_bits_per_byte_increase": round(increase, 5),
                        "data": small["eval_data"]}})
    encoder = results["models"].get("minilm")
    if encoder:
        points = [p for p in encoder["points"] if p["reduction"] >= 0.30]
        good = [p for p in points if p["embedding_cosine"] >= 0.98 and p["similarity_spearman"] >= 0.97]
        best = max(good, key=lambda p: (p["reduction"], p["embedding_cosine"])) if good else \
            max(points, key=lambda p: (p["embedding_cosine"], p["similarity_spearman"]), default=None)
        checks.append({"target": "MiniLM ≥30% fewer Linear params, cosine ≥0.98, Spearman ≥0.97",
                       "met": bool(good), "measured": None if best is None else
                       {k: best[k] for k in ("variant", "reduction", "embedding_cosine", "similarity_spearman")}})
    return checks


def table(results: dict) -> str:
    lines = []
    for name, entry in results["models"].items():
        metrics = METRICS[name]
        lines.append(f"\n{name}: baseline " + ", ".join(f"{m} {entry['baseline'][m]:.4f}" for m in metrics)
                     + f"   (eval: {entry['eval_data']})")
        header = f"{'variant':16s} {'target':>6s} {'reduction':>9s} " + " ".join(f"{m:>20s}" for m in metrics) \
            + f" {'rel. loss':>9s} {'pass s':>7s}"
        lines.append(header)
        for p in entry["points"]:
            loss = relative_change(p[metrics[0]], entry["baseline"][metrics[0]], metrics[0])
            lines.append(f"{p['variant']:16s} {p['target_reduction']:6.2f} {p['reduction']:9.3f} "
                         + " ".join(f"{p[m]:20.4f}" for m in metrics)
                         + f" {loss:+9.2%} {p['pass_seconds']:7.1f}")
    for check in results["acceptance"]:
        lines.append(f"\n[{'MET' if check['met'] else 'NOT MET'}] {check['target']}: {check['measured']}")
    return "\n".join(lines)


def markdown(results: dict) -> str:
    """The Pareto table as markdown: one table per model, then the acceptance lines and the runs."""
    lines = ["# Low-rank pass: Linear-parameter reduction against the task metric", ""]
    for name, entry in results["models"].items():
        metrics = METRICS[name]
        runs = sorted({p.get("run", "") for p in entry["points"]} - {""})
        lines += [f"## {name}", "",
                  f"Baseline (dense): " + ", ".join(f"{m} {entry['baseline'][m]:.4f}" for m in metrics)
                  + f". Evaluated on {entry['eval_data']}. Calibration: {entry['calibration']}."
                  + (f" Runs: {', '.join(runs)}." if runs else ""), "",
                  "| variant | target | reduction | " + " | ".join(metrics) + " | rel. loss | recovery |",
                  "|---|---:|---:|" + "---:|" * len(metrics) + "---:|---|"]
        for p in entry["points"]:
            loss = relative_change(p[metrics[0]], entry["baseline"][metrics[0]], metrics[0])
            recovery = p.get("recovery")
            if recovery:
                how = f"{recovery['steps']} steps, {recovery['seconds']:.0f} s (KL + feature + perturbation)"
            elif p.get("recovery_options"):
                o = p["recovery_options"]
                how = (f"{o['recover']} steps, recover_lr {o['recover_lr']} "
                       f"({o.get('recover_loss', 'features')} loss, perturbation {o.get('recover_perturbation', 0.1)})"
                       + (", reverted" if p["stats"].get("recover_reverted") else ""))
            elif p["variant"] == "data-aware+rec":
                steps = p["stats"].get("recover_steps", "?")
                settings = {r["file"]: r["settings"] for r in results.get("runs", [])}.get(p.get("run"), {})
                how = f"{steps} steps, recover_lr {settings.get('recover_lr', '?')} (pass's feature MSE + perturbation)" \
                    + (", reverted" if p["stats"].get("recover_reverted") else "")
            else:
                how = ""
            lines.append(f"| {p['variant']} | {p['target_reduction']:.2f} | {p['reduction']:.3f} | "
                         + " | ".join(f"{p[m]:.4f}" for m in metrics) + f" | {loss:+.2%} | {how} |")
        lines.append("")
    lines += ["## Acceptance", ""]
    for check in results["acceptance"]:
        lines.append(f"- **{'MET' if check['met'] else 'NOT MET'}** {check['target']}: `{check['measured']}`")
    lines += ["", "## Runs", ""]
    for run in results.get("runs", []):
        lines.append(f"- `{run['file']}` ({run.get('benchmark')}): {run['date']}, {run['device']}; settings "
                     f"`{json.dumps(run['settings'], default=str)}`")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = [(name, metric) for name, entry in results["models"].items() for metric in METRICS[name]]
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for axis, (name, metric) in zip(axes[0], panels):
        entry = results["models"][name]
        for index, (variant, marker) in enumerate(zip(VARIANTS, "os^dv")):  # one colour per variant
            points = sorted((p for p in entry["points"] if p["variant"] == variant), key=lambda p: p["reduction"])
            if not points:
                continue
            axis.plot([100 * p["reduction"] for p in points], [p[metric] for p in points], marker=marker,
                      color=f"C{index}", label=variant)
        axis.axhline(entry["baseline"][metric], color="gray", linestyle=":", label="dense")
        targets = {("minilm", "embedding_cosine"): 0.98, ("minilm", "similarity_spearman"): 0.97}
        if (name, metric) in targets:
            axis.axhline(targets[(name, metric)], color="red", linestyle="--", linewidth=0.8, label="target")
        if name == "gpt-small":
            axis.axhline(1.02 * entry["baseline"][metric], color="red", linestyle="--", linewidth=0.8,
                         label="+2% target")
        axis.set_title(f"{name}: {metric}", fontsize=9)
        axis.set_xlabel("Linear parameters removed (%)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def _versions() -> dict:
    import importlib.metadata as metadata

    found = {"python": platform.python_version()}
    for package in ("torch", "transformers", "slimline"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vit", "gpt-tiny", "minilm", "gpt-small"])
    parser.add_argument("--reductions", nargs="+", type=float, default=list(REDUCTIONS))
    parser.add_argument("--only-listed", action="store_true",
                        help="only --reductions (not the per-model extras), e.g. to split a model over processes")
    parser.add_argument("--variants", nargs="+", default=["svd", "data-aware", "data-aware+rec"],
                        choices=list(VARIANTS))
    parser.add_argument("--recover", type=int, default=100, help="recovery steps for data-aware+rec")
    parser.add_argument("--recover-lr", type=float, default=0.3)
    parser.add_argument("--out-recover", type=int, default=300, help="recovery steps for data-aware+out")
    parser.add_argument("--out-recover-lr", type=float, default=0.005)
    parser.add_argument("--out-recover-loss", default="output", choices=["output", "both"])
    parser.add_argument("--out-recover-perturbation", type=float, default=0.0)
    parser.add_argument("--minilm-calibration", type=int, default=4800,
                        help="MiniLM calibration sentences (files disjoint from the evaluated ones; whole batches of 16)")
    parser.add_argument("--rank-multiple", type=int, default=1)
    parser.add_argument("--calibration-samples", type=int, default=8)
    parser.add_argument("--sentences", type=int, default=512, help="MiniLM evaluation sentences")
    parser.add_argument("--text-bytes", type=int, default=None,
                        help="held-out bytes scored (default 65,536 for gpt-tiny, 32,768 for gpt-small)")
    parser.add_argument("--ranks-from", default=None,
                        help="a result file whose data-aware ranks data-aware+rec reuses (skips re-probing)")
    parser.add_argument("--combine", nargs="+", default=None,
                        help="merge the models of these result files into --out (and its PNG), run nothing")
    parser.add_argument("--drop", nargs="+", default=[],
                        help="with --combine: models left out of inputs that are themselves combined files")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/lowrank_quality.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.combine:
        return _combine(args.combine, out, tuple(args.drop))
    results: dict[str, Any] = {
        "benchmark": "lowrank_quality", "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": f"CPU ({platform.machine()}, {args.threads} threads, shared with other jobs)",
        "versions": _versions(), "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "models": {}, "acceptance": []}
    for name in args.models:
        from slimline.models.checkpoint import CHECKPOINT_DIR

        if name != "minilm" and not (CHECKPOINT_DIR / f"{name}.safetensors").exists():
            results["models"][name] = {"skipped": "no checkpoint"}
            continue
        start = time.perf_counter()
        model = prepare(name, args)
        baseline = model.evaluate(model.graph.module.eval())
        entry = {"baseline": {k: float(v) for k, v in baseline.items()}, "eval_data": model.eval_data,
                 "calibration": model.calibration, "linear_params": linear_params(model.graph), "points": []}
        results["models"][name] = entry
        print(f"{name}: baseline {baseline} ({time.perf_counter() - start:.0f} s to prepare)", flush=True)
        extra = () if args.only_listed else EXTRA_REDUCTIONS.get(name, ())
        reductions = sorted(set(args.reductions) | set(extra))
        for reduction in reductions:
            ranks = _ranks_from(args.ranks_from, name, reduction) if args.ranks_from else None
            for variant in args.variants:
                point, chosen = run_point(model, variant, reduction, args, ranks)
                if variant.startswith("data-aware") and variant not in RECOVERY_VARIANTS:
                    ranks = chosen  # the recovery variant starts from these ranks
                entry["points"].append(point)
                print(f"  {variant:15s} target {reduction:.2f} reduction {point['reduction']:.3f} "
                      + " ".join(f"{m} {point[m]:.4f}" for m in METRICS[name])
                      + f" ({point['pass_seconds']:.0f} s pass, {point['eval_seconds']:.0f} s eval)", flush=True)
                _write(results, out)
    results["models"] = {k: v for k, v in results["models"].items() if "skipped" not in v} | \
        {k: v for k, v in results["models"].items() if "skipped" in v}
    results["acceptance"] = acceptance({"models": {k: v for k, v in results["models"].items() if "points" in v}})
    _write(results, out)
    shown = {"models": {k: v for k, v in results["models"].items() if "points" in v},
             "acceptance": results["acceptance"]}
    print(table(shown))
    if plot(shown, out.with_suffix(".png")):
        print(f"wrote {out} and {out.with_suffix('.png')}")
    return results


def _ranks_from(path: str, name: str, reduction: float) -> dict | None:
    entry = json.loads(Path(path).read_text(encoding="utf-8"))["models"].get(name, {})
    for point in entry.get("points", []):
        if point["variant"] == "data-aware" and abs(point["target_reduction"] - reduction) < 1e-9:
            return {layer["layer"]: layer["rank"] for layer in point["layers"] if layer["rank"] is not None}
    return None


def _combine(paths: list[str], out: Path, drop: tuple = ()) -> dict:
    """One result file (and plot) from several runs, e.g. models run in parallel processes.

    An input may itself be a combined file (it has ``runs``): its points keep the run they came
    from, and the models named in ``drop`` are left out of it (rows being regenerated).
    """
    parts = [json.loads(Path(p).read_text(encoding="utf-8")) for p in paths]
    runs = []
    for path, part in zip(paths, parts):
        if "runs" in part:
            part["models"] = {k: v for k, v in part["models"].items() if k not in drop}
            used = {p.get("run") for entry in part["models"].values() for p in entry.get("points", [])}
            runs += [run for run in part["runs"] if run["file"] in used]
        else:
            runs.append({"file": Path(path).name, "benchmark": part.get("benchmark"),
                         **{k: part[k] for k in ("date", "device", "settings")}})
    results = dict(parts[0], models={}, runs=runs)
    for path, part in zip(paths, parts):  # a model in several files: its points are joined
        for name, entry in part["models"].items():
            if "points" not in entry:
                continue
            for point in entry["points"]:
                point.setdefault("run", Path(path).name)
            if name in results["models"]:
                mine = results["models"][name]
                if mine["eval_data"] != entry["eval_data"] or mine["baseline"] != entry["baseline"]:
                    raise SystemExit(f"{name}: {path} was evaluated on other data than the first file")
                mine["points"] += entry["points"]
            else:
                results["models"][name] = entry
    known = list(METRICS)  # models in one order whatever the inputs' order
    results["models"] = dict(sorted(results["models"].items(),
                                    key=lambda item: known.index(item[0]) if item[0] in known else len(known)))
    for entry in results["models"].values():
        order = list(VARIANTS)
        entry["points"].sort(key=lambda p: (p["target_reduction"], order.index(p["variant"])))
    results["acceptance"] = acceptance(results)
    _write(results, out)
    out.with_suffix(".md").write_text(markdown(results), encoding="utf-8")
    print(table(results))
    if plot(results, out.with_suffix(".png")):
        print(f"wrote {out} and {out.with_suffix('.png')}")
    return results


def _write(results: dict, out: Path) -> None:
    out.write_text(json.dumps(results, indent=1, default=str) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main(sys.argv[1:])
