"""The real-data problem of the example, tuner and experiment: scikit-learn's
8x8 digits (1797 images, shipped with scikit-learn: nothing is downloaded)
and a small BatchNorm conv net.

The split is fixed: 450 test images, stratified; of the 1347 others, 300 are
held out for validation when tuning (:func:`objective` scores on them, never
on the test set).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import nn

from fixnorm_ext.grouping import fixnorm_param_groups
from fixnorm_ext.optimizer import FusedFixNorm

TEST_SIZE = 450
VALIDATION_SIZE = 300


def load_data(validation: bool = False):
    """``(train, test)``, or with ``validation`` ``(train, validation, test)``:
    each an ``(images, labels)`` pair, images standardized with the training
    set's statistics. One mean and one standard deviation over all training
    pixels (rather than one per pixel) keeps the relative brightness across
    the image that the convolutions look at."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise ImportError("the digits data come with scikit-learn: pip install scikit-learn") from None
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.images, digits.target, test_size=TEST_SIZE, random_state=0, stratify=digits.target)
    parts = [(x_train, y_train)]
    if validation:
        x_train, x_val, y_train, y_val = train_test_split(
            x_train, y_train, test_size=VALIDATION_SIZE, random_state=0, stratify=y_train)
        parts = [(x_train, y_train), (x_val, y_val)]
    parts.append((x_test, y_test))
    mean, std = parts[0][0].mean(), parts[0][0].std()

    def to_tensors(x, y):
        x = torch.as_tensor((x - mean) / std, dtype=torch.float32).unsqueeze(1)
        return x, torch.as_tensor(y, dtype=torch.long)

    return tuple(to_tensors(x, y) for x, y in parts)


def build_model() -> nn.Sequential:
    # Plain Sequential, so torch.fx can trace it and see each conv -> BatchNorm edge.
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


@torch.no_grad()
def evaluate(model, x, y) -> tuple[float, float]:
    """Accuracy and mean cross-entropy, with BatchNorm in inference mode."""
    model.eval()
    logits = model(x)
    acc = (logits.argmax(dim=1) == y).double().mean().item()
    return acc, nn.functional.cross_entropy(logits, y).item()


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


def fit_and_score(make_optimizer: Callable, train_data, eval_data, *, epochs: int, seed: int = 0) -> float:
    """Train a fresh model (initial weights from ``seed``) with
    ``make_optimizer(model)`` and return its accuracy on ``eval_data`` in
    percent, or NaN if the training loss diverged."""
    torch.manual_seed(seed)
    model = build_model()
    loss = train(model, make_optimizer(model), train_data, epochs=epochs, seed=seed)
    if not math.isfinite(loss):
        return math.nan
    return 100.0 * evaluate(model, *eval_data)[0]


def fixnorm_optimizer(model, lr: float, fc_norm: float, *, momentum: float = 0.9, backend: str = "auto"):
    """FusedFixNorm as the digits runs use it: conv weights at fixed norm, the
    classifier clamped at ``fc_norm``, no weight decay, Nesterov momentum."""
    return FusedFixNorm(fixnorm_param_groups(model, fc_norm=fc_norm), lr=lr, momentum=momentum,
                        nesterov=momentum > 0, backend=backend)


def objective(*, epochs: int = 10, seed: int = 0, momentum: float = 0.9, backend: str = "auto",
              data=None) -> Callable[[float, float], float]:
    """``objective(lr, fc_norm)`` for :mod:`fixnorm_ext.tuning`: train with
    :func:`fixnorm_optimizer` and return the validation accuracy in percent
    (NaN if the training loss diverged)."""
    train_data, val_data, _ = load_data(validation=True) if data is None else data

    def score(lr: float, fc_norm: float) -> float:
        return fit_and_score(lambda model: fixnorm_optimizer(model, lr, fc_norm, momentum=momentum, backend=backend),
                             train_data, val_data, epochs=epochs, seed=seed)

    return score
