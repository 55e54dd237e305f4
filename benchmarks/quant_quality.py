"""Quality of the quantize pass on the trained reference models, per bit width and method.

Each model is captured, canonicalized and quantized by the pass (every eligible dense layer;
the budget fit off, so the figures are the raw cost of each setting), then judged on its own
held-out task data with the quality harness (``slimline.models.quality``):

    gpt-tiny / gpt-small   bits/byte on held-out stdlib text, relative increase   lower is better
    minilm                 mean cosine of sentence embeddings with float32          higher
    vit                    digits test accuracy                                     higher

Calibration data never overlaps the evaluation data: GPT calibration windows come from
training-split files, MiniLM's from docstring sentences after the evaluated ones, ViT's from
the digits training split. The tied GPT head (shared with the embedding) stays float32.

    python benchmarks/quant_quality.py [--models gpt-tiny,minilm,vit] [--text-bytes 65536]

Prints a table and writes ``benchmarks/results/quant_quality.json``.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import inspect
import json
import platform
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
SETTINGS = {  # name -> quantize.Config fields (fit_budget off)
    "int8": {"bits": 8},
    "int8 w+a": {"bits": 8, "activations": "dynamic_int8"},
    "int4 g128 rtn": {"bits": 4, "group_size": 128, "method": "rtn"},
    "int4 g128 gptq": {"bits": 4, "group_size": 128, "method": "gptq"},
    "int3 g128 rtn": {"bits": 3, "group_size": 128, "method": "rtn"},
    "int3 g128 gptq": {"bits": 3, "group_size": 128, "method": "gptq"},
    "int2 g64 rtn": {"bits": 2, "group_size": 64, "method": "rtn"},
    "int2 g64 gptq": {"bits": 2, "group_size": 64, "method": "gptq"},
}
TARGETS = {  # setting -> (max relative bits/byte increase, min MiniLM cosine)
    "int8": (0.005, 0.995),
    "int4 g128 rtn": (0.03, 0.98),
    "int4 g128 gptq": (0.03, 0.98),
}


def _train_text(count: int) -> bytes:
    """Training-split stdlib files in the order of their path's SHA-256, ``count`` bytes."""
    from slimline.models.corpus import list_sources, stdlib_root

    root = stdlib_root()
    files = [f for f in list_sources(root, include_tests=False) if f.split == "train"]
    files.sort(key=lambda f: hashlib.sha256(f.path.encode()).hexdigest())
    chunks, total = [], 0
    for source in files:
        chunks.append((root / source.path).read_bytes())
        total += len(chunks[-1])
        if total >= count:
            break
    return b"".join(chunks)[:count]


class Task:
    """One model: its inputs for capture and calibration, and the metric that judges it."""

    def __init__(self, name: str, options: argparse.Namespace):
        from slimline.models import quality

        self.name = name
        self.model = quality.trained_model(name)
        if name.startswith("gpt"):
            self.eval_set = quality.text_eval_set(name, max_bytes=options.text_bytes)
            window = self.eval_set.window
            stream = torch.frombuffer(bytearray(_train_text(8 * window * 2 + 1)), dtype=torch.uint8).long()
            windows = stream[: 16 * window].view(16, window)
            self.calibration = [(windows[i:i + 8],) for i in (0, 8)]
            self.example = (self.eval_set.windows[:8, :-1],)
            self.metric, self.higher = "bits_per_byte", False
        elif name == "minilm":
            from slimline.models.minilm import MAX_LENGTH, docstring_sentences, load_tokenizer

            self.eval_set = quality.sentence_eval_set(options.sentences)
            extra = docstring_sentences(options.sentences + 128)[options.sentences:]
            tokens = load_tokenizer()(extra, padding="max_length", truncation=True,
                                      max_length=MAX_LENGTH, return_tensors="pt")
            ids, mask = tokens["input_ids"].long(), tokens["attention_mask"].long()
            self.calibration = [(ids[i:i + 32], mask[i:i + 32]) for i in range(0, 128, 32)]
            self.example = (self.eval_set.input_ids[:32], self.eval_set.attention_mask[:32])
            self.metric, self.higher = "embedding_cosine", True
        else:
            self.eval_set = quality.digits_eval_set()
            train = quality.digits_split()["train_images"]
            self.calibration = [(train[i:i + 64],) for i in range(0, 256, 64)]
            self.example = (self.eval_set.images[:8],)
            self.metric, self.higher = "accuracy", True

    def graph(self):
        from slimline.ir.capture import capture
        from slimline.passes import canonicalize_linear
        from slimline.passes.base import PassContext

        names = list(inspect.signature(self.model.forward).parameters)
        dynamic = {names[0]: {0: "batch"}} if len(self.example) == 1 else \
            {names[0]: {0: "batch"}, names[1]: {0: "batch"}}
        graph = capture(self.model, self.example, dynamic_shapes=dynamic)
        return canonicalize_linear.run(graph, canonicalize_linear.Config(),
                                       PassContext("cpu", "balanced")).graph

    def score(self, runner) -> float:
        from slimline.budget import METRICS

        function, _higher = METRICS[self.metric]
        return float(function(runner, self.eval_set))


