"""The ``slimline`` command line: ``optimize``, ``verify``, ``export``, ``quality``.

MODEL is a bundled reference model name (the default when omitted), a ``package.module:factory``
spec, or a transformers config class with keyword overrides (``LlamaConfig:hidden_size=64``).
Only this module prints; progress bars show on a terminal and stay off otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from slimline.errors import ConfigError, SlimlineError

__all__ = ["main"]


def _load(spec: str | None) -> tuple[Any, tuple, dict, str, Any]:
    """The model a spec names, its example inputs, and the dynamic dimensions it is known to have."""
    from slimline.models import DEFAULT_MODEL, REFERENCE_MODELS, reference_dynamic_shapes
    from slimline.models.spec import load_model_spec
    from slimline.models.zoo import ZOO, zoo_dynamic_shapes

    name = spec or DEFAULT_MODEL
    model, args, kwargs = load_model_spec(name)
    dynamic = None
    if name in REFERENCE_MODELS:
        dynamic = reference_dynamic_shapes(name)
    elif name in ZOO:
        dynamic = zoo_dynamic_shapes(name)
    return model, args, kwargs, name, dynamic


def _budget(text: str | None, metric: str) -> Any:
    if text is None:
        return None
    from slimline.budget import Budget

    try:
        value = float(text.rstrip("%")) / (100 if text.endswith("%") else 1)
    except ValueError:
        raise ConfigError(f"cannot read budget {text!r}", stage="configure", where="--budget",
                          hint="write a fraction or a percentage: --budget 1% or --budget 0.01") from None
    return Budget(metric=metric, max_loss=value)


def _progress(total: int, description: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=description, disable=not sys.stderr.isatty(), leave=False,
                bar_format="{desc}: {n}/{total} {postfix}")


def _optimize(arguments: argparse.Namespace) -> Any:
    import slimline

    with _progress(2, "slimline") as bar:
        bar.set_postfix_str("loading model")
        model, args, kwargs, name, dynamic = _load(arguments.model)
        bar.update()
        bar.set_postfix_str("capture, passes, verify")
        optimized = slimline.optimize(model, (args, kwargs), target=arguments.target,
                                      mode=arguments.mode,
                                      budget=_budget(arguments.budget, arguments.metric),
                                      passes=arguments.passes.split(",") if arguments.passes else None,
                                      dynamic_shapes=None if arguments.static else dynamic,
                                      name=name)
        bar.update()
    return model, args, kwargs, optimized


def _command_optimize(arguments: argparse.Namespace) -> int:
    import slimline

    _model, _args, _kwargs, optimized = _optimize(arguments)
    out = Path(arguments.out)
    if not arguments.no_onnx:
        slimline.export_onnx(optimized, out / "model.onnx")
    optimized.report.write_json(out / "report.json")
    print(optimized.report.table())
    print(f"\nwrote {out / 'report.json'}" + ("" if arguments.no_onnx else f" and {out / 'model.onnx'}"))
    return 0


def _command_verify(arguments: argparse.Namespace) -> int:
    import slimline

    model, args, kwargs, optimized = _optimize(arguments)
    result = slimline.verify(model, optimized, (args, kwargs))
    print(optimized.report.table())
    print(f"\nverify: {result.verdict}")
    return 0 if result.passed else 1


def _command_export(arguments: argparse.Namespace) -> int:
    import slimline

    _model, _args, _kwargs, optimized = _optimize(arguments)
    info = slimline.export_onnx(optimized, arguments.output)
    print(json.dumps(info, indent=2, default=str))
    return 0


def _command_quality(arguments: argparse.Namespace) -> int:
    from slimline.models.quality import QUALITY_MODELS, quality_table

    rows = quality_table(arguments.models or QUALITY_MODELS, quick=not arguments.full)
    header = ["model", "metric", "value", "unit", "recorded", "data"]
    table = [[str(r.get("model")), str(r.get("metric")), _number(r.get("value")), str(r.get("unit", "")),
              _number(r.get("recorded")), str(r.get("data", ""))] for r in rows]
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(header)]
    for row in [header, ["─" * w for w in widths], *table]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    if not arguments.full:
        print("\n(quick: GPTs on a short held-out slice, MiniLM on 128 sentences; --full for all)")
    return 0


def _number(value: Any) -> str:
    return "" if value is None else (f"{value:.4f}" if isinstance(value, float) else str(value))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slimline", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    def model_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("model", nargs="?", default=None,
                         help="bundled model name (default: the reference GPT), "
                              "package.module:factory, or ConfigClass:key=value,...")
        sub.add_argument("--target", default="cpu", help="cpu | cuda | onnxruntime")
        sub.add_argument("--mode", default="lossless", help="lossless | balanced | max")
        sub.add_argument("--passes", default=None, help="comma-separated pass names")
        sub.add_argument("--budget", default=None, help="accuracy budget, e.g. 1%% or 0.01")
        sub.add_argument("--metric", default="cosine", help="budget metric (default: cosine)")
        sub.add_argument("--static", action="store_true",
                         help="capture with the example's fixed sizes (no dynamic batch/sequence)")

    optimize = commands.add_parser("optimize", help="optimize a model, write report.json and model.onnx")
    model_options(optimize)
    optimize.add_argument("--out", default="slimline-out", help="output directory")
    optimize.add_argument("--no-onnx", action="store_true", help="skip the ONNX export")
    optimize.set_defaults(handler=_command_optimize)

    verify = commands.add_parser("verify", help="optimize, then compare with the original model")
    model_options(verify)
    verify.set_defaults(handler=_command_verify)

    export = commands.add_parser("export", help="optimize, then write the ONNX file")
    model_options(export)
    export.add_argument("--output", "-o", default="model.onnx")
    export.set_defaults(handler=_command_export)

    quality = commands.add_parser("quality", help="task metrics of bundled trained models")
    quality.add_argument("models", nargs="*", help="model names (default: all trained ones)")
    quality.add_argument("--full", action="store_true",
                         help="the whole held-out sets (slow on a CPU: minutes for gpt-small)")
    quality.set_defaults(handler=_command_quality)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = _parser().parse_args(argv)
    try:
        return arguments.handler(arguments)
    except SlimlineError as error:
        print(f"slimline: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
