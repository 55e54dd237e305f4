"""Train a byte-level reference GPT on the standard-library corpus and write its checkpoint + card.

    python -m slimline.models.train_gpt --config gpt-tiny --minutes 4 --out slimline/models/checkpoints
    PYTHONPATH=. python3 -m slimline.models.train_gpt --config gpt-small --minutes 8 \\
        --corpus out/slimline-corpus-3.11.7 --compile --out $OUT          # on the H200

Recipe: AdamW (betas 0.9/0.95, weight decay 0.1 on matrices only), linear warmup then cosine
decay to 10% of the peak rate, gradient clipping at 1.0, random windows of ``context_length + 1``
bytes drawn from the training stream by a seeded generator, bf16 autocast on CUDA. The run is
bounded by ``--minutes`` (wall clock, from the start of the script): after a few timed steps the
total step count is fixed so the cosine schedule ends on time; ``--steps`` fixes it outright and
makes a run repeatable step for step.

Training computes attention with ``scaled_dot_product_attention(is_causal=True)`` (see
:func:`training_logits`): the same function as the model's hand-written attention, checked
against ``model(idx)`` before the first step, but far cheaper in memory and time. Every
evaluation runs the model's own ``forward`` in float32.

The checkpoint is written atomically, in the dtype of ``--save-dtype``, and every reported metric
is measured on the weights *as saved* (rounded to that dtype), by the quality harness's
:func:`~slimline.models.quality.evaluate_text` on the corpus's validation stream. It prints
progress: it is a script.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from slimline.models.checkpoint import round_trip_dtype, save_checkpoint, write_card
from slimline.models.corpus import Corpus, build_corpus, load_corpus
from slimline.models.gpt import GPT, GPT_CONFIGS, apply_rotary, generate
from slimline.models.quality import QUICK_BYTES, TextEvalSet, evaluate_text

__all__ = ["TrainConfig", "DEFAULTS", "training_logits", "train", "main"]

SAMPLE_PROMPTS = ("def ", "import os\n", "class ")
SAMPLE_BYTES = 200
_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}

# per-config recipe defaults: (batch size, peak learning rate, warmup steps, save dtype)
DEFAULTS = {
    "gpt-tiny": dict(batch_size=8, learning_rate=3e-3, warmup_steps=30, save_dtype="fp32"),
    "gpt-small": dict(batch_size=64, learning_rate=1.5e-3, warmup_steps=300, save_dtype="bf16"),
}


def training_logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """``model(idx)`` with fused causal attention: (B, T) int64 -> logits (B, T, V).

    The same computation as :meth:`GPT.forward` block by block, except that
    ``softmax(q k^T * scale + causal_bias) v`` runs as one ``scaled_dot_product_attention`` call.
    """
    B, T = idx.shape
    x = model.token_embedding(idx)  # (B, T, C)
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]  # (T, hs)
    for block in model.blocks:
        attention = block.attn
        h = block.ln_attn(x)  # (B, T, C)
        q = apply_rotary(attention.split_heads(attention.query(h)), cos, sin)  # (B, nh, T, hs)
        k = apply_rotary(attention.split_heads(attention.key(h)), cos, sin)  # (B, nh, T, hs)
        v = attention.split_heads(attention.value(h))  # (B, nh, T, hs)
        q, k = q.to(v.dtype), k.to(v.dtype)  # under autocast the rotation promotes q, k to float32
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        x = x + attention.proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, C)
        x = x + block.mlp(block.ln_mlp(x))  # (B, T, C)
    return model.head(model.ln_final(x))  # (B, T, V)


def _log(message: str) -> None:
    print(message, flush=True)


def _learning_rate(step: int, total_steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def _optimizer(model: GPT, learning_rate: float, fused: bool) -> torch.optim.AdamW:
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": 0.1}, {"params": others, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.95), fused=fused)


def _eval_set(stream: bytes, model: GPT, max_bytes: int | None, batch_size: int) -> TextEvalSet:
    return TextEvalSet.from_bytes(stream, window=model.config.context_length, batch_size=batch_size,
                                  max_bytes=max_bytes)


def _samples(model: GPT, device: torch.device, seed: int) -> list[dict]:
    generator = torch.Generator(device=device).manual_seed(seed)
    samples = []
    for prompt in SAMPLE_PROMPTS:
        idx = torch.tensor([list(prompt.encode())], device=device)
        out = generate(model, idx, SAMPLE_BYTES, greedy=False, temperature=0.8, generator=generator)
        text = bytes(out[0].tolist()).decode("utf-8", errors="replace")
        samples.append({"prompt": prompt, "temperature": 0.8, "text": text})
    return samples


def _markdown(card: dict) -> str:
    metrics, training, corpus = card["metrics"], card["training"], card["corpus"]
    lines = [
        f"# {card['name']}: byte-level GPT trained on the CPython standard library",
        "",
        f"- parameters: {card['parameters']:,} ({card['parameters_without_embedding']:,} without the embedding)",
        f"- config: `{json.dumps(card['config'])}`",
        f"- **validation bits/byte: {metrics['val_bits_per_byte']:.4f}** "
        f"(next-byte top-1 accuracy {metrics['val_top1_accuracy']:.4f}) on {metrics['val_bytes']:,} held-out bytes, "
        f"windows of {metrics['window']}, float32, weights as saved ({card['checkpoint']['dtype']})",
        f"- quick slice (first {metrics['quick_bytes']:,} validation bytes, used by tests): "
        f"{metrics['quick_bits_per_byte']:.4f} bits/byte",
        f"- data: {corpus['python_version']} standard library, {corpus['bytes_train']:,} training bytes "
        f"({corpus['files_core_train']} library + {corpus['files_tests']} test-suite files), "
        f"{corpus['bytes_validation']:,} validation bytes ({corpus['files_validation']} files); "
        f"corpus SHA-256 `{corpus['sha256_corpus']}`, validation SHA-256 `{corpus['sha256_validation']}`",
        f"- training: {training['steps']} steps x {training['batch_size']} x {training['context_length']} bytes "
        f"({training['tokens'] / 1e6:.1f}M bytes seen), {training['train_seconds']:.0f} s on {training['device']} "
        f"({training['precision']}), torch {training['torch']}, Python {training['python']}, seed {training['seed']}",
        f"- command: `{card['command']}`",
        "",
        "## Validation during training",
        "",
        "| step | seconds | train loss (bits/byte) | quick val bits/byte |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for row in training["history"]:
        lines.append(f"| {row['step']} | {row['seconds']:.0f} | {row['train_bits_per_byte']:.3f} | {row['val_bits_per_byte']:.3f} |")
    lines += ["", "## Samples (temperature 0.8)", ""]
    for sample in card["samples"]:
        lines += [f"Prompt `{sample['prompt']!r}`:", "", "```", sample["text"].replace("\x00", "\u2400"), "```", ""]
    return "\n".join(lines)


class TrainConfig(argparse.Namespace):
    """The parsed command line (see ``main``)."""


def _load_corpus(path: str | None) -> Corpus:
    return load_corpus(path) if path else build_corpus()


def train(args: TrainConfig) -> dict:
    started = time.time()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 evaluation stays float32
        torch.backends.cudnn.allow_tf32 = False
    config = GPT_CONFIGS[args.config]
    T = config.context_length

    corpus = _load_corpus(args.corpus)
    _log(f"corpus: {corpus.python_version}, train {len(corpus.train):,} bytes, "
         f"validation {len(corpus.validation):,} bytes ({time.time() - started:.1f} s)")
    train_stream = torch.frombuffer(bytearray(corpus.train), dtype=torch.uint8).to(device)
    offsets = torch.arange(T + 1, device=device)  # (T+1,)

    torch.manual_seed(args.seed)
    model = GPT(config).to(device)
    _log(f"{args.config}: {model.num_parameters():,} parameters, device {device}")
    data_generator = torch.Generator().manual_seed(args.seed + 1)

    def batch() -> torch.Tensor:
        starts = torch.randint(0, len(corpus.train) - T - 1, (args.batch_size,), generator=data_generator)
        return train_stream[starts.to(device)[:, None] + offsets].long()  # (B, T+1)

    with torch.no_grad():  # the fused training forward computes the model's function
        probe = batch()[:2, :-1]
        error = (training_logits(model, probe) - model(probe)).abs().max().item()
        if error > 1e-3:
            raise RuntimeError(f"training_logits differs from GPT.forward by {error:.2e}")

    optimizer = _optimizer(model, args.learning_rate, fused=on_cuda)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_cuda else torch.autocast("cpu", enabled=False)
    quick_val = _eval_set(corpus.validation, model, args.eval_bytes, batch_size=16)

    def loss_of(forward, window: torch.Tensor) -> torch.Tensor:
        with autocast:
            logits = forward(model, window[:, :-1])  # (B, T, V)
            return F.cross_entropy(logits.float().flatten(0, 1), window[:, 1:].flatten())

    forward = training_logits
    if args.compile:
        compile_started = time.time()
        try:  # compile forward and backward on a probe batch; fall back to eager if that fails
            compiled = torch.compile(training_logits)
            probe = torch.randint(0, 256, (args.batch_size, T + 1), device=device)
            loss_of(compiled, probe).backward()
            optimizer.zero_grad(set_to_none=True)
            forward = compiled
            _log(f"torch.compile: {time.time() - compile_started:.0f} s")
        except Exception as failure:
            optimizer.zero_grad(set_to_none=True)
            _log(f"torch.compile failed ({type(failure).__name__}: {str(failure)[:300]}); training eager")

    def step_once(step: int, total: int) -> torch.Tensor:
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, total, args.learning_rate, args.warmup_steps)
        loss = loss_of(forward, batch())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return loss.detach() / math.log(2)  # stays on the device: no synchronization per step

    history: list[dict] = []
    partial = Path(args.out) / f"{args.name}.partial.safetensors"
    total_steps = args.steps or 10**9
    train_started = time.time()
    deadline = train_started + args.minutes * 60
    last_eval = train_started
    recent: list[torch.Tensor] = []
    step = 0
    timed_from: tuple[int, float] | None = None

    def fit_schedule() -> None:
        """Set total_steps so the schedule ends at the deadline, at the wall time per step so far."""
        nonlocal total_steps
        if on_cuda:
            torch.cuda.synchronize()
        seconds_per_step = (time.time() - timed_from[1]) / (step - timed_from[0])
        total_steps = step + max(1, int((deadline - time.time()) / seconds_per_step))

    model.train()
    while step < total_steps:
        recent.append(step_once(step, total_steps))
        step += 1
        if on_cuda and step % 50 == 0:
            torch.cuda.synchronize()
        if args.steps is None:
            # Time from step 5 on (after compilation and warm-up); fit the schedule at step 25 and
            # again after every evaluation (its cost is then part of the time per step).
            if step == 5:
                if on_cuda:
                    torch.cuda.synchronize()
                timed_from = (step, time.time())
            elif step == 25:
                fit_schedule()
                _log(f"{(time.time() - timed_from[1]) / 20 * 1000:.1f} ms/step -> {total_steps} steps")
        now = time.time()
        if now - last_eval >= args.eval_seconds or step == total_steps:
            model.eval()
            quick = evaluate_text(model, quick_val)["bits_per_byte"]
            model.train()
            train_bpb = torch.stack(recent).mean().item()
            recent = []
            history.append({"step": step, "seconds": round(now - train_started, 1),
                            "train_bits_per_byte": round(train_bpb, 4), "val_bits_per_byte": round(quick, 4)})
            _log(f"step {step}/{total_steps}  {now - train_started:6.0f} s  lr {optimizer.param_groups[0]['lr']:.2e}"
                 f"  train {train_bpb:.3f}  quick val {quick:.3f} bits/byte")
            if on_cuda:  # a safety copy, in case the run is cut off before the end
                save_checkpoint(model, partial, dtype=_DTYPES[args.save_dtype])
            last_eval = time.time()
            if args.steps is None and step > 25 and step < total_steps:
                fit_schedule()
        if args.steps is None and time.time() > deadline + 5:
            _log("out of time: stopping")
            break
    if on_cuda:
        torch.cuda.synchronize()
    train_seconds = time.time() - train_started

    # Measure the weights as they are saved.
    save_dtype = _DTYPES[args.save_dtype]
    model = round_trip_dtype(model.float().eval(), save_dtype)
    full = evaluate_text(model, _eval_set(corpus.validation, model, args.val_bytes, batch_size=16))
    quick_bytes = QUICK_BYTES[args.config]
    quick = evaluate_text(model, _eval_set(corpus.validation, model, quick_bytes, batch_size=16))
    _log(f"validation: {full['bits_per_byte']:.4f} bits/byte, top-1 {full['top1_accuracy']:.4f}; "
         f"quick slice {quick['bits_per_byte']:.4f}")
    samples = _samples(model, device, args.seed)

    out = Path(args.out)
    command = "python -m slimline.models.train_gpt " + " ".join(shlex.quote(a) for a in args.argv)
    checkpoint = save_checkpoint(model, out / f"{args.name}.safetensors", dtype=save_dtype,
                                 metadata={"name": args.name, "architecture": "slimline.models.gpt.GPT",
                                           "config": dataclasses.asdict(config)})
    partial.unlink(missing_ok=True)
    card = {
        "name": args.name,
        "architecture": "slimline.models.gpt.GPT",
        "config_name": args.config,
        "config": dataclasses.asdict(config),
        "parameters": model.num_parameters(),
        "parameters_without_embedding": model.num_parameters(include_embedding=False),
        "command": command,
        "checkpoint": checkpoint,
        "corpus": corpus.card(),
        "training": {
            "seed": args.seed, "steps": step, "batch_size": args.batch_size, "context_length": T,
            "tokens": step * args.batch_size * T, "learning_rate": args.learning_rate,
            "warmup_steps": args.warmup_steps, "schedule": "linear warmup, cosine to 10%",
            "optimizer": "AdamW(0.9, 0.95), weight decay 0.1 on matrices, clip 1.0",
            "train_seconds": round(train_seconds, 1), "wall_seconds": round(time.time() - started, 1),
            "device": torch.cuda.get_device_name(device) if on_cuda else f"CPU ({platform.machine()}, "
                                                                          f"{torch.get_num_threads()} threads)",
            "precision": "bf16 autocast" if on_cuda else "float32",
            "compiled": bool(args.compile and forward is not training_logits),
            "torch": torch.__version__, "python": platform.python_version(),
            "history": history,
        },
        "metrics": {
            "data": f"validation stream of the {corpus.python_version} standard-library corpus",
            "window": T, "val_bytes": full["bytes"],
            "val_bits_per_byte": round(full["bits_per_byte"], 5),
            "val_top1_accuracy": round(full["top1_accuracy"], 5),
            "quick_bytes": quick_bytes,
            "quick_bits_per_byte": round(quick["bits_per_byte"], 5),
            "quick_top1_accuracy": round(quick["top1_accuracy"], 5),
            "measured_on": str(device),
        },
        "samples": samples,
    }
    write_card(args.name, card, _markdown(card), directory=out)
    _log(f"wrote {out / (args.name + '.safetensors')} ({checkpoint['bytes'] / 1e6:.1f} MB) and its card "
         f"in {time.time() - started:.0f} s")
    return card


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description="Train a reference byte-level GPT on the stdlib corpus.")
    parser.add_argument("--config", choices=sorted(GPT_CONFIGS), default="gpt-tiny")
    parser.add_argument("--name", help="checkpoint name (default: the config name)")
    parser.add_argument("--minutes", type=float, default=4.0,
                        help="wall-clock budget of the training loop (final evaluation and saving come after)")
    parser.add_argument("--steps", type=int, help="fixed step count (repeatable); default: fit --minutes")
    parser.add_argument("--out", default=os.fspath(Path(__file__).parent / "checkpoints"))
    parser.add_argument("--corpus", help="a corpus folder saved by slimline.models.corpus (default: build one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--warmup-steps", type=int)
    parser.add_argument("--save-dtype", choices=sorted(_DTYPES))
    parser.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    parser.add_argument("--eval-seconds", type=float, default=60.0, help="seconds between quick evaluations")
    parser.add_argument("--eval-bytes", type=int, default=32768, help="validation bytes in a quick evaluation")
    parser.add_argument("--val-bytes", type=int, help="score only this many validation bytes at the end "
                        "(default: all; for smoke tests)")
    parser.add_argument("--threads", type=int, help="CPU threads (1 is faster on a busy 2-core machine)")
    args = parser.parse_args(argv, namespace=TrainConfig())
    for key, value in DEFAULTS[args.config].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.name = args.name or args.config
    args.argv = argv
    return train(args)


if __name__ == "__main__":
    main()
