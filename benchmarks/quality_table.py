"""The quality harness over every trained model, and the 3-bit perturbation it must notice.

One table: each trained model's task metrics on held-out data (quick slices by default: GPTs
on the first held-out bytes, MiniLM on 128 sentences), beside a copy with every weight rounded
to 3 bits, so the deltas show the metrics move the right way. Also `slimline.verify` with a
bits/byte budget on the perturbed gpt-tiny. JSON and Markdown to benchmarks/results/.

    python benchmarks/quality_table.py [--full]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform

import torch

import slimline
from slimline.models.quality import (QUALITY_MODELS, quality_table, round_weights, text_eval_set,
                                     trained_model)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/quality_table")
    args = parser.parse_args()
    torch.set_num_threads(1)
    perturbed = {name: round_weights(trained_model(name), 3) for name in QUALITY_MODELS}
    rows = quality_table(QUALITY_MODELS, candidates=perturbed, quick=not args.full)

    budget = slimline.Budget(metric="bits_per_byte", max_loss=0.01,
                             inputs=text_eval_set("gpt-tiny", quick=True))
    model = trained_model("gpt-tiny")
    idx = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    verification = slimline.verify(model, perturbed["gpt-tiny"], (idx,), budget=budget)

    record = {"benchmark": "quality_table", "date": datetime.datetime.now().isoformat(),
              "quick": not args.full, "perturbation": "every weight rounded to 3 bits (round_weights)",
              "versions": {"torch": torch.__version__, "python": platform.python_version()},
              "rows": rows, "verify_perturbed_gpt_tiny": verification.to_json()}
    with open(args.out + ".json", "w") as stream:
        json.dump(record, stream, indent=2, default=str)
    lines = ["| model | metric | unit | trained | 3-bit copy | delta | data |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [r["model"], r["metric"], r.get("unit", ""), f"{r['value']:.4f}",
                 f"{r['candidate']:.4f}" if r.get("candidate") is not None else "",
                 f"{r['delta']:+.4f}" if r.get("delta") is not None else "", r.get("data", "")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines.append("")
    lines.append(f"verify(gpt-tiny, 3-bit copy, budget bits/byte ≤ +1%): {verification.verdict}; "
                 f"task metric {json.dumps(verification.task_metrics)}")
    with open(args.out + ".md", "w") as stream:
        stream.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
