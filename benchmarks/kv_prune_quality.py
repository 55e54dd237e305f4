"""KV-cache pruning quality: Keyformer vs H2O vs StreamingLLM on the trained byte-level GPT.

What is scored. Windows of held-out CPython stdlib bytes (the validation stream of
slimline.models.corpus), each as long as the model's context (gpt-small 1024, gpt-tiny 256;
neither allows 2048), evenly spaced through the stream: the first P = 3/4 of a window is the
prompt, prefilled with full attention; the cache is then pruned to the budget; the next N = 1/4
bytes are fed one at a time (teacher forcing) through the decode loop with the pruned cache,
which keeps evicting as it goes. Each decode step's logits predict the next byte, so N
predictions per window are scored: bits/byte against the true bytes, next-byte top-1 accuracy,
and top-1 agreement with the full-cache model's predictions at the same positions. The
prefill's own prediction (made before any pruning) is not scored.

Budgets are fractions of the tokens seen (slimline.passes.kv_prune): f of the prompt right after
prefill, f of prompt + generated later. All methods share the harness, the budgets and, for
Keyformer and H2O, the recent window (30% of the budget); StreamingLLM keeps 4 sinks + the rest
recent. Keyformer's Gumbel noise is seeded; it runs with several seeds, reported as mean and
spread. Differences against StreamingLLM are paired per window (mean ± 1.96 standard errors).

    python benchmarks/kv_prune_quality.py                   # gpt-small if its checkpoint is here, else gpt-tiny
    python benchmarks/kv_prune_quality.py --model gpt-tiny --windows 256
    python benchmarks/kv_prune_quality.py --minutes 15      # as many batches of windows as fit in 15 min

The windows run in a spread order (0, 32, 16, 48, 8, ... of 64), so the windows done when a
``--minutes`` limit stops the run are still spread over the whole stream; the record says how
many were scored.

Writes benchmarks/results/kv_prune_quality_<model>.json and .md; prints the table last.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from slimline.kv import DecodeSession
from slimline.kv.session import prefill_together
from slimline.models.checkpoint import CHECKPOINT_DIR
from slimline.models.corpus import python_version
from slimline.models.quality import held_out_text, trained_model

LOG2 = math.log(2)


def default_model() -> str:
    return "gpt-small" if (CHECKPOINT_DIR / "gpt-small.safetensors").exists() else "gpt-tiny"


def windows_of(stream: bytes, length: int, count: int) -> torch.Tensor:
    """(count, length) byte windows at evenly spaced, non-overlapping offsets, in :func:`spread_order`."""
    available = len(stream) // length
    count = min(count, available)
    stride = available // count
    rows = [list(stream[i * stride * length:(i * stride) * length + length]) for i in spread_order(count)]
    return torch.tensor(rows, dtype=torch.int64)


def spread_order(count: int) -> list[int]:
    """0..count-1 ordered so that every prefix is spread out: 0, 4, 2, 6, 1, 5, 3, 7 for 8 (bit reversal)."""
    bits = max(1, (count - 1).bit_length())
    reversed_ = sorted(range(1 << bits), key=lambda i: int(format(i, f"0{bits}b")[::-1], 2))
    return [i for i in reversed_ if i < count]


@torch.no_grad()
def teacher_forced_all(model, windows: torch.Tensor, prompt: int, steps: int, configs: dict, batch: int,
                       deadline: float | None = None) -> dict:
    """For every named kv_prune config: scored logits (W', N, V) float32 and mean session stats.

    Per batch of windows, one shared prefill (``prefill_together``: each policy scores the same
    prompt attention as in its own prefill), then N teacher-forced decode steps per config. No
    new batch starts after ``deadline`` (time.time()); W' counts the windows done (at least one batch).
    """
    logits = {name: [] for name in configs}
    stats = {name: [] for name in configs}
    for start in range(0, len(windows), batch):
        if deadline is not None and start > 0 and time.time() > deadline:
            break
        began = time.time()
        rows = windows[start:start + batch]
        sessions = {name: DecodeSession(model, config, steps=steps) for name, config in configs.items()}
        prefill_together(list(sessions.values()), rows[:, :prompt])
        for name in configs:
            session = sessions.pop(name)  # decode, then let its cache go
            step_logits = [session.step(rows[:, prompt + i:prompt + i + 1]) for i in range(steps)]
            logits[name].append(torch.stack(step_logits, dim=1).float())
            stats[name].append(session.stats)
        print(f"  windows {start + len(rows)}/{len(windows)}: {time.time() - began:.0f} s", file=sys.stderr, flush=True)
    keys = ("kv_cache_bytes", "full_kv_cache_bytes", "attention_key_reads", "full_attention_key_reads",
            "kept_after_prompt", "cache_slots")
    return {name: (torch.cat(logits[name]), {key: statistics.fmean(s[key] for s in stats[name]) for key in keys})
            for name in configs}


def score(logits: torch.Tensor, targets: torch.Tensor, reference_top1: torch.Tensor | None) -> dict:
    """Metrics over (W, N, V) logits; also per-window bits/byte for paired comparisons."""
    nats = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)
    top1 = logits.argmax(-1)
    result = {
        "bits_per_byte": float(nats.double().mean() / LOG2),
        "top1_accuracy": float((top1 == targets).double().mean()),
        "per_window_bits": (nats.double().mean(dim=1) / LOG2).tolist(),
    }
    if reference_top1 is not None:
        result["top1_agreement"] = float((top1 == reference_top1).double().mean())
    return result


def paired(a: list[float], b: list[float]) -> dict:
    """Mean of a - b and its 95% interval (normal approximation), per window."""
    differences = [x - y for x, y in zip(a, b)]
    mean = statistics.fmean(differences)
    half = 1.96 * statistics.stdev(differences) / math.sqrt(len(differences))
    return {"mean": mean, "low": mean - half, "high": mean + half}


def markdown_table(rows: list[dict], full: dict) -> str:
    lines = ["| budget | method | bits/byte | Δ vs full | top-1 agreement | top-1 accuracy | KV bytes | attention keys read |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
             f"| 100% | full cache | {full['bits_per_byte']:.4f} | — | 1.0000 | {full['top1_accuracy']:.4f} | 1.000 | 1.000 |"]
    for row in rows:
        spread = f" ± {row['bits_per_byte_seed_spread']:.4f}" if row.get("bits_per_byte_seed_spread") else ""
        lines.append(f"| {row['budget']:.0%} | {row['method']} | {row['bits_per_byte']:.4f}{spread} | "
                     f"{row['relative_increase']:+.2%} | {row['top1_agreement']:.4f} | {row['top1_accuracy']:.4f} | "
                     f"{row['kv_bytes_ratio']:.3f} | {row['attention_reads_ratio']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="gpt-small or gpt-tiny (default: gpt-small if trained)")
    parser.add_argument("--windows", type=int, default=None, help="windows scored (default 512 tiny, 64 small)")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--budgets", default="0.5,0.3,0.2")
    parser.add_argument("--policies", default="keyformer,h2o,streaming")
    parser.add_argument("--seeds", type=int, default=None, help="Keyformer Gumbel-noise seeds (default 3 tiny, 2 small)")
    parser.add_argument("--window", type=float, default=0.3, help="recent window, fraction of the budget")
    parser.add_argument("--fixed", action="store_true",
                        help="the paper's budget: k = budget x prompt tokens, fixed while decoding (one eviction "
                             "per step); default: a fraction of the tokens seen (the cache grows by f per token)")
    parser.add_argument("--mean-score", action="store_true",
                        help="Keyformer and H2O rank by mean weight per query (kv_prune mean_score): an "
                             "experiment, not the papers' method; results go to *_mean.{json,md}")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--minutes", type=float, default=None,
                        help="start no new batch of windows after this many minutes (the record says how many ran)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    name = args.model or default_model()
    model = trained_model(name)
    context = model.config.context_length
    prompt, steps = context * 3 // 4, context // 4
    count = args.windows or (512 if name == "gpt-tiny" else 64)
    batch = args.batch or (64 if name == "gpt-tiny" else 8)
    args.seeds = args.seeds or (3 if name == "gpt-tiny" else 1)
    windows = windows_of(held_out_text(), context + 1, count)  # positions 0..context-1, + the last target
    started = time.time()
    budgets = [float(b) for b in args.budgets.split(",")]
    policies = args.policies.split(",")
    configs = {("full", 1.0, 0): None}
    for budget in budgets:
        for policy in policies:
            for seed in (range(args.seeds) if policy == "keyformer" else [0]):
                size = max(1, round(budget * prompt)) if args.fixed else budget
                configs[(policy, budget, seed)] = {"policy": policy, "budget": size, "window": args.window,
                                                   "seed": seed}
                if args.mean_score and policy != "streaming":
                    configs[(policy, budget, seed)]["mean_score"] = True
    deadline = None if args.minutes is None else started + 60 * args.minutes
    runs = teacher_forced_all(model, windows, prompt, steps, configs, batch, deadline)
    windows = windows[:len(runs[("full", 1.0, 0)][0])]  # the windows done
    targets = windows[:, prompt + 1:]  # (W, N): decode step i feeds byte prompt + i, predicts prompt + i + 1

    full_logits = runs[("full", 1.0, 0)][0]
    # the decode loop's full cache against the model run on whole sequences: the harness itself
    with torch.no_grad():
        whole = model(windows[:batch, :context])[:, prompt:].float()
    harness_error = float((whole - full_logits[:batch]).abs().max())
    reference_top1 = full_logits.argmax(-1)
    full = score(full_logits, targets, reference_top1)

    rows = []
    for budget in budgets:
        for policy in policies:
            scored = [(score(logits, targets, reference_top1), stats)
                      for (method, b, _), (logits, stats) in runs.items() if method == policy and b == budget]
            bits = [r["bits_per_byte"] for r, _ in scored]
            per_window = [statistics.fmean(values) for values in zip(*(r["per_window_bits"] for r, _ in scored))]
            stats = scored[0][1]
            rows.append({
                "budget": budget, "method": policy, "seeds": len(scored),
                "bits_per_byte": statistics.fmean(bits),
                "bits_per_byte_seed_spread": (max(bits) - min(bits)) / 2 if len(bits) > 1 else None,
                "bits_per_byte_per_seed": bits,
                "relative_increase": statistics.fmean(bits) / full["bits_per_byte"] - 1,
                "top1_agreement": statistics.fmean(r["top1_agreement"] for r, _ in scored),
                "top1_accuracy": statistics.fmean(r["top1_accuracy"] for r, _ in scored),
                "kv_bytes_ratio": stats["kv_cache_bytes"] / stats["full_kv_cache_bytes"],
                "attention_reads_ratio": stats["attention_key_reads"] / stats["full_attention_key_reads"],
                "kept_after_prompt": stats["kept_after_prompt"],
                "per_window_bits": [round(bits, 6) for bits in per_window],
            })

    comparisons = {}
    for budget in budgets:
        by_method = {row["method"]: row for row in rows if row["budget"] == budget}
        if "keyformer" in by_method and "streaming" in by_method:
            comparisons[f"keyformer - streaming @ {budget:.0%}"] = paired(
                by_method["keyformer"]["per_window_bits"], by_method["streaming"]["per_window_bits"])
        if "keyformer" in by_method and "h2o" in by_method:
            comparisons[f"keyformer - h2o @ {budget:.0%}"] = paired(
                by_method["keyformer"]["per_window_bits"], by_method["h2o"]["per_window_bits"])

    def row_of(method, budget):
        return next((r for r in rows if r["method"] == method and r["budget"] == budget), None)

    checks = {}
    keyformer_half = row_of("keyformer", 0.5)
    if keyformer_half:
        checks["keyformer @ 50%: bits/byte increase <= 1% relative"] = keyformer_half["relative_increase"] <= 0.01
    for budget in (0.3, 0.2):
        k, s = row_of("keyformer", budget), row_of("streaming", budget)
        if k and s:
            checks[f"keyformer beats streaming @ {budget:.0%}"] = k["bits_per_byte"] < s["bits_per_byte"]

    if args.mean_score:  # not Keyformer or H2O as published: the acceptance does not apply
        checks = {}
        for row in rows:
            if row["method"] != "streaming":
                row["method"] += " (mean_score)"
        comparisons = {key.replace("keyformer", "keyformer (mean_score)").replace("h2o", "h2o (mean_score)"): value
                       for key, value in comparisons.items()}
    card = json.loads((CHECKPOINT_DIR / f"{name}.json").read_text())
    record = {
        "benchmark": "kv_prune_quality", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "model": name, "checkpoint_sha256": card["checkpoint"]["sha256"],
        "model_validation_bits_per_byte": card.get("metrics", {}).get("validation_bits_per_byte"),
        "data": f"{python_version()} stdlib validation stream, {len(windows)} windows of {context} bytes "
                f"(the first {len(windows)} in spread order of {count} evenly spaced), "
                f"sha256 {hashlib.sha256(held_out_text()).hexdigest()[:16]}",
        "windows_scored": len(windows), "windows_planned": count, "minutes_limit": args.minutes,
        "held_out_matches_card": hashlib.sha256(held_out_text()).hexdigest() == card["corpus"]["sha256_validation"],
        "protocol": {"prompt_bytes": prompt, "scored_bytes_per_window": steps, "scored_bytes": targets.numel(),
                     "window": args.window, "streaming_sinks": 4, "keyformer_tau": [1.0, 2.0],
                     "mean_score": args.mean_score,
                     "budget_meaning": ("fixed: round(f x prompt) tokens for the whole decode, one eviction per "
                                        "step (the Keyformer paper's setting)") if args.fixed else
                                       "fraction of the tokens seen: f of the prompt after prefill"},
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "device": f"cpu ({platform.machine()}, {args.threads} thread(s))",
        "seconds": round(time.time() - started, 1),
        "harness_max_abs_error_vs_full_forward": harness_error,
        "window_order": spread_order(count)[:len(windows)],  # which of the evenly spaced windows, in run order
        "full": full,  # per_window_bits follow window_order: runs on other windows can be pooled
        "rows": [{key: round(value, 6) if isinstance(value, float) else value for key, value in row.items()}
                 for row in rows],
        "paired_bits_per_byte_differences": comparisons,
        "acceptance": checks,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"kv_prune_quality_{name}" + ("_fixed" if args.fixed else "") + ("_mean" if args.mean_score else "")
    (out / f"{stem}.json").write_text(json.dumps(record, indent=1) + "\n")
    table = markdown_table(rows, full)
    lines = [f"# KV-cache pruning quality on {name}", "",
             f"{record['data']}; prompt {prompt} bytes (full attention), then {steps} bytes teacher-forced "
             f"through the pruned cache and scored ({targets.numel():,} bytes). Budget: "
             + ("the paper's, round(f x prompt) tokens fixed while decoding (one eviction per step). "
                if args.fixed else "f of the tokens seen (the cache grows by f per decoded token). ")
             + ("Keyformer and H2O rank by mean weight per query (mean_score: an experiment, not the papers' "
                "method). " if args.mean_score else "")
             + "Keyformer: "
             + (f"mean of {args.seeds} Gumbel seeds (± half the range)" if args.seeds > 1 else "Gumbel seed 0")
             + f". Window {args.window:.0%} of the budget for "
             f"Keyformer and H2O; StreamingLLM: 4 sinks + recent. KV bytes and keys read are relative to a "
             f"full cache over the same tokens. {record['date'][:10]}, {record['device']}, "
             f"torch {torch.__version__}.", "", table, "",
             "Paired per-window differences in bits/byte (95% interval):", ""]
    lines += [f"- {name_}: {c['mean']:+.4f} [{c['low']:+.4f}, {c['high']:+.4f}]" for name_, c in comparisons.items()]
    lines += ["", "Acceptance:", ""] + [f"- {'met' if ok else 'NOT met'}: {what}" for what, ok in checks.items()]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"harness check: decode-loop full cache vs whole-sequence forward, max |Δlogit| {harness_error:.2e}")
    print("\n".join(lines[2:]))


if __name__ == "__main__":
    main()
