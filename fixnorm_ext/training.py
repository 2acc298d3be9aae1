"""Training and scoring shared by the real-data examples (fixnorm_ext.digits,
fixnorm_ext.fashion): the BatchNorm conv net they are built from, a training
loop on a per-step cosine schedule, accuracy, and the tuner's objective.

An example is a module with ``load_data(validation=False)``,
``build_model()``, ``EPOCHS`` (its default training length), ``fit_and_score``
and ``objective``; :func:`load_example` finds one by name.
"""
from __future__ import annotations

import importlib
import math
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from fixnorm_ext.grouping import fixnorm_param_groups
from fixnorm_ext.optimizer import FusedFixNorm

EXAMPLES = ("digits", "fashion")


def load_example(name: str):
    """The module of the example called ``name`` (one of :data:`EXAMPLES`)."""
    if name not in EXAMPLES:
        raise ValueError(f"unknown example {name!r}; the examples are {', '.join(EXAMPLES)}")
    return importlib.import_module(f"fixnorm_ext.{name}")


def conv_net(widths: Sequence[int], pool_after: Sequence[int], classes: int = 10) -> nn.Sequential:
    """Bias-free 3x3 convs of ``widths`` output channels (one input channel),
    each followed by BatchNorm and ReLU, a 2x2 max pool after the convs whose
    indices are in ``pool_after``, global average pooling, one Linear
    classifier. A plain Sequential, so torch.fx traces it and
    :func:`fixnorm_param_groups` sees each conv -> BatchNorm edge."""
    layers: list[nn.Module] = []
    channels = 1
    for k, width in enumerate(widths):
        layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        if k in pool_after:
            layers.append(nn.MaxPool2d(2))
        channels = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes)]
    return nn.Sequential(*layers)


@torch.no_grad()
def evaluate(model, x, y, *, batch_size: int = 1000) -> tuple[float, float]:
    """Accuracy and mean cross-entropy, with BatchNorm in inference mode. In
    batches, so the activations of a large test set need not fit at once (in
    inference mode each image's logits do not depend on the batch)."""
    model.eval()
    correct, loss = 0, 0.0
    for start in range(0, len(y), batch_size):
        logits = model(x[start:start + batch_size])
        labels = y[start:start + batch_size]
        correct += (logits.argmax(dim=1) == labels).sum().item()
        loss += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
    return correct / len(y), loss / len(y)


def train(model, optimizer, train_data, *, epochs: int, batch_size: int = 64, seed: int = 0,
          desc: str = "", progress: bool = False, on_step: Optional[Callable[[int], None]] = None) -> float:
    """Per-step cosine schedule from the optimizer's lr down to 0; the
    shuffling order depends only on ``seed``. Returns the last epoch's mean
    training loss. ``on_step(step)`` is called after every step."""
    x, y = train_data
    n = len(y)
    # Drop the incomplete last batch: BatchNorm statistics over a few images are mostly noise.
    steps_per_epoch = max(1, n // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    order = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=epochs * steps_per_epoch, desc=desc, leave=False)
    total_loss = 0.0
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=order)
        total_loss = 0.0
        for step in range(steps_per_epoch):
            idx = perm[step * batch_size:(step + 1) * batch_size]
            loss = loss_fn(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total_loss += loss.item()
            if on_step is not None:
                on_step(epoch * steps_per_epoch + step)
            if bar is not None:
                bar.update()
        if bar is not None:
            bar.set_postfix(epoch=epoch + 1, loss=f"{total_loss / steps_per_epoch:.4f}")
    if bar is not None:
        bar.close()
    return total_loss / steps_per_epoch


def fit_and_score(build_model: Callable[[], nn.Module], make_optimizer: Callable, train_data, eval_data, *,
                  epochs: int, seed: int = 0) -> float:
    """Train a fresh ``build_model()`` (initial weights from ``seed``) with
    ``make_optimizer(model)`` and return its accuracy on ``eval_data`` in
    percent, or NaN if the training loss diverged."""
    torch.manual_seed(seed)
    model = build_model()
    loss = train(model, make_optimizer(model), train_data, epochs=epochs, seed=seed)
    if not math.isfinite(loss):
        return math.nan
    return 100.0 * evaluate(model, *eval_data)[0]


def fixnorm_optimizer(model, lr: float, fc_norm: float, *, momentum: float = 0.9, backend: str = "auto"):
    """FusedFixNorm as the examples use it: conv weights at fixed norm, the
    classifier clamped at ``fc_norm``, no weight decay, Nesterov momentum."""
    return FusedFixNorm(fixnorm_param_groups(model, fc_norm=fc_norm), lr=lr, momentum=momentum,
                        nesterov=momentum > 0, backend=backend)


def objective(build_model: Callable[[], nn.Module], data, *, epochs: int, seed: int = 0, momentum: float = 0.9,
              backend: str = "auto") -> Callable[[float, float], float]:
    """``objective(lr, fc_norm)`` for :mod:`fixnorm_ext.tuning` on ``data``, a
    ``(train, validation, test)`` triple: train with :func:`fixnorm_optimizer`
    and return the validation accuracy in percent (NaN if the training loss
    diverged). The test split is never looked at."""
    train_data, val_data, _ = data

    def score(lr: float, fc_norm: float) -> float:
        return fit_and_score(build_model,
                             lambda model: fixnorm_optimizer(model, lr, fc_norm, momentum=momentum, backend=backend),
                             train_data, val_data, epochs=epochs, seed=seed)

    return score
