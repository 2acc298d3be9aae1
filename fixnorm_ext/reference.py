"""The FixNorm step in plain PyTorch, one tensor at a time: the oracle.

Every backend is tested against :func:`fixnorm_step`. It is written to be read
next to DESIGN.md section 2, not to be fast. All arithmetic happens in float64
on upcast copies; results are written back into the caller's tensors (rounded
once to their dtype), so the oracle is as exact as float64 allows whatever the
parameter dtype.

For one parameter ``p`` with gradient ``g`` and hyperparameters of its group:

1. ``g <- g / grad_scale`` if a scale is given; ``g <- -g`` if ``maximize``
2. ``g <- g + weight_decay * p``
3. momentum ``mu != 0``: ``buf <- g`` on the first step, else
   ``buf <- mu * buf + (1 - dampening) * g``; ``d <- g + mu * buf`` with
   Nesterov, else ``d <- buf``.  ``mu == 0``: ``d <- g``
4. ``p <- p - lr * d``
5. for each segment (the whole tensor, or each slice along dim 0) with
   ``n = ||p||_2`` and target ``r``: ``"fixed"``: ``p <- p * r / n``;
   ``"max"``: ``p <- p * min(1, r / n)``; a segment with ``n == 0`` is kept.
6. a non-zero ``found_inf`` makes the whole step a no-op.
"""
from __future__ import annotations

from typing import Optional

import math

import torch

NORM_MODES = (None, "fixed", "max")


def segment_norms(p: torch.Tensor, norm_dim: Optional[int]) -> torch.Tensor:
    """L2 norm of each segment of ``p`` in float64: shape ``()`` for the whole
    tensor (``norm_dim=None``) or ``(p.shape[0],)`` for ``norm_dim=0``."""
    x = p.detach().to(torch.float64)
    if norm_dim is None or x.dim() == 0:
        return torch.linalg.vector_norm(x)
    return torch.linalg.vector_norm(x.reshape(x.shape[0], math.prod(x.shape[1:])), dim=1)


def renormalize(p: torch.Tensor, target: torch.Tensor, norm: str, norm_dim: Optional[int]) -> torch.Tensor:
    """Return ``p`` (float64) scaled segment-wise to the target per step 5."""
    n = segment_norms(p, norm_dim)
    target = target.to(torch.float64)
    if norm == "fixed":
        factor = target / n
    elif norm == "max":
        factor = torch.clamp(target / n, max=1.0)
    else:
        raise ValueError(f"unknown norm mode {norm!r}; expected one of {NORM_MODES}")
    # A zero segment has no direction to rescale: leave it as it is.
    factor = torch.where(n == 0, torch.ones_like(factor), factor)
    if factor.dim() == 0:
        return p * factor
    return p * factor.reshape((-1,) + (1,) * (p.dim() - 1))


@torch.no_grad()
def fixnorm_step_one(
    param: torch.Tensor,
    grad: torch.Tensor,
    momentum_buffer: Optional[torch.Tensor],
    *,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    norm: Optional[str] = None,
    target: Optional[torch.Tensor] = None,
    norm_dim: Optional[int] = None,
    grad_scale: Optional[float] = None,
) -> Optional[torch.Tensor]:
    """One FixNorm step for a single tensor, in place.

    ``momentum_buffer`` is ``None`` on the first step; the (new or updated)
    buffer is returned, ``None`` when ``momentum == 0``. ``target`` is the
    segment target norm (a scalar tensor, or one value per dim-0 slice).
    """
    p = param.detach().to(torch.float64)
    g = grad.detach().to(torch.float64)
    if grad_scale is not None:
        g = g / float(grad_scale)
    if maximize:
        g = -g
    if weight_decay != 0:
        g = g + weight_decay * p
    buf = None
    if momentum != 0:
        if momentum_buffer is None:
            buf = g.clone()
        else:
            buf = momentum * momentum_buffer.detach().to(torch.float64) + (1 - dampening) * g
        d = g + momentum * buf if nesterov else buf
    else:
        d = g
    p = p - float(lr) * d
    if norm is not None:
        p = renormalize(p, target, norm, norm_dim)
    param.copy_(p)
    if buf is None:
        return None
    if momentum_buffer is None:
        return buf.to(param.dtype)
    momentum_buffer.copy_(buf)
    return momentum_buffer


@torch.no_grad()
def fixnorm_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    momentum_buffers: list[Optional[torch.Tensor]],
    targets: list[Optional[torch.Tensor]],
    *,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    norm: Optional[str] = None,
    norm_dim: Optional[int] = None,
    grad_scale: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
) -> list[Optional[torch.Tensor]]:
    """The FixNorm step for one parameter group, one tensor at a time.

    Updates ``params`` (and existing ``momentum_buffers``) in place and returns
    the list of momentum buffers after the step (new ones for entries that were
    ``None``). With a non-zero ``found_inf`` nothing changes and the buffers
    are returned as given.
    """
    if found_inf is not None and float(found_inf) != 0:
        return list(momentum_buffers)
    scale = None if grad_scale is None else float(grad_scale)
    return [
        fixnorm_step_one(
            p, g, buf, lr=float(lr), momentum=momentum, dampening=dampening,
            weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
            norm=norm, target=t, norm_dim=norm_dim, grad_scale=scale,
        )
        for p, g, buf, t in zip(params, grads, momentum_buffers, targets)
    ]
