"""A harder real-data problem for the tuner and the experiment: Fashion-MNIST
(Xiao, Rasul, Vollgraf 2017; 28x28 grey images of 10 kinds of clothing, 60,000
for training and 10,000 for testing), read from disk, never downloaded.

Where the data are looked for, in order (:func:`find_data`):

1. the folder named by ``$FIXNORM_FASHION_MNIST``;
2. ``/usr/share/datasets/fashion-mnist``, where the Debian package
   ``dataset-fashion-mnist`` installs them;
3. ``~/.cache/fixnorm_ext/fashion-mnist`` (``$XDG_CACHE_HOME`` if set); when it
   lacks the files and the package's ``.deb`` lies in ``/var/cache/apt/archives``
   (apt keeps what it downloaded there), the four files are taken out of it
   into this folder first.

A folder counts when it holds the four IDX files
``{train,t10k}-{images-idx3,labels-idx1}-ubyte``, gzipped (``.gz``) or not.

The subset is fixed and balanced. Of the 60,000 training images, 1,000 per
class (10,000) are trained on and 200 per class (2,000) are held out for
validation, chosen by a permutation seeded with 0; the test set is all 10,000
test images (one image is 0.01 points of accuracy). ``load_data()`` without
``validation`` trains on both parts (12,000 images).

The net: three bias-free 3x3 convs of 16, 32 and 32 channels, each with
BatchNorm and ReLU, a max pool after the first two (28 -> 14 -> 7), global
average pooling and a Linear classifier (14,458 parameters), trained
:data:`EPOCHS` = 5 epochs in batches of 64 (780 steps). Why this size: on the
project's 2-core machine, while other jobs shared it, one such training took
9-13 s (scoring the 2,000 validation images 0.3 s more, the 10,000 test
images 1.5 s), and 64 channels in the last conv took 11-16 s; at about 11 s a
training, the experiment's 160-odd trainings fit in half an hour. At lr=0.1
it reaches about 86 % test accuracy with either optimizer, well below what
the data allow (over 90 % for bigger nets trained longer), so the optimizers
and their hyperparameters have room to differ, unlike on the digits where
every method ends near 99.5 %.
"""
from __future__ import annotations

import gzip
import io
import os
import struct
import tarfile
import tempfile
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from fixnorm_ext import training
from fixnorm_ext.training import conv_net

ENV = "FIXNORM_FASHION_MNIST"
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
APT_ARCHIVES = Path("/var/cache/apt/archives")
PACKAGE = "dataset-fashion-mnist"
FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
TRAIN_PER_CLASS = 1000
VALIDATION_PER_CLASS = 200
TITLE = "Fashion-MNIST"  # in the experiment's report
EPOCHS = 5  # default training length of the tuner's objective and of the experiment
SPLIT = "the 10,000 test images; 2,000 validation images (200 per class) held out from the 60,000 training images, " \
        "10,000 others (1,000 per class) trained on"

# IDX type codes (the byte after the two zero bytes of the magic number), as big-endian numpy types.
IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path) -> np.ndarray:
    """The array in an IDX file (gzipped if its name ends in ``.gz``): a magic
    number of two zero bytes, a type code and the number of dimensions, then
    each dimension as a big-endian uint32, then the values, big-endian."""
    path = Path(path)
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in IDX_TYPES:
        raise ValueError(f"{path}: not an IDX file (magic number {data[:4].hex() or 'missing'})")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: IDX header cut short ({len(data)} bytes)")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(IDX_TYPES[data[2]])
    if len(data) - header != dtype.itemsize * int(np.prod(shape)):
        raise ValueError(f"{path}: {len(data) - header} bytes of values, shape {shape} of {dtype} needs "
                         f"{dtype.itemsize * int(np.prod(shape))}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _file(folder: Path, name: str) -> Optional[Path]:
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    return None


def _complete(folder: Path) -> bool:
    return all(_file(folder, name) is not None for name in FILES)


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fixnorm_ext" / "fashion-mnist"


def _ar_members(path: Path):
    """``(name, bytes)`` of each member of an ar archive (a .deb is one)."""
    data = path.read_bytes()
    if not data.startswith(b"!<arch>\n"):
        raise ValueError(f"{path}: not an ar archive")
    pos = 8
    while pos + 60 <= len(data):
        header = data[pos:pos + 60]
        name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58].decode())
        yield name, data[pos + 60:pos + 60 + size]
        pos += 60 + size + size % 2  # members are padded to an even length


