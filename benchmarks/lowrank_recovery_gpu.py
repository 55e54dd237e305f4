"""Low-rank recovery of gpt-small on the GPU: the ``lowrank`` pass, then PELA's stage at scale.

    PYTHONPATH=. python3 benchmarks/lowrank_recovery_gpu.py --corpus out/slimline-corpus-3.11.7 \\
        --ranks-from benchmarks/results/lowrank_quality_gpt-small_cpu.json --out $OUT/lowrank_recovery_gpu.json

The CPU benchmark (``lowrank_quality.py``) runs the pass's own recovery: a hundred steps on eight
calibration windows. At 40% fewer Linear parameters that leaves gpt-small far above the issue's
line (≤ 2% relative bits/byte), so this script gives recovery what it needs, on the H200:

1. **Factorise with the pass.** capture → ``canonicalize_linear`` → ``lowrank`` on the CPU
   (``method="best"``, ``allocation="sensitivity"``, the same seeded calibration windows of the
   core-library training stream as the CPU benchmark; with ``--ranks-from`` the data-aware ranks
   that run chose are reused instead of re-probed). ``svd`` is the plain, uniform variant.
2. **An eager copy of the factorised model.** Every factorised site of the pass's graph becomes
   two ``nn.Linear`` (``x·Aᵀ`` then ``h·Bᵀ + b``) holding the graph's own ``A`` and ``B``; the copy
   is checked against the pass's graph on a calibration window (it must agree to fp32 rounding)
   and its parameter count against the pass's stats, *before* anything is trained.
3. **Recovery** (data-aware + recovery only), PELA's intermediate stage: only the factors train,
   everything else (embedding, LayerNorms, layers kept dense) is frozen. Loss per step::

       kd · KL(p_teacher ‖ p_student)                      next-byte distributions, per byte
     + feature · mean_l ‖f_l − f̂_l‖² / ‖f̂_l‖²              every factorised layer's output
     + perturbation · mean_l tr(Δ_l C_l Δ_lᵀ) / tr(W_l C_l W_lᵀ),  Δ = B·A − W

   (the pass's feature MSE and weight-perturbation term, with ``C`` the layer's input covariance;
   the logit term is what the pass's recovery lacks). Batches are fresh random windows of the
   model's own training stream (core library + test suites), bf16 autocast, fused attention as
   in ``train_gpt.training_logits``; AdamW on the factors, each group's step ``--lr`` × the
   factor's RMS, 20 warm-up steps then cosine decay to zero at the time limit (the step count is
   fixed after 10 timed steps so the schedule ends on time; ``--steps`` fixes it outright).
4. **Judged on held-out text**: bits/byte of the dense model and of every variant on the whole
   validation stream of the corpus (``--eval-bytes`` limits it), float32, the model's own
   forward, measured in this run. The dense figure is checked against the checkpoint card.

The JSON has the shape of ``lowrank_quality.py``'s (``models → gpt-small → points``), so
``lowrank_quality.py --combine`` merges it into the Pareto table; it adds per-point recovery
details (steps, seconds, losses) and the self-checks. A global ``--deadline`` (seconds from the
start) skips what no longer fits and says so; the JSON is rewritten after every point.

CPU smoke test (every path, tiny sizes)::

    PYTHONPATH=. python3 benchmarks/lowrank_recovery_gpu.py --model gpt-tiny --device cpu --steps 3 \\
        --batch 2 --eval-bytes 2048 --calibration-samples 2 --reductions 0.4 --allocation uniform \
        --out /tmp/lr_smoke.json
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lowrank_quality  # noqa: E402  (benchmarks/ is not a package)

from slimline.ir.graph import module_path  # noqa: E402
from slimline.passes import lowrank  # noqa: E402
from slimline.passes.base import PassContext  # noqa: E402


class Factorised(nn.Module):
    """``y = (x·Aᵀ)·Bᵀ + b``: one factorised site of the pass's graph, as an eager module."""

    def __init__(self, first_RK: torch.Tensor, second_NR: torch.Tensor, bias_N: torch.Tensor | None):
        super().__init__()
        rank, in_features = first_RK.shape
        out_features = second_NR.shape[0]
        self.first = nn.Linear(in_features, rank, bias=False)
        self.second = nn.Linear(rank, out_features, bias=bias_N is not None)
        with torch.no_grad():
            self.first.weight.copy_(first_RK)
            self.second.weight.copy_(second_NR)
            if bias_N is not None:
                self.second.bias.copy_(bias_N)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., K) -> (..., R) -> (..., N)
        return self.second(self.first(x))


