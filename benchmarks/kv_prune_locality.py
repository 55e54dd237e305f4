"""How local is gpt-small's attention, and how much of it does each eviction policy keep?

For windows of held-out bytes (the quality benchmark's windows: 1024 bytes, prompt 768, the last
256 positions are the ones the quality table scores) this runs the model once over the whole
window with full attention and keeps the attention probabilities p(q, j) of the scored queries
q = 768..1023, every layer and head. From them, per query:

* **distance profile**: the mass on the last w keys (j > q - w) for a few w, and on the first 4
  positions (attention sinks);
* at each budget f (cache of k = ⌈f·(q+1)⌉ tokens, as ``slimline.passes.kv_prune`` sizes it):
  the mass on the recent window alone (⌊0.3·k⌋ newest keys), on StreamingLLM's set (4 sinks +
  the k - 4 newest), and the **oracle**: the sum of the k largest p(q, ·) — the most any policy
  keeping k tokens for this query could keep, with hindsight;
* **coverage of the real policies**: Keyformer, H2O and StreamingLLM run through the decode loop
  (teacher forcing, as in the quality benchmark), and before each step the set each (layer, head)
  holds is read from the cache; coverage = Σ p(q, j) over that set (the new token included), with
  p from the full-attention pass. (The pruned model's own hidden states drift from the full
  model's; the full-attention p is the common yardstick.)

Everything is averaged over queries, windows, layers and heads (and listed per layer).

    nice -n 10 python benchmarks/kv_prune_locality.py --windows 4       # ~5 min on one thread

Writes benchmarks/results/kv_prune_locality_<model>.json and .md; prints the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from kv_prune_quality import spread_order, windows_of  # noqa: E402

from slimline.kv import DecodeSession  # noqa: E402
from slimline.kv.cache import EMPTY  # noqa: E402
from slimline.kv.session import prefill_together  # noqa: E402
from slimline.models.quality import held_out_text, trained_model  # noqa: E402
from slimline.passes.kv_prune import make_plan  # noqa: E402

DISTANCES = (1, 8, 32, 64, 128, 256, 512)
SINKS = 4
LOG2 = math.log(2)


@torch.no_grad()
def full_attention(model, rows: torch.Tensor, first_query: int) -> torch.Tensor:
    """(L, B, H, Q, T) attention probabilities of queries first_query..T-1 over all T keys."""
    session = DecodeSession(model, None, steps=0)
    adapter = session.adapter
    B, T = rows.shape
    kept: dict[int, list] = {layer: [] for layer in range(adapter.n_layer)}
    seen = {layer: 0 for layer in range(adapter.n_layer)}

    def observe(layer: int, logits: torch.Tensor) -> None:  # (B, Hkv, G, Tq, T)
        start, Tq = seen[layer], logits.shape[3]
        seen[layer] += Tq
        lo = max(first_query, start)
        if lo < start + Tq:
            chunk = logits[:, :, :, lo - start:].float().softmax(dim=-1)
            kept[layer].append(chunk.flatten(1, 2))  # (B, H, Tq', T)

    adapter.prefill(rows, observe)
    return torch.stack([torch.cat(kept[layer], dim=2) for layer in range(adapter.n_layer)])


def size_of(budget: float, seen: int) -> int:
    return make_plan({"budget": budget}, seen, 0).size(seen)


def static_measures(probs: torch.Tensor, first_query: int, budgets: list[float]) -> dict:
    """Distance profile, window / streaming / oracle mass per budget: each (L,) per-layer means and overall."""
    L, B, H, Q, T = probs.shape
    queries = torch.arange(first_query, first_query + Q)
    keys = torch.arange(T)
    distance = queries[:, None] - keys[None, :]  # (Q, T), < 0 in the future (p = 0 there)

    def mass(mask_QT: torch.Tensor) -> torch.Tensor:  # -> (L,) mean over B, H, Q
        return (probs * mask_QT).sum(-1).mean(dim=(1, 2, 3))

    result = {"distance": {}, "budgets": {}}
    for w in DISTANCES:
        result["distance"][f"last_{w}"] = mass((distance >= 0) & (distance < w)).tolist()
    result["distance"][f"first_{SINKS}"] = mass((keys < SINKS)[None, :].expand(Q, T)).tolist()
    ordered = probs.sort(dim=-1, descending=True).values.cumsum(dim=-1)  # (L, B, H, Q, T)
    for budget in budgets:
        k = torch.tensor([size_of(budget, int(q) + 1) for q in queries])  # (Q,)
        window = torch.tensor([max(1, math.floor(round(0.3 * int(kk), 9))) for kk in k])
        in_window = (distance >= 0) & (distance < window[:, None])
        streaming = (distance >= 0) & ((distance < (k - SINKS)[:, None]) | (keys[None, :] < SINKS))
        oracle = ordered.gather(-1, (k - 1).view(1, 1, 1, Q, 1).expand(L, B, H, Q, 1)).squeeze(-1).mean(dim=(1, 2, 3))
        result["budgets"][str(budget)] = {"tokens_kept_mean": float(k.float().mean()),
                                         "window_tokens_mean": float(window.float().mean()),
                                         "recent_window": mass(in_window).tolist(),
                                         "streaming_set": mass(streaming).tolist(),
                                         "oracle_top_k": oracle.tolist()}
    return result


@torch.no_grad()
def policy_coverage(model, rows: torch.Tensor, probs: torch.Tensor, prompt: int, configs: dict) -> dict:
    """Per config: coverage (L,) per layer, and the bits/byte of its teacher-forced predictions."""
    B, T = rows.shape
    steps = T - 1 - prompt  # positions prompt..T-2 fed, predicting prompt+1..T-1
    sessions = {name: DecodeSession(model, config, steps=steps) for name, config in configs.items()}
    prefill_together(list(sessions.values()), rows[:, :prompt])
    out = {}
    for name, session in sessions.items():
        total = torch.zeros(probs.shape[0])
        nats = []
        for i in range(steps):
            query = prompt + i  # row i of probs (first query = prompt)
            cache = session.cache
            positions = cache.positions[..., : cache.filled].clone()  # (L, B, Hkv, S) before this step
            logits = session.step(rows[:, query:query + 1])
            nats.append(F.cross_entropy(logits.float(), rows[:, query + 1], reduction="none"))
            positions[positions == EMPTY] = query  # the freed slot takes the new token
            held = torch.zeros(positions.shape[:3] + (T,), dtype=probs.dtype)
            held.scatter_(-1, positions, 1.0)
            held[..., query] = 1.0
            total += (probs[:, :, :, i] * held).sum(-1).mean(dim=(1, 2))
        out[name] = {"coverage": (total / steps).tolist(),
                     "bits_per_byte": float(torch.stack(nats).double().mean() / LOG2)}
        sessions[name] = None
    return out


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gpt-small")
    parser.add_argument("--windows", type=int, default=4, help="first windows in spread order of 64")
    parser.add_argument("--budgets", default="0.5,0.3,0.2")
    parser.add_argument("--policies", default="keyformer,h2o,streaming")
    parser.add_argument("--mean-score", action="store_true",
                        help="also Keyformer and H2O ranked by mean weight per query (kv_prune mean_score; "
                             "not the papers')")
    parser.add_argument("--fixed", action="store_true", help="budgets as fixed token counts, round(f x prompt)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()
    model = trained_model(args.model)
    context = model.config.context_length
    prompt = context * 3 // 4
    windows = windows_of(held_out_text(), context + 1, 64)[: args.windows]
    rows = windows[:, :context]
    budgets = [float(b) for b in args.budgets.split(",")]

    probs = full_attention(model, rows, prompt)  # (L, B, H, Q, T)
    static = static_measures(probs, prompt, budgets)
    configs = {"full": None}
    for budget in budgets:
        size = max(1, round(budget * prompt)) if args.fixed else budget
        for policy in args.policies.split(","):
            configs[f"{policy} {budget:.0%}"] = {"policy": policy, "budget": size}
            if args.mean_score and policy != "streaming":
                configs[f"{policy}-mean {budget:.0%}"] = {"policy": policy, "budget": size, "mean_score": True}
    coverage = policy_coverage(model, rows, probs, prompt, configs)

    record = {"benchmark": "kv_prune_locality", "model": args.model,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "windows": args.windows, "window_order": spread_order(64)[: args.windows],
              "queries": f"positions {prompt}..{context - 1} of each {context}-byte window",
              "versions": {"torch": torch.__version__, "python": platform.python_version()},
              "device": f"cpu ({platform.machine()}, {args.threads} thread(s))",
              "budget_meaning": "fixed round(f x prompt) tokens" if args.fixed else "f of the tokens seen",
              "configs": {name: config for name, config in configs.items()},
              "static": static, "policies": coverage, "seconds": round(time.time() - started, 1)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"kv_prune_locality_{args.model}" + ("_fixed" if args.fixed else "") + ("_mean" if args.mean_score else "")
    (out / f"{stem}.json").write_text(json.dumps(record, indent=1) + "\n")

    L = probs.shape[0]
    lines = [f"# Attention locality of {args.model} and what each policy keeps", "",
             f"{args.windows} held-out windows (spread order of 64, as the quality table), queries = the "
             f"{context - prompt} scored positions {prompt}..{context - 1}; p from one full-attention pass. "
             f"Budget: {record['budget_meaning']}. "
             f"Means over queries, windows, heads; per layer 0..{L - 1}. {record['date'][:10]}, {record['device']}.",
             "", "Attention mass by distance (the key j with q - j < w; sinks = positions 0-3):", "",
             "| keys | mean | per layer |", "| --- | ---: | --- |"]
    for key, values in static["distance"].items():
        lines.append(f"| {key.replace('_', ' ')} | {mean(values):.3f} | {' '.join(f'{v:.2f}' for v in values)} |")
    lines += ["", "Mass on the tokens each set holds (oracle: the k most-attended keys of each query, hindsight; "
              "policies: the set the decode loop holds, full-attention p):", "",
              "| budget | k (mean) | recent window 30% | streaming set | oracle top-k | keyformer | h2o | streaming (loop) "
              f"| bits/byte K / H / S (full {coverage['full']['bits_per_byte']:.4f}) |",
              "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for budget in budgets:
        b = static["budgets"][str(budget)]
        cells = [mean(coverage[f"{p} {budget:.0%}"]["coverage"]) if f"{p} {budget:.0%}" in coverage else float("nan")
                 for p in ("keyformer", "h2o", "streaming")]
        bits = " / ".join(f"{coverage[f'{p} {budget:.0%}']['bits_per_byte']:.4f}"
                          for p in ("keyformer", "h2o", "streaming") if f"{p} {budget:.0%}" in coverage)
        lines.append(f"| {budget:.0%} | {b['tokens_kept_mean']:.0f} | {mean(b['recent_window']):.3f} | "
                     f"{mean(b['streaming_set']):.3f} | {mean(b['oracle_top_k']):.3f} | "
                     + " | ".join(f"{c:.3f}" for c in cells) + f" | {bits} |")
    lines += ["", "Per layer at 50% (missing mass = 1 - coverage):", "",
              "| layer | outside recent window | outside streaming set | outside oracle | outside keyformer |",
              "| ---: | ---: | ---: | ---: | ---: |"]
    half = static["budgets"].get("0.5")
    if half and "keyformer 50%" in coverage:
        for layer in range(L):
            lines.append(f"| {layer} | {1 - half['recent_window'][layer]:.3f} | {1 - half['streaming_set'][layer]:.3f} | "
                         f"{1 - half['oracle_top_k'][layer]:.3f} | "
                         f"{1 - coverage['keyformer 50%']['coverage'][layer]:.3f} |")
    lines += ["", "Every decode-loop run (coverage = mean over layers; bits/byte of its teacher-forced predictions):", "",
              "| run | coverage | bits/byte | Δ vs full |", "| --- | ---: | ---: | ---: |"]
    for name, row in coverage.items():
        lines.append(f"| {name} | {mean(row['coverage']):.3f} | {row['bits_per_byte']:.4f} | "
                     f"{row['bits_per_byte'] / coverage['full']['bits_per_byte'] - 1:+.2%} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
