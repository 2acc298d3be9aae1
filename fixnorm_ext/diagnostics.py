"""What FixNorm is doing to a network, read from the optimizer.

:func:`layer_stats` gives, for every parameter of a ``FusedFixNorm`` (or of
any torch optimizer with SGD-like groups):

* its norm ``||w||`` (per dim-0 slice for a ``norm_dim=0`` group, summarized
  by the mean);
* its norm mode and target;
* the effective learning rate ``lr / ||w||^2`` of a scale-invariant layer (a
  ``norm="fixed"`` group): the step that counts for a layer whose output is
  normalized, which FixNorm keeps on the schedule by holding ``||w||``;
* the angle it turned in the last step, when the optimizer was made with
  ``track_stats=True`` (``opt.last_angles``).

:func:`margins` gives logit-margin statistics of a batch: how far samples sit
from the decision boundary, which the classifier's norm bound controls.

These read a few numbers per tensor (one norm each, and one ``.item()`` per
value shown), so they belong in logging, not in every step of a fast loop.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class LayerStats:
    name: str
    shape: tuple
    mode: Optional[str]               # None, "fixed" or "max"
    norm: float                       # ||w|| (mean over rows with norm_dim=0)
    target: Optional[float]           # the target or bound (mean over rows), None without norm control
    lr: float
    effective_lr: Optional[float]     # lr / ||w||^2, for "fixed" groups only
    angle: Optional[float]            # radians turned in the last step (track_stats=True), else None


def _lr(group) -> float:
    lr = group["lr"]
    return float(lr.item()) if isinstance(lr, torch.Tensor) else float(lr)


def layer_stats(optimizer, model: Optional[torch.nn.Module] = None) -> list[LayerStats]:
    """One row per parameter, in the optimizer's order; names from ``model``
    (``named_parameters``) when given, else ``group{i}.{j}``."""
    names = {} if model is None else {p: name for name, p in model.named_parameters()}
    turned = getattr(optimizer, "last_angles", {})
    rows = []
    for gi, group in enumerate(optimizer.param_groups):
        mode, norm_dim, lr = group.get("norm"), group.get("norm_dim"), _lr(group)
        for pi, p in enumerate(group["params"]):
            w = p.detach().double()
            per_row = norm_dim == 0 and w.dim() > 0
            norms = w.reshape(w.shape[0], -1).norm(dim=1) if per_row else w.norm()
            norm = _whole(norms.mean()).item() if norms.numel() else 0.0
            target = None
            if mode is not None:
                recorded = optimizer.state.get(p, {}).get("target_norm")
                explicit = group.get("target_norm")
                target = float(explicit) if explicit is not None else (
                    None if recorded is None else recorded.double().mean().item())
            effective = lr / norm ** 2 if mode == "fixed" and norm > 0 else None
            angle = turned.get(p)
            rows.append(LayerStats(names.get(p, f"group{gi}.{pi}"), tuple(p.shape), mode, norm, target, lr,
                                   effective, None if angle is None else angle.item()))
    return rows


def angles(before: list, after: list) -> list:
    """The angle between each pair of tensors (radians, float32, on their
    device) from the distance of their unit vectors, 2 asin(|u - v| / 2):
    accurate for the small angles of one step, where acos of a dot product
    loses them. 0 for a tensor that is or was all zeros."""
    out = []
    for a, b in zip(before, after):
        a, b = a.float(), b.float()
        na, nb = a.norm(), b.norm()
        safe = (na > 0) & (nb > 0)
        chord = (b / torch.where(safe, nb, 1.0) - a / torch.where(safe, na, 1.0)).norm()
        out.append(torch.where(safe, 2 * torch.asin(torch.clamp(chord / 2, max=1.0)), 0.0))
    return out


def classifier_norm(optimizer) -> Optional[float]:
    """The norm of the parameter in a ``norm="max"`` group (FixNorm's
    classifier), or None when there is none; the largest if several."""
    norms = [_whole(p.detach().double().norm()).item() for g in optimizer.param_groups if g.get("norm") == "max"
             for p in g["params"]]
    return max(norms) if norms else None


def _whole(x: torch.Tensor) -> torch.Tensor:
    """A DTensor reduction's value for the whole tensor (``.item()`` of a
    partial result would be this rank's share); other tensors as they are."""
    full = getattr(x, "full_tensor", None)
    return full() if callable(full) else x


def margins(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """Logit margins of a batch, ``z_true - max_{other} z``: positive where a
    sample is classified right, and the larger, the farther from the boundary.
    Returns mean, min, median, 10th percentile and the fraction <= 0."""
    if logits.dim() != 2 or labels.shape != logits.shape[:1] or logits.shape[1] < 2:
        raise ValueError(f"need logits (batch, classes >= 2) and labels (batch,), got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    z = logits.detach().double()
    true = z.gather(1, labels.view(-1, 1)).squeeze(1)
    others = z.scatter(1, labels.view(-1, 1), -math.inf).amax(dim=1)
    m = true - others
    return {"mean": m.mean().item(), "min": m.min().item(), "median": m.median().item(),
            "p10": torch.quantile(m, 0.1).item(), "fraction_wrong": (m <= 0).double().mean().item()}


def format_table(rows: list[LayerStats]) -> str:
    """The rows of :func:`layer_stats` as a fixed-width text table."""
    width = max([len("parameter")] + [len(r.name) for r in rows])

    def num(x, fmt=".4g"):
        return "-" if x is None else format(x, fmt)

    lines = [f"{'parameter':<{width}}  {'mode':<5}  {'||w||':>10}  {'target':>10}  {'lr/||w||^2':>10}  "
             f"{'angle':>10}"]
    for r in rows:
        lines.append(f"{r.name:<{width}}  {r.mode or '-':<5}  {num(r.norm):>10}  {num(r.target):>10}  "
                     f"{num(r.effective_lr):>10}  {num(r.angle):>10}")
    return "\n".join(lines)
