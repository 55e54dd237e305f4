"""Feature distillation of a rewritten graph's new factors (PELA's intermediate stage).

The passes that replace dense layers by factors (``lowrank``, ``monarch``) recover the same way:
only the factors train, the backbone stays frozen; the loss is the relative squared error of each
replaced layer's output against the original graph's (the teacher's) output at that layer, on the
calibration samples, plus an optional regulariser; Adam with a per-factor step (each factor's RMS
× the pass's step size); a run that ends worse than it started is undone.

The loss may also match the model's *outputs* (``output_weight`` > 0): the relative squared error
of every floating output of the student against the original's output on the same sample (the
``references`` the pass compares with). Per-layer features alone let errors that each layer's MSE
tolerates add up through the depth; the output term trains the factors for what the user reads
(MiniLM's pooled embeddings: relative MSE of unit vectors is ``2·(1 − cosine)·C``-proportional).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.fx as fx

from slimline.ir.graph import Graph
from slimline.passes.taps import run_tapped

__all__ = ["recover_features"]

_TINY = 1e-12


def recover_features(student: Graph, teacher: Graph, outputs: list[tuple[fx.Node, str]],
                     factors: list[torch.Tensor], samples: list, steps: int,
                     step_size: Callable[[float], float], *, decay: bool = False,
                     regulariser: Callable[[], torch.Tensor] | None = None,
                     regulariser_weight: float = 0.0,
                     cache_bytes: int | None = None,
                     output_weight: float = 0.0, references: list | None = None,
                     feature_weight: float = 1.0) -> dict[str, float]:
    """Train ``factors`` (in place) so the student's layer outputs match the teacher's.

    ``outputs``: per replaced layer, the student's output node and the name of the teacher's node
    it replaces. ``step_size(initial_loss)`` scales every factor's Adam step (× its RMS);
    ``decay`` puts a cosine schedule over the steps; teacher features are kept in memory up to
    ``cache_bytes`` (None: always), else recomputed. ``output_weight`` adds the relative squared
    error of the student's outputs against ``references[i]`` (the original's outputs on
    ``samples[i]``); ``feature_weight`` scales the per-layer feature term (0: outputs only).
    Returns loss statistics (the undo test compares the weighted total).
    """
    if output_weight > 0 and (references is None or len(references) != len(samples)):
        raise ValueError("output_weight > 0 needs one reference output per calibration sample")
    student_watch = {node: i for i, (node, _name) in enumerate(outputs)}
    teacher_nodes = {node.name: node for node in teacher.fx.nodes}
    teacher_watch = {teacher_nodes[name]: i for i, (_node, name) in enumerate(outputs)}

    def teacher_features(index: int) -> dict[int, torch.Tensor]:
        found: dict[int, torch.Tensor] = {}
        with torch.no_grad():
            run_tapped(teacher.module, samples[index], teacher_watch,
                       lambda i, _x, y: found.__setitem__(i, y.detach()))
        return found

    cache = None
    if feature_weight > 0:
        first = teacher_features(0)
        size = sum(t.numel() * t.element_size() for t in first.values()) * len(samples)
        cache = [first] + [teacher_features(i) for i in range(1, len(samples))] \
            if cache_bytes is None or size <= cache_bytes else None

    def terms(index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(feature term, output term) on one sample; a term not asked for is 0."""
        targets = (cache[index] if cache is not None else teacher_features(index)) if feature_weight > 0 else {}
        found: dict[int, torch.Tensor] = {}
        output = run_tapped(student.module, samples[index], student_watch if feature_weight > 0 else {},
                            lambda i, _x, y: found.__setitem__(i, y))
        feature = output_term = torch.zeros(())
        if targets:
            feature = torch.stack([_relative_error(found[i], t) for i, t in targets.items()]).mean()
        if output_weight > 0:
            pairs = [(s, t) for s, t in zip(_tensors(output), _tensors(references[index]))
                     if s.is_floating_point()]
            if pairs:
                output_term = torch.stack([_relative_error(s, t) for s, t in pairs]).mean()
        return feature, output_term

    def loss_of(index: int) -> torch.Tensor:
        feature, output_term = terms(index)
        return feature_weight * feature + output_weight * output_term

    def mean_losses() -> tuple[float, float, float]:
        """(weighted total, feature term, output term) averaged over every sample."""
        sums = [0.0, 0.0]
        with torch.no_grad():
            for i in range(len(samples)):
                for k, value in enumerate(terms(i)):
                    sums[k] += float(value)
        feature, output_term = (value / len(samples) for value in sums)
        return feature_weight * feature + output_weight * output_term, feature, output_term

    before, feature_before, output_before = mean_losses()
    saved = [t.detach().clone() for t in factors]
    scale = step_size(before)
    optimizer = torch.optim.Adam([{"params": [t], "lr": scale * float(t.detach().float().pow(2).mean().sqrt())}
                                  for t in factors])
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, (lambda step: 0.5 * (1 + math.cos(math.pi * step / max(1, steps)))) if decay
        else (lambda step: 1.0))
    for tensor in factors:
        tensor.requires_grad_(True)
    try:
        with torch.enable_grad():
            for step in range(steps):
                optimizer.zero_grad(set_to_none=True)
                loss = loss_of(step % len(samples))
                if regulariser is not None and regulariser_weight > 0:
                    loss = loss + regulariser_weight * regulariser()
                loss.backward()
                optimizer.step()
                schedule.step()
    finally:
        for tensor in factors:
            tensor.requires_grad_(False)
            tensor.grad = None
    after, feature_after, output_after = mean_losses()
    reverted = after > before
    if reverted:
        with torch.no_grad():
            for tensor, old in zip(factors, saved):
                tensor.copy_(old)
    stats = {"recover_steps": steps, "recover_feature_loss_before": before,
             "recover_feature_loss_after": after, "recover_reverted": int(reverted)}
    if output_weight > 0:  # the total above is weighted; each term apart
        stats.update(recover_layer_loss_before=feature_before, recover_layer_loss_after=feature_after,
                     recover_output_loss_before=output_before, recover_output_loss_after=output_after)
    return stats


def _relative_error(found: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean((found − target)²) / mean(target²)``."""
    target = target.detach().float()
    return (found.float() - target).pow(2).mean() / target.pow(2).mean().clamp(min=_TINY)


def _tensors(value) -> list[torch.Tensor]:
    """The tensors of a (nested) output, in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    if hasattr(value, "to_tuple"):
        return _tensors(value.to_tuple())
    return []