def _runner(graph):
    def run(*inputs):
        with torch.no_grad():
            return graph.module(*inputs)
    return run


def measure(task: Task, settings: list[str]) -> list[dict]:
    from slimline.passes import quantize
    from slimline.passes.base import PassContext

    graph = task.graph()
    baseline = task.score(_runner(graph))
    rows = [{"model": task.name, "setting": "float32", "metric": task.metric, "value": baseline,
             "relative_change": 0.0, "weight_bytes_ratio": 1.0}]
    for setting in settings:
        config = quantize.Config(fit_budget=False, allow_slower=True, **SETTINGS[setting])
        context = PassContext("cpu", "balanced", calibration=[(c, {}) for c in task.calibration])
        clock = time.perf_counter()
        result = quantize.run(graph.copy(), config, context)
        seconds = time.perf_counter() - clock
        value = task.score(_runner(result.graph))
        change = (value - baseline) / abs(baseline)
        stats = result.stats
        rows.append({"model": task.name, "setting": setting, "metric": task.metric, "value": value,
                     "relative_change": change, "quantize_seconds": seconds,
                     "layers_quantized": stats["quantized"], "layers_refused": stats["refused"],
                     "weight_bytes_ratio": stats["weight_bytes_after"] / max(stats["weight_bytes_before"], 1),
                     "min_layer_sqnr_db": stats.get("min_sqnr_db")})
    return rows


def _verdict(row: dict) -> str:
    target = TARGETS.get(row["setting"])
    if target is None:
        return ""
    if row["metric"] == "bits_per_byte":
        return "met" if row["relative_change"] <= target[0] else "MISSED"
    if row["metric"] == "embedding_cosine":
        return "met" if row["value"] >= target[1] else "MISSED"
    return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="gpt-tiny,gpt-small,minilm,vit")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--text-bytes", type=int, default=65536, help="held-out bytes scored")
    parser.add_argument("--sentences", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    settings = options.settings.split(",")

    rows, skipped = [], {}
    for name in options.models.split(","):
        try:
            task = Task(name, options)
        except Exception as error:  # a checkpoint not trained yet: say so, go on
            skipped[name] = f"{type(error).__name__}: {str(error).splitlines()[0]}"
            continue
        wanted = [s for s in settings if s != "int8 w+a" or name == "minilm"]
        rows += measure(task, wanted)
        for row in rows:
            row["verdict"] = _verdict(row)

    result = {"benchmark": "quant_quality", "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "device": platform.processor() or platform.machine(), "threads": options.threads,
              "versions": {"torch": torch.__version__, "python": platform.python_version()},
              "text_bytes": options.text_bytes, "sentences": options.sentences,
              "targets": {k: {"max_relative_bits_per_byte": v[0], "min_minilm_cosine": v[1]}
                          for k, v in TARGETS.items()},
              "rows": rows, "skipped_models": skipped}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "quant_quality.json").write_text(json.dumps(result, indent=2))

    print(f"{'model':10} {'setting':15} {'metric':17} {'value':>9} {'change':>8} {'bytes':>6} "
          f"{'min SQNR':>8}  verdict")
    for row in rows:
        sqnr = row.get("min_layer_sqnr_db")
        print(f"{row['model']:10} {row['setting']:15} {row['metric']:17} {row['value']:9.5f} "
              f"{row['relative_change'] * 100:+7.2f}% {row['weight_bytes_ratio']:6.3f} "
              f"{'' if sqnr is None else format(sqnr, '8.1f'):>8}  {row.get('verdict', '')}")
    for name, why in skipped.items():
        print(f"{name}: not measured ({why})")


if __name__ == "__main__":
    main()