def graph_factors(graph) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """``{module path: (A_RK, B_NR, bias)}`` read from the factorised graph's nodes."""
    found: dict[str, list] = {}
    for node in graph.fx.nodes:
        half = node.meta.get(lowrank.FACTOR_META)
        if half is None:
            continue
        path = module_path(node)
        weight = graph.attribute(node.args[1])
        entry = found.setdefault(path, [None, None, None])
        if half == "A":
            entry[0] = weight
        else:
            entry[1] = weight
            entry[2] = graph.attribute(node.args[2]) if len(node.args) > 2 else None
    return {path: tuple(t.detach().clone() if t is not None else None for t in entry)
            for path, entry in found.items()}


def build_student(teacher: nn.Module, factors: dict) -> nn.Module:
    """A copy of ``teacher`` with each factorised path replaced by a :class:`Factorised`."""
    student = copy.deepcopy(teacher)
    for path, (first, second, bias) in factors.items():
        parent_path, _, name = path.rpartition(".")
        parent = student.get_submodule(parent_path) if parent_path else student
        original = getattr(parent, name)
        if not isinstance(original, nn.Linear) or original.weight.shape != (second.shape[0], first.shape[1]):
            raise RuntimeError(f"factorised path {path!r} is not a matching nn.Linear in the model")
        setattr(parent, name, Factorised(first.float(), second.float(), None if bias is None else bias.float()))
    return student


def linear_params(model: nn.Module) -> int:
    """Weights and biases of every nn.Linear, a tensor shared by several (tied head) counted once."""
    seen, total = set(), 0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            for tensor in (module.weight, module.bias):
                if tensor is not None and id(tensor) not in seen:
                    seen.add(id(tensor))
                    total += tensor.numel()
    return total


# ---------------------------------------------------------------------------------------------
# recovery


