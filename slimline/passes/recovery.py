"""Feature distillation of a rewritten graph's new factors (PELA's intermediate stage).

The passes that replace dense layers by factors (``lowrank``, ``monarch``) recover the same way:
only the factors train, the backbone stays frozen; the loss is the relative squared error of each
replaced layer's output against the original graph's (the teacher's) output at that layer, on the
calibration samples, plus an optional regulariser; Adam with a per-factor step (each factor's RMS
× the pass's step size); a run that ends worse than it started is undone.
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
                     cache_bytes: int | None = None) -> dict[str, float]:
    """Train ``factors`` (in place) so the student's layer outputs match the teacher's.

    ``outputs``: per replaced layer, the student's output node and the name of the teacher's node
    it replaces. ``step_size(initial_loss)`` scales every factor's Adam step (× its RMS);
    ``decay`` puts a cosine schedule over the steps; teacher features are kept in memory up to
    ``cache_bytes`` (None: always), else recomputed. Returns loss statistics.
    """
    student_watch = {node: i for i, (node, _name) in enumerate(outputs)}
    teacher_nodes = {node.name: node for node in teacher.fx.nodes}
    teacher_watch = {teacher_nodes[name]: i for i, (_node, name) in enumerate(outputs)}

    def teacher_features(index: int) -> dict[int, torch.Tensor]:
        found: dict[int, torch.Tensor] = {}
        with torch.no_grad():
            run_tapped(teacher.module, samples[index], teacher_watch,
                       lambda i, _x, y: found.__setitem__(i, y.detach()))
        return found

    first = teacher_features(0)
    size = sum(t.numel() * t.element_size() for t in first.values()) * len(samples)
    cache = [first] + [teacher_features(i) for i in range(1, len(samples))] \
        if cache_bytes is None or size <= cache_bytes else None

    def feature_loss(index: int) -> torch.Tensor:
        targets = cache[index] if cache is not None else teacher_features(index)
        found: dict[int, torch.Tensor] = {}
        run_tapped(student.module, samples[index], student_watch,
                   lambda i, _x, y: found.__setitem__(i, y))
        terms = [(found[i].float() - t.float()).pow(2).mean() / t.float().pow(2).mean().clamp(min=_TINY)
                 for i, t in targets.items()]
        return torch.stack(terms).mean()

    def mean_loss() -> float:
        with torch.no_grad():
            return sum(float(feature_loss(i)) for i in range(len(samples))) / len(samples)

    before = mean_loss()
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
                loss = feature_loss(step % len(samples))
                if regulariser is not None and regulariser_weight > 0:
                    loss = loss + regulariser_weight * regulariser()
                loss.backward()
                optimizer.step()
                schedule.step()
    finally:
        for tensor in factors:
            tensor.requires_grad_(False)
            tensor.grad = None
    after = mean_loss()
    reverted = after > before
    if reverted:
        with torch.no_grad():
            for tensor, old in zip(factors, saved):
                tensor.copy_(old)
    return {"recover_steps": steps, "recover_feature_loss_before": before,
            "recover_feature_loss_after": after, "recover_reverted": int(reverted)}
