"""The real-data problem of the example, tuner and experiment: scikit-learn's
8x8 digits (1797 images, shipped with scikit-learn: nothing is downloaded)
and a small BatchNorm conv net.

The split is fixed: 450 test images, stratified; of the 1347 others, 300 are
held out for validation when tuning (:func:`objective` scores on them, never
on the test set).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from fixnorm_ext import training
from fixnorm_ext.training import conv_net, evaluate, fixnorm_optimizer, train

# train, evaluate and fixnorm_optimizer live in fixnorm_ext.training; they are
# named here too, for examples/train_digits.py and earlier users of this module.
__all__ = ["load_data", "build_model", "train", "evaluate", "fit_and_score", "fixnorm_optimizer", "objective"]

TEST_SIZE = 450
VALIDATION_SIZE = 300
TITLE = "the digits"  # in the experiment's report
EPOCHS = 10  # default training length of the tuner's objective and of the experiment
SPLIT = "450 test images, 300 validation images held out from the 1347 training images"


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
    return conv_net((32, 64, 64), pool_after=(1,))


def fit_and_score(make_optimizer: Callable, train_data, eval_data, *, epochs: int, seed: int = 0) -> float:
    """:func:`fixnorm_ext.training.fit_and_score` with the digits net."""
    return training.fit_and_score(build_model, make_optimizer, train_data, eval_data, epochs=epochs, seed=seed)


def objective(*, epochs: int = EPOCHS, seed: int = 0, momentum: float = 0.9, backend: str = "auto",
              data=None) -> Callable[[float, float], float]:
    """``objective(lr, fc_norm)`` for :mod:`fixnorm_ext.tuning`: train with
    :func:`fixnorm_optimizer` and return the accuracy on the 300 validation
    images in percent (NaN if the training loss diverged)."""
    return training.objective(build_model, load_data(validation=True) if data is None else data, epochs=epochs,
                              seed=seed, momentum=momentum, backend=backend)