def extract_package(deb: Path, folder: Path) -> None:
    """Take the four data files out of the package's .deb into ``folder``
    (Python's tarfile reads its data.tar.xz/.gz/.bz2; nothing is installed).
    Each file is written under a temporary name and renamed, so an
    interrupted extraction leaves no half-written file behind."""
    data_tar = next((blob for name, blob in _ar_members(deb) if name.startswith("data.tar")), None)
    if data_tar is None:
        raise ValueError(f"{deb}: no data.tar member")
    folder.mkdir(parents=True, exist_ok=True)
    wanted = {f"{name}.gz" for name in FILES}
    found = set()
    try:
        archive = tarfile.open(fileobj=io.BytesIO(data_tar), mode="r:*")
    except tarfile.ReadError as exc:
        raise ValueError(f"{deb}: cannot read its data archive ({exc}); install the package instead "
                         f"(apt-get install {PACKAGE})") from None
    with archive:
        for member in archive:
            base = Path(member.name).name
            if member.isfile() and base in wanted and Path(member.name).parent.name == "fashion-mnist":
                with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{base}.", delete=False) as out:
                    out.write(archive.extractfile(member).read())
                os.replace(out.name, folder / base)
                found.add(base)
    if found != wanted:
        raise ValueError(f"{deb}: lacks {', '.join(sorted(wanted - found))}")


def find_data() -> Path:
    """The folder holding the four IDX files, searched in the order of the
    module docstring; raises FileNotFoundError saying where it looked."""
    looked = []
    env = os.environ.get(ENV)
    if env:
        if _complete(Path(env)):
            return Path(env)
        looked.append(f"${ENV}={env}")
    else:
        looked.append(f"${ENV} (not set)")
    if _complete(SYSTEM_DIR):
        return SYSTEM_DIR
    looked.append(str(SYSTEM_DIR))
    cache = cache_dir()
    if _complete(cache):
        return cache
    looked.append(str(cache))
    debs = sorted(APT_ARCHIVES.glob(f"{PACKAGE}_*.deb"))
    if debs:
        extract_package(debs[-1], cache)
        return cache
    looked.append(f"{APT_ARCHIVES}/{PACKAGE}_*.deb")
    raise FileNotFoundError(
        "Fashion-MNIST not found; looked in " + ", ".join(looked) + f". Install it (apt-get install {PACKAGE}, "
        f"which puts it in {SYSTEM_DIR}), or set {ENV} to a folder holding " + ", ".join(FILES) +
        " (each gzipped or not).")


def _split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the balanced training and validation subsets."""
    order = np.random.default_rng(0).permutation(len(labels))
    train, val = [], []
    for c in range(10):
        members = order[labels[order] == c]
        if len(members) < TRAIN_PER_CLASS + VALIDATION_PER_CLASS:
            raise ValueError(f"Fashion-MNIST: class {c} has {len(members)} training images, the subset needs "
                             f"{TRAIN_PER_CLASS + VALIDATION_PER_CLASS}")
        train.append(members[:TRAIN_PER_CLASS])
        val.append(members[TRAIN_PER_CLASS:TRAIN_PER_CLASS + VALIDATION_PER_CLASS])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def load_data(validation: bool = False):
    """``(train, test)``, or with ``validation`` ``(train, validation, test)``:
    each an ``(images, labels)`` pair, images of shape (n, 1, 28, 28) scaled
    to [0, 1] then standardized with one mean and one standard deviation over
    all training pixels (as the digits)."""
    folder = find_data()
    x_all, y_all, x_test, y_test = (read_idx(_file(folder, name)) for name in FILES)
    train_idx, val_idx = _split(y_all)
    if validation:
        parts = [(x_all[train_idx], y_all[train_idx]), (x_all[val_idx], y_all[val_idx])]
    else:
        both = np.sort(np.concatenate([train_idx, val_idx]))
        parts = [(x_all[both], y_all[both])]
    parts.append((x_test, y_test))
    x_train = parts[0][0].astype(np.float32) / 255
    mean, std = x_train.mean(), x_train.std()

    def to_tensors(x, y):
        x = torch.as_tensor((x.astype(np.float32) / 255 - mean) / std).unsqueeze(1)
        return x, torch.as_tensor(y.astype(np.int64))

    return tuple(to_tensors(x, y) for x, y in parts)


def build_model() -> nn.Sequential:
    return conv_net((16, 32, 32), pool_after=(0, 1))


def fit_and_score(make_optimizer: Callable, train_data, eval_data, *, epochs: int, seed: int = 0) -> float:
    """:func:`fixnorm_ext.training.fit_and_score` with the Fashion-MNIST net."""
    return training.fit_and_score(build_model, make_optimizer, train_data, eval_data, epochs=epochs, seed=seed)


def objective(*, epochs: int = EPOCHS, seed: int = 0, momentum: float = 0.9, backend: str = "auto",
              data=None) -> Callable[[float, float], float]:
    """``objective(lr, fc_norm)`` for :mod:`fixnorm_ext.tuning`: train with
    :func:`fixnorm_ext.training.fixnorm_optimizer` and return the accuracy on
    the 2,000 validation images in percent (NaN if the training loss diverged)."""
    return training.objective(build_model, load_data(validation=True) if data is None else data, epochs=epochs,
                              seed=seed, momentum=momentum, backend=backend)