class _Features:
    """Outputs (and optionally input covariances) of the named modules, refreshed every forward."""

    def __init__(self, model: nn.Module, paths: list[str], keep_graph: bool):
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = []
        for path in paths:
            module = model.get_submodule(path)

            def hook(_module, _inputs, output, path=path):
                self.outputs[path] = output if keep_graph else output.detach()
            self.handles.append(module.register_forward_hook(hook))

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def input_covariances(model: nn.Module, paths: list[str], batches: list[torch.Tensor], forward) -> dict:
    """``E[xᵀx]`` (K, K) float32 of each path's input over ``batches``."""
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}
    handles = []
    for path in paths:
        def hook(_module, inputs, path=path):
            x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])  # (M, K)
            with torch.autocast(x.device.type, enabled=False):  # the sum stays float32
                sums[path] = sums.get(path, 0) + x.T @ x
            rows[path] = rows.get(path, 0) + x.shape[0]
        handles.append(model.get_submodule(path).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for idx in batches:
                forward(model, idx)
    finally:
        for handle in handles:
            handle.remove()
    return {path: sums[path] / rows[path] for path in paths}


def recover(teacher: nn.Module, student: nn.Module, paths: list[str], stream: torch.Tensor,
            args, seconds: float, device: torch.device, generator: torch.Generator) -> dict:
    """Train only the factors of ``student`` to match ``teacher``; returns what happened."""
    from slimline.models.train_gpt import training_logits

    on_cuda = device.type == "cuda"
    window = teacher.config.context_length
    offsets = torch.arange(window + 1, device=device)

    def batch() -> torch.Tensor:
        starts = torch.randint(0, len(stream) - window - 1, (args.batch,), generator=generator)
        return stream[starts.to(device)[:, None] + offsets].long()  # (B, W+1)

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_cuda else torch.autocast("cpu", enabled=False)

    def forward(model, idx):
        with autocast:
            return training_logits(model, idx)

    for parameter in student.parameters():
        parameter.requires_grad_(False)
    modules = [student.get_submodule(p) for p in paths]
    factors = [t for m in modules for t in (m.first.weight, m.second.weight)]
    for tensor in factors:
        tensor.requires_grad_(True)
    originals = [teacher.get_submodule(p).weight.detach().float() for p in paths]
    covariances = input_covariances(teacher, paths, [batch()[:, :-1] for _ in range(args.covariance_batches)],
                                    forward)
    metrics = [covariances[p].float() for p in paths]
    norms = [float(((w @ c) * w).sum()) for w, c in zip(originals, metrics)]
    groups = [{"params": [t], "lr": args.lr * float(t.detach().pow(2).mean().sqrt())} for t in factors]
    for group in groups:
        group["peak"] = group["lr"]
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=0.0)
    teacher_taps, student_taps = _Features(teacher, paths, False), _Features(student, paths, True)

    def losses(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            target_logits = forward(teacher, idx).float()  # (B, W, V)
        logits = forward(student, idx).float()
        kd = F.kl_div(F.log_softmax(logits, -1).flatten(0, 1), F.log_softmax(target_logits, -1).flatten(0, 1),
                      log_target=True, reduction="batchmean")
        feature = torch.stack([(student_taps.outputs[p].float() - teacher_taps.outputs[p].float()).pow(2).mean()
                               / teacher_taps.outputs[p].float().pow(2).mean().clamp(min=1e-12) for p in paths]).mean()
        drift = torch.stack([((((m.second.weight.float() @ m.first.weight.float()) - w) @ c)
                              * ((m.second.weight.float() @ m.first.weight.float()) - w)).sum() / max(n, 1e-12)
                             for m, w, c, n in zip(modules, originals, metrics, norms)]).mean()
        return kd, feature, drift

    held = [batch()[:, :-1] for _ in range(2)]  # a fixed pair of windows to report losses on

    def held_losses() -> dict:
        with torch.no_grad():
            parts = [losses(idx) for idx in held]
        return {name: round(sum(float(p[i]) for p in parts) / len(parts), 6)
                for i, name in enumerate(("kd_nats", "feature", "perturbation"))}

    before = held_losses()
    history = []
    total = args.steps or 10**9
    warmup = min(20, max(1, total // 10))
    started = time.time()
    timed_from = None
    step = 0
    student.train()
    try:
        while step < total:
            scale = (step + 1) / warmup if step < warmup else \
                0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
            for group in optimizer.param_groups:
                group["lr"] = group["peak"] * scale
            idx = batch()[:, :-1]
            kd, feature, drift = losses(idx)
            loss = args.kd * kd + args.feature * feature + args.perturbation * drift
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(factors, 1.0)
            optimizer.step()
            step += 1
            if args.steps is None:
                if step == 5:
                    if on_cuda:
                        torch.cuda.synchronize()
                    timed_from = (step, time.time())
                elif step == 15:
                    if on_cuda:
                        torch.cuda.synchronize()
                    per_step = (time.time() - timed_from[1]) / (step - timed_from[0])
                    total = step + max(1, int((started + seconds - time.time()) / per_step))
                    warmup = min(20, total // 10)
            if step % args.log_every == 0 or step == total:
                history.append({"step": step, "seconds": round(time.time() - started, 1),
                                "kd_nats": round(float(kd.detach()), 5), "feature": round(float(feature.detach()), 5),
                                "perturbation": round(float(drift.detach()), 5)})
                print(f"    step {step}/{total} {history[-1]}", flush=True)
    finally:
        student.eval()
        teacher_taps.close()
        student_taps.close()
        for tensor in factors:
            tensor.requires_grad_(False)
    if on_cuda:
        torch.cuda.synchronize()
    after = held_losses()
    return {"steps": step, "seconds": round(time.time() - started, 1), "batch": args.batch,
            "bytes_seen": step * args.batch * window, "held_losses_before": before, "held_losses_after": after,
            "history": history,
            "loss": f"{args.kd}·KL + {args.feature}·feature MSE + {args.perturbation}·perturbation",
            "lr": f"{args.lr} × factor RMS, AdamW(0.9, 0.95), warm-up {warmup} steps, cosine to 0, clip 1.0",
            "precision": "bf16 autocast" if on_cuda else "float32"}


# ---------------------------------------------------------------------------------------------
# the run


def _ranks(path: str | None, name: str, reduction: float) -> dict | None:
    if not path or not Path(path).exists():
        return None
    return lowrank_quality._ranks_from(path, name, reduction)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt-small", choices=["gpt-tiny", "gpt-small"])
    parser.add_argument("--corpus", default="out/slimline-corpus-3.11.7")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reductions", nargs="+", type=float, default=[0.40, 0.50, 0.25],
                        help="in order of priority")
    parser.add_argument("--seconds", nargs="+", type=float, default=[80, 45, 25],
                        help="recovery seconds for each reduction, in the same order")
    parser.add_argument("--steps", type=int, default=None, help="fixed recovery steps (no time limit)")
    parser.add_argument("--svd", action="store_true", help="also the plain-SVD variant (evaluation only)")
    parser.add_argument("--ranks-from", default=None)
    parser.add_argument("--allocation", default="sensitivity", choices=["sensitivity", "uniform"],
                        help="data-aware ranks: probed per layer, or the same ratio everywhere (no probes)")
    parser.add_argument("--pass-on-cpu", action="store_true", help="run the pass on the CPU, not --device")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.003, help="peak AdamW step × each factor's RMS")
    parser.add_argument("--kd", type=float, default=1.0)
    parser.add_argument("--feature", type=float, default=1.0)
    parser.add_argument("--perturbation", type=float, default=0.1)
    parser.add_argument("--covariance-batches", type=int, default=2)
    parser.add_argument("--calibration-samples", type=int, default=8)
    parser.add_argument("--rank-multiple", type=int, default=1)
    parser.add_argument("--eval-bytes", type=int, default=None, help="validation bytes scored (default all)")
    parser.add_argument("--eval-batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--deadline", type=float, default=1e9, help="seconds from the start; later stages skip")
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    started = time.time()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # evaluation in true float32
        torch.backends.cudnn.allow_tf32 = False

    from slimline.models.checkpoint import CHECKPOINT_DIR
    from slimline.models.corpus import load_corpus
    from slimline.models.gpt import GPT_CONFIGS
    from slimline.models.quality import TextEvalSet, evaluate_text, trained_model

    corpus = load_corpus(args.corpus)
    card = json.loads((CHECKPOINT_DIR / f"{args.model}.json").read_text(encoding="utf-8"))
    checks: dict[str, Any] = {"validation_matches_card": corpus.manifest["sha256_validation"]
                              == card["corpus"]["sha256_validation"]}
    window = GPT_CONFIGS[args.model].context_length
    eval_set = TextEvalSet.from_bytes(corpus.validation, window, args.eval_batch, args.eval_bytes)
    eval_description = (f"{corpus.python_version} stdlib validation, "
                        f"{'first ' + format(args.eval_bytes, ',') if args.eval_bytes else 'all'} bytes "
                        f"({eval_set.num_bytes:,} scored), windows of {window}")

    teacher_cpu = trained_model(args.model).float().eval()
    # calibration: the CPU benchmark's seeded windows of the core-library training stream
    core = corpus.train[: corpus.manifest["bytes_core_train"]]
    batch = 4 if window <= 256 else 2
    generator = torch.Generator().manual_seed(0)
    data = torch.frombuffer(bytearray(core), dtype=torch.uint8)
    starts = torch.randint(0, len(data) - window - 1, (args.calibration_samples * batch,), generator=generator)
    windows = torch.stack([data[s:s + window].long() for s in starts.tolist()])  # (S·B, W)
    samples = [((windows[i:i + batch],), {}) for i in range(0, len(windows), batch)]
    # the pass runs on the device when it can (float64 SVDs and calibration forwards are quick
    # there), else on the CPU; the graph it factorises is captured on that device
    graphs: dict[str, Any] = {}
    pass_notes: list[str] = []

    def captured(where: str):
        if where not in graphs:
            model = copy.deepcopy(teacher_cpu).to(where)
            moved = [tuple(t.to(where) for t in args_) for args_, _ in samples]
            graphs[where] = (lowrank_quality._canonical(model, moved[0], {"idx": {0: "batch"}}),
                             [(a, {}) for a in moved])
        return graphs[where]

    def factorise(config: lowrank.Config):
        where = "cpu" if args.pass_on_cpu else str(device)
        try:
            graph_here, samples_here = captured(where)
            return lowrank.run(graph_here.copy(), config, PassContext("cpu", "max", calibration=samples_here)), \
                samples_here, where
        except Exception as failure:  # noqa: BLE001 - recorded, then the CPU path
            if where == "cpu":
                raise
            pass_notes.append(f"pass on {where} failed ({type(failure).__name__}: {str(failure)[:300]}); ran on cpu")
            print(pass_notes[-1], flush=True)
            args.pass_on_cpu = True
            graph_here, samples_here = captured("cpu")
            return lowrank.run(graph_here.copy(), config, PassContext("cpu", "max", calibration=samples_here)), \
                samples_here, "cpu"

    before_params = linear_params(teacher_cpu)
    try:  # capture once up front (and learn early whether the device can host the pass)
        captured("cpu" if args.pass_on_cpu else str(device))
    except Exception as failure:  # noqa: BLE001 - recorded, then the CPU path
        if args.pass_on_cpu:
            raise
        pass_notes.append(f"capture on {device} failed ({type(failure).__name__}: {str(failure)[:300]}); pass on cpu")
        args.pass_on_cpu = True
        captured("cpu")
    print(f"captured {args.model} ({time.time() - started:.0f} s)", flush=True)

    teacher = copy.deepcopy(teacher_cpu).to(device).eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    stream = torch.frombuffer(bytearray(corpus.train), dtype=torch.uint8).to(device)
    recovery_generator = torch.Generator().manual_seed(1)

    def evaluate(model: nn.Module) -> tuple[dict, float]:
        begun = time.time()
        found = evaluate_text(model.eval(), eval_set)
        return found, round(time.time() - begun, 1)

    dense, dense_seconds = evaluate(teacher)
    baseline = {"bits_per_byte": dense["bits_per_byte"], "top1_accuracy": dense["top1_accuracy"]}
    if args.eval_bytes is None:
        card_value = card.get("metrics", {}).get("val_bits_per_byte")
        checks["dense_bits_per_byte_card"] = card_value
        checks["dense_matches_card"] = card_value is not None and abs(dense["bits_per_byte"] - card_value) < 2e-3
    print(f"dense: {baseline} ({dense_seconds} s)", flush=True)

    results: dict[str, Any] = {
        "benchmark": "lowrank_recovery_gpu", "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})",
        "versions": lowrank_quality._versions(), "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "checks": checks,
        "models": {args.model: {"baseline": baseline, "eval_data": eval_description,
                                "calibration": f"{len(samples)} batches of {batch}×{window} bytes from the core-library "
                                               "training stream (seeded, as lowrank_quality.py); recovery: fresh "
                                               "windows of the whole training stream",
                                "linear_params": before_params, "points": []}},
        "skipped": [], "pass_notes": pass_notes, "acceptance": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    points = results["models"][args.model]["points"]

    def write() -> None:
        results["acceptance"] = lowrank_quality.acceptance(results) if args.model == "gpt-small" else []
        results["total_seconds"] = round(time.time() - started, 1)
        out.write_text(json.dumps(results, indent=1, default=str) + "\n", encoding="utf-8")

    seconds_for = dict(zip(args.reductions, args.seconds + [args.seconds[-1]] * len(args.reductions)))
    variants = ["data-aware"] + (["svd"] if args.svd else [])
    # priority: data-aware (+ recovery) at the first two reductions, the cheap plain-SVD points,
    # then data-aware at the rest
    plans = [(r, "data-aware") for r in args.reductions[:2]] \
        + [(r, v) for r in args.reductions for v in variants if v == "svd"] \
        + [(r, "data-aware") for r in args.reductions[2:]]
    for reduction, variant in plans:
        remaining = args.deadline - (time.time() - started)
        need = 18 + (seconds_for[reduction] if variant == "data-aware" else 0)
        if remaining < need:
            results["skipped"].append(f"{variant} at {reduction}: {remaining:.0f} s left, needs ~{need:.0f}")
            print(f"skip {variant} {reduction}", flush=True)
            continue
        ranks = _ranks(args.ranks_from, args.model, reduction) if variant == "data-aware" else None
        options = dict(lowrank_quality.VARIANTS[variant], **({"allocation": args.allocation}
                                                             if variant == "data-aware" else {}),
                       rank="param_reduction", param_reduction=reduction,
                       rank_multiple=args.rank_multiple, ranks=ranks or {})
        begun = time.time()
        result, samples_here, pass_device = factorise(lowrank.Config(**options))
        pass_seconds = round(time.time() - begun, 1)
        factors = {path: tuple(None if t is None else t.cpu() for t in entry)
                   for path, entry in graph_factors(result.graph).items()}
        student = build_student(teacher_cpu, factors)
        # self-checks: the eager copy computes the pass's graph, and holds the parameters it reports
        with torch.no_grad():
            expected = result.graph.module(*samples_here[0][0]).cpu()
            got = student(*samples[0][0])
        agreement = float((got - expected).abs().max() / expected.abs().max())
        after_params = lowrank_quality.linear_params(result.graph)
        point_checks = {"eager_vs_graph_max_rel_error": agreement,
                        "eager_linear_params": linear_params(student), "graph_linear_params": after_params,
                        "stats_linear_params_after": result.stats["linear_params_after"]}
        point_checks["stats_linear_params_before"] = result.stats["linear_params_before"]
        if agreement > 1e-4 or linear_params(student) != after_params \
                or result.stats["linear_params_before"] != before_params:
            raise RuntimeError(f"eager copy disagrees with the pass's graph: {point_checks}")
        student = student.to(device).eval()
        metrics, eval_seconds = evaluate(student)
        common = {"target_reduction": reduction, "linear_params_before": before_params,
                  "linear_params_after": after_params, "reduction": round(1 - after_params / before_params, 4),
                  "pass_seconds": pass_seconds, "pass_device": pass_device, "stats": result.stats, "checks": point_checks,
                  "ranks_from": args.ranks_from if ranks else None,
                  "methods_chosen": {m: sum(1 for d in result.decisions if d.method == m)
                                     for m in {d.method for d in result.decisions if d.method}},
                  "layers": [{"layer": d.module_path, "decision": d.decision, "rank": d.rank, "method": d.method,
                              "error": d.error, "why_not": d.why_not} for d in result.decisions]}
        points.append({"variant": variant, **common, "bits_per_byte": metrics["bits_per_byte"],
                       "top1_accuracy": metrics["top1_accuracy"], "eval_seconds": eval_seconds})
        print(f"{variant} {reduction}: reduction {common['reduction']} bits/byte {metrics['bits_per_byte']:.4f} "
              f"(pass {pass_seconds} s)", flush=True)
        write()
        if variant != "data-aware":
            continue
        budget = min(seconds_for[reduction], args.deadline - (time.time() - started) - 15)
        if budget < 5:
            results["skipped"].append(f"recovery at {reduction}: {budget:.0f} s left")
            continue
        recovery = recover(teacher, student, sorted(factors), stream, args, budget, device, recovery_generator)
        metrics, eval_seconds = evaluate(student)
        points.append({"variant": "data-aware+rec", **common, "bits_per_byte": metrics["bits_per_byte"],
                       "top1_accuracy": metrics["top1_accuracy"], "eval_seconds": eval_seconds,
                       "recovery": recovery})
        print(f"data-aware+rec {reduction}: bits/byte {metrics['bits_per_byte']:.4f} "
              f"(+{metrics['bits_per_byte'] / baseline['bits_per_byte'] - 1:.2%}) after {recovery['steps']} steps",
              flush=True)
        del student
        if device.type == "cuda":
            torch.cuda.empty_cache()
        write()
    write()
    for point in points:
        print(f"{point['variant']:16s} {point['target_reduction']:.2f} {point['reduction']:.3f} "
              f"{point['bits_per_byte']:.4f} {point['bits_per_byte'] / baseline['bits_per_byte'] - 1:+.2%}")
    for check in results["acceptance"]:
        print(f"[{'MET' if check['met'] else 'NOT MET'}] {check['target']}: {check['measured']}")
    print(f"checks: {checks}; total {time.time() - started:.0f} s")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
