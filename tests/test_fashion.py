"""fixnorm_ext.fashion: the IDX reader, where the data are looked for (and
the error when they are nowhere), the balanced subset, and the experiment
and tune commands end to end, all on small synthetic files made here, so
nothing depends on Fashion-MNIST being on the machine. One test reads the
real Debian package when apt's cache holds it."""
import gzip
import io
import json
import struct
import tarfile

import numpy as np
import pytest
import torch

from fixnorm_ext import fashion, fixnorm_param_groups
from fixnorm_ext.__main__ import main as cli_main

CODES = {np.dtype(">u1"): 0x08, np.dtype(">i1"): 0x09, np.dtype(">i2"): 0x0B, np.dtype(">i4"): 0x0C,
         np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file, written from the format's description, independently of
    the reader: magic 0 0 <type> <ndim>, big-endian uint32 dims, big-endian values."""
    big = array.astype(array.dtype.newbyteorder(">"))
    return (bytes([0, 0, CODES[big.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
            + big.tobytes())


def synthetic_images(labels: np.ndarray, seed: int) -> np.ndarray:
    """28x28 uint8 images whose class is a bright band at rows 2c..2c+3, over noise."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 60, size=(len(labels), 28, 28), dtype=np.uint8)
    for k, c in enumerate(labels):
        images[k, 2 * c:2 * c + 4] = 220
    return images


def write_dataset(folder, per_class_train=16, per_class_test=3, gz=True):
    """The four files of a small Fashion-MNIST look-alike in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    y_train = rng.permutation(np.repeat(np.arange(10, dtype=np.uint8), per_class_train))
    y_test = rng.permutation(np.repeat(np.arange(10, dtype=np.uint8), per_class_test))
    arrays = {"train-images-idx3-ubyte": synthetic_images(y_train, 2), "train-labels-idx1-ubyte": y_train,
              "t10k-images-idx3-ubyte": synthetic_images(y_test, 3), "t10k-labels-idx1-ubyte": y_test}
    for name, array in arrays.items():
        data = idx_bytes(array)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return arrays


def tar_xz(files: dict) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:xz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def write_deb(path, source_folder):
    """A .deb (an ar archive: debian-binary, control.tar.xz, data.tar.xz)
    whose data hold the files of ``source_folder`` where the package puts them."""
    data = {f"./usr/share/datasets/fashion-mnist/{f.name}": f.read_bytes() for f in source_folder.iterdir()}
    data["./usr/share/doc/dataset-fashion-mnist/copyright"] = b"not a data file\n"
    members = [("debian-binary", b"2.0\n"), ("control.tar.xz", tar_xz({"./control": b"Package: x\n"})),
               ("data.tar.xz", tar_xz(data))]
    out = bytearray(b"!<arch>\n")
    for name, blob in members:
        out += f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(blob):<10}`\n".encode()
        out += blob + (b"\n" if len(blob) % 2 else b"")
    path.write_bytes(bytes(out))


@pytest.fixture
def places(tmp_path, monkeypatch):
    """Every place find_data looks at, moved into tmp_path and empty."""
    monkeypatch.delenv(fashion.ENV, raising=False)
    monkeypatch.setattr(fashion, "SYSTEM_DIR", tmp_path / "system")
    monkeypatch.setattr(fashion, "APT_ARCHIVES", tmp_path / "archives")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "archives").mkdir()
    return tmp_path


@pytest.fixture
def small(places, monkeypatch):
    """A synthetic dataset in $FIXNORM_FASHION_MNIST, and a subset small enough for it."""
    write_dataset(places / "env")
    monkeypatch.setenv(fashion.ENV, str(places / "env"))
    monkeypatch.setattr(fashion, "TRAIN_PER_CLASS", 13)  # 130 images: two steps of 64 per epoch
    monkeypatch.setattr(fashion, "VALIDATION_PER_CLASS", 3)
    return places


@pytest.mark.parametrize("dtype", [">u1", ">i1", ">i2", ">i4", ">f4", ">f8"])
@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_gives_back_the_array(tmp_path, dtype, gz):
    array = (np.arange(2 * 3 * 5).reshape(2, 3, 5) * (-1 if dtype != ">u1" else 1)).astype(dtype)
    if dtype in (">i2", ">i4"):
        array[0, 0, 0] = np.iinfo(dtype).min  # every byte of the value matters
    path = tmp_path / ("a.idx.gz" if gz else "a.idx")
    path.write_bytes(gzip.compress(idx_bytes(array)) if gz else idx_bytes(array))
    got = fashion.read_idx(path)
    assert got.shape == (2, 3, 5) and got.dtype == np.dtype(dtype).newbyteorder("=")
    np.testing.assert_array_equal(got, array)
    got[0, 0, 0] = 1  # a writable copy in native order, not a view of the file's bytes


def test_read_idx_of_labels_is_one_dimensional(tmp_path):
    (tmp_path / "labels").write_bytes(idx_bytes(np.array([3, 1, 4, 1, 5], dtype=np.uint8)))
    assert fashion.read_idx(tmp_path / "labels").tolist() == [3, 1, 4, 1, 5]


@pytest.mark.parametrize("data, message", [
    (b"\x01\x00\x08\x01" + struct.pack(">I", 2) + b"ab", "not an IDX file"),   # magic not 0 0
    (b"\x00\x00\x07\x01" + struct.pack(">I", 2) + b"ab", "not an IDX file"),   # unknown type code
    (b"\x00\x00", "not an IDX file"),
    (b"\x00\x00\x08\x03" + struct.pack(">I", 2), "header cut short"),
    (b"\x00\x00\x08\x02" + struct.pack(">II", 2, 3) + b"abcde", "5 bytes of values"),
    (b"\x00\x00\x0b\x01" + struct.pack(">I", 2) + b"abc", "3 bytes of values"),
])
def test_read_idx_refuses_a_broken_file(tmp_path, data, message):
    (tmp_path / "broken").write_bytes(data)
    with pytest.raises(ValueError, match=message):
        fashion.read_idx(tmp_path / "broken")


def test_search_order_env_then_system_then_cache_then_package(places, monkeypatch):
    env, system, cache = places / "env", places / "system", fashion.cache_dir()
    assert cache == places / "cache" / "fixnorm_ext" / "fashion-mnist"
    for folder in (env, system, cache):
        write_dataset(folder, gz=folder is not system)  # plain files count as well as gzipped ones
    monkeypatch.setenv(fashion.ENV, str(env))
    assert fashion.find_data() == env
    monkeypatch.setenv(fashion.ENV, str(places / "elsewhere"))  # a folder without the files is passed over
    assert fashion.find_data() == system
    monkeypatch.delenv(fashion.ENV)
    assert fashion.find_data() == system
    (system / "t10k-labels-idx1-ubyte").unlink()  # an incomplete folder does not count
    assert fashion.find_data() == cache


def test_the_package_is_extracted_into_the_cache(places):
    source = places / "source"
    arrays = write_dataset(source)
    write_deb(places / "archives" / "dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb", source)
    folder = fashion.find_data()
    assert folder == fashion.cache_dir()
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{name}.gz" for name in fashion.FILES)
    for name, array in arrays.items():
        np.testing.assert_array_equal(fashion.read_idx(folder / f"{name}.gz"), array)
    assert fashion.find_data() == folder  # from the cache now


def test_a_package_without_the_files_is_refused(places):
    source = places / "source"
    write_dataset(source)
    (source / "train-labels-idx1-ubyte.gz").unlink()
    write_deb(places / "archives" / "dataset-fashion-mnist_1_all.deb", source)
    with pytest.raises(ValueError, match="lacks train-labels-idx1-ubyte.gz"):
        fashion.find_data()


def test_nothing_found_says_where_it_looked_and_how_to_get_the_data(places, monkeypatch):
    monkeypatch.setenv(fashion.ENV, str(places / "nowhere"))
    with pytest.raises(FileNotFoundError) as info:
        fashion.find_data()
    message = str(info.value)
    for place in (f"$FIXNORM_FASHION_MNIST={places / 'nowhere'}", str(places / "system"),
                  str(fashion.cache_dir()), str(places / "archives" / "dataset-fashion-mnist_*.deb"),
                  "apt-get install dataset-fashion-mnist", "set FIXNORM_FASHION_MNIST"):
        assert place in message
    monkeypatch.delenv(fashion.ENV)
    with pytest.raises(FileNotFoundError, match=r"\$FIXNORM_FASHION_MNIST \(not set\)"):
        fashion.find_data()


def test_nothing_found_stops_the_commands_with_the_message(places, tmp_path):
    with pytest.raises(SystemExit, match="tune: Fashion-MNIST not found; looked in"):
        cli_main(["tune", "--example", "fashion", "--budget", "2"])
    with pytest.raises(SystemExit, match="experiment: Fashion-MNIST not found; looked in"):
        cli_main(["experiment", "--dataset", "fashion", "--quick", "--out", str(tmp_path / "out")])


def test_the_subset_is_balanced_disjoint_and_standardized(small):
    train, val, test = fashion.load_data(validation=True)
    assert train[0].shape == (130, 1, 28, 28) and val[0].shape == (30, 1, 28, 28) and test[0].shape == (30, 1, 28, 28)
    assert torch.bincount(train[1]).tolist() == [13] * 10 and torch.bincount(val[1]).tolist() == [3] * 10
    assert train[0].dtype == torch.float32 and train[1].dtype == torch.long
    assert abs(train[0].mean().item()) < 1e-5 and abs(train[0].std().item() - 1) < 1e-3
    rows = {tuple(x.flatten().tolist()) for x in train[0]}
    assert not rows & {tuple(x.flatten().tolist()) for x in val[0]}
    # The same subset every time; without validation, training on both parts.
    again = fashion.load_data(validation=True)
    assert torch.equal(again[0][0], train[0]) and torch.equal(again[1][1], val[1])
    both, test2 = fashion.load_data()
    assert len(both[1]) == 160 and torch.equal(test2[1], test[1])


def test_too_small_a_dataset_for_the_subset_is_refused(small, monkeypatch):
    monkeypatch.setattr(fashion, "TRAIN_PER_CLASS", 14)  # 16 per class in the files, 17 asked for
    with pytest.raises(ValueError, match="class 0 has 16 training images, the subset needs 17"):
        fashion.load_data(validation=True)


def test_the_net_is_classified_for_fixnorm():
    model = fashion.build_model()
    groups = fixnorm_param_groups(model, fc_norm=5.0)
    roles = {g.get("norm"): sum(p.numel() for p in g["params"]) for g in groups}
    assert roles["fixed"] == 16 * 9 + 32 * 16 * 9 + 32 * 32 * 9  # the three convs
    assert roles["max"] == 32 * 10  # the classifier
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_the_fashion_experiment_end_to_end(small, tmp_path):
    out = tmp_path / "out"
    assert cli_main(["experiment", "--dataset", "fashion", "--quick", "--out", str(out)]) == 0
    report = (out / "experiment.md").read_text()
    data = json.loads((out / "experiment.json").read_text())
    assert report.startswith("# FixNorm on Fashion-MNIST: the experiment")
    assert "`python -m fixnorm_ext experiment --dataset fashion --quick`" in report
    assert "`--epochs 1`, `--budget 3`, `--seeds 1`, `--search-budget 3`, `--search-seeds 1`, `--grid 2`" in report
    assert fashion.SPLIT in report
    for png in ("grid.png", "training.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert data["dataset"] == "fashion" and data["settings"]["grid"] == 2
    assert len(data["curves"]["fixnorm"]) == 3  # three conv layers
    assert all(len(c["angle"]) == 2 for c in data["curves"]["fixnorm"].values())  # one epoch of two steps


def test_tune_on_fashion(small, capsys):
    assert cli_main(["tune", "--example", "fashion", "--budget", "2", "--epochs", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("trial 1/2 [fc_norm]") and out[2].startswith("sequential: best score ")


def test_the_default_epochs_are_the_examples(small, monkeypatch):
    seen = []
    real = fashion.objective
    monkeypatch.setattr(fashion, "objective", lambda **kw: seen.append(kw["epochs"]) or real(**{**kw, "epochs": 1}))
    assert cli_main(["tune", "--example", "fashion", "--budget", "1"]) == 0
    assert seen == [fashion.EPOCHS]


def test_the_real_package_when_apt_holds_it(tmp_path):
    debs = sorted(fashion.APT_ARCHIVES.glob(f"{fashion.PACKAGE}_*.deb"))
    if not debs:
        pytest.skip(f"no {fashion.PACKAGE} package in {fashion.APT_ARCHIVES}")
    fashion.extract_package(debs[-1], tmp_path)
    images, labels = (fashion.read_idx(tmp_path / f"{name}.gz") for name in fashion.FILES[:2])
    assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [6000] * 10
    test_images = fashion.read_idx(tmp_path / "t10k-images-idx3-ubyte.gz")
    assert test_images.shape == (10000, 28, 28)
