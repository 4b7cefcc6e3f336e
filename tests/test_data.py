"""Tests for jaxmp.training.data: loaders, the IDX parser and its error messages, and batch streams."""

import gzip
import os

import numpy as np
import pytest

from jaxmp.config import ConfigError, DataConfig
from jaxmp.training.data import (
    IDX_FILES,
    Dataset,
    epoch_order,
    eval_batches,
    load_dataset,
    num_batches,
    parse_synthetic_shape,
    read_idx,
    train_batches,
)

# ------------------------------------------------------------------------------------------ helpers


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array as an IDX file (magic 0x0000080N, big-endian dims, data)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_dir(folder, n_train=12, n_test=5, hw=(4, 3), gz=False, seed=0):
    """Write the four standard IDX files of a tiny dataset; return the raw uint8 arrays."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, *hw), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (n_test, *hw), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    os.makedirs(folder, exist_ok=True)
    for key, base in IDX_FILES.items():
        data = idx_bytes(arrays[key])
        path = os.path.join(folder, base + (".gz" if gz else ""))
        with open(path, "wb") as f:
            f.write(gzip.compress(data) if gz else data)
    return arrays


def mnist_cfg(folder) -> DataConfig:
    return DataConfig(dataset="mnist", data_dir=str(folder))


def tiny_dataset(n=10, name="tiny") -> Dataset:
    """Training examples whose value is their index, so batches reveal which examples they hold."""
    x = np.arange(n, dtype=np.float32)[:, None]
    y = np.arange(n, dtype=np.int32)
    return Dataset(x, y, x[:3], y[:3], num_classes=n, name=name)


# ------------------------------------------------------------------------------------------- digits


def test_digits_shapes_ranges_and_fixed_split():
    a = load_dataset(DataConfig(dataset="digits"), seed=0)
    b = load_dataset(DataConfig(dataset="digits"), seed=123)
    assert a.x_train.shape == (1437, 8, 8, 1) and a.x_test.shape == (360, 8, 8, 1)
    assert a.x_train.dtype == np.float32 and a.y_train.dtype == np.int32
    assert a.x_train.min() == 0.0 and a.x_train.max() == 1.0
    assert set(np.unique(a.y_train)) == set(range(10)) and a.num_classes == 10 and a.name == "digits"
    for x, y in zip(a, b, strict=False):
        if isinstance(x, np.ndarray):
            np.testing.assert_array_equal(x, y)  # split does not depend on the run seed
    # train + test is exactly the 1797 images, as a multiset: nothing duplicated or lost by the split
    rows = np.concatenate([a.x_train, a.x_test]).reshape(1797, -1) * 16
    assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, load_all_digits().tolist()))


def load_all_digits():
    from sklearn.datasets import load_digits

    return load_digits().data


# ---------------------------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, gz):
    raw = write_idx_dir(tmp_path, gz=gz)
    ds = load_dataset(mnist_cfg(tmp_path), seed=0)
    assert ds.name == "mnist" and ds.num_classes == 10
    assert ds.x_train.shape == (12, 4, 3, 1) and ds.x_test.shape == (5, 4, 3, 1)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    np.testing.assert_allclose(ds.x_train[..., 0], raw["train_images"] / 255.0, rtol=1e-6)
    np.testing.assert_allclose(ds.x_test[..., 0], raw["test_images"] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(ds.y_train, raw["train_labels"])
    np.testing.assert_array_equal(ds.y_test, raw["test_labels"])


def test_fashion_mnist_uses_given_dir_and_name(tmp_path):
    write_idx_dir(tmp_path)
    ds = load_dataset(DataConfig(dataset="fashion-mnist", data_dir=str(tmp_path)), seed=0)
    assert ds.name == "fashion-mnist" and len(ds.y_train) == 12


def test_mnist_without_data_dir_is_config_error():
    with pytest.raises(ConfigError, match="--data-dir"):
        load_dataset(DataConfig(dataset="mnist"), seed=0)


def test_missing_dir(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigError, match="nowhere"):
        load_dataset(mnist_cfg(missing), seed=0)


def test_missing_file(tmp_path):
    write_idx_dir(tmp_path)
    os.remove(tmp_path / "t10k-labels-idx1-ubyte")
    with pytest.raises(ConfigError, match="t10k-labels-idx1-ubyte"):
        load_dataset(mnist_cfg(tmp_path), seed=0)


def corrupt(path, how: str) -> None:
    """Damage one IDX file in place: bad magic, cut data, cut header, or an extra byte."""
    data = path.read_bytes()
    if how == "magic":
        data = b"\x00\x00\x08\x09" + data[4:]
    elif how == "truncated":
        data = data[:-3]
    elif how == "header":
        data = data[:6]
    elif how == "trailing":
        data = data + b"\x00"
    path.write_bytes(data)


@pytest.mark.parametrize("how", ["magic", "truncated", "header", "trailing"])
@pytest.mark.parametrize("base", ["train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"])
def test_corrupt_plain_file(tmp_path, how, base):
    write_idx_dir(tmp_path)
    corrupt(tmp_path / base, how)
    with pytest.raises(ConfigError, match=base) as err:
        load_dataset(mnist_cfg(tmp_path), seed=0)
    assert err.value.__cause__ is None and "\n" not in str(err.value)


@pytest.mark.parametrize("payload", [b"not gzip at all", None])
def test_bad_gzip(tmp_path, payload):
    write_idx_dir(tmp_path, gz=True)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    good = path.read_bytes()
    path.write_bytes(payload if payload is not None else good[: len(good) // 2])  # garbage / cut off
    with pytest.raises(ConfigError, match="train-labels-idx1-ubyte.gz") as err:
        load_dataset(mnist_cfg(tmp_path), seed=0)
    assert err.value.__cause__ is None


def test_label_count_must_match_image_count(tmp_path):
    write_idx_dir(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(11, np.uint8)))
    with pytest.raises(ConfigError, match="train-labels-idx1-ubyte.*11 labels.*12 images"):
        load_dataset(mnist_cfg(tmp_path), seed=0)


def test_labels_must_be_below_ten(tmp_path):
    write_idx_dir(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.full(5, 10, np.uint8)))
    with pytest.raises(ConfigError, match="t10k-labels-idx1-ubyte"):
        load_dataset(mnist_cfg(tmp_path), seed=0)


def test_swapped_files_rejected(tmp_path):
    raw = write_idx_dir(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(raw["train_images"]))
    with pytest.raises(ConfigError, match="train-labels-idx1-ubyte"):
        load_dataset(mnist_cfg(tmp_path), seed=0)


def test_read_idx_shapes(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4)))
    np.testing.assert_array_equal(read_idx(str(path)), np.arange(24).reshape(2, 3, 4))


# ---------------------------------------------------------------------------------------- synthetic


@pytest.mark.parametrize("text, shape", [("28x28x1", (28, 28, 1)), ("8X6x3", (8, 6, 3)), ("64", (64,))])
def test_parse_synthetic_shape(text, shape):
    assert parse_synthetic_shape(text) == shape


@pytest.mark.parametrize("text", ["", "28x28", "0x4x1", "-3", "axbxc", "2x2x2x2", "1.5"])
def test_bad_synthetic_shape(text):
    with pytest.raises(ConfigError, match="HxWxC") as err:
        load_dataset(DataConfig(dataset="synthetic", synthetic_shape=text), seed=0)
    assert repr(text) in str(err.value)


@pytest.mark.parametrize("shape", ["6x5x2", "40"])
def test_synthetic_shape_classes_and_seed(shape):
    cfg = DataConfig(dataset="synthetic", synthetic_shape=shape, synthetic_size=100, synthetic_classes=3)
    ds = load_dataset(cfg, seed=1)
    want = parse_synthetic_shape(shape)
    assert ds.x_train.shape == (100, *want) and ds.x_test.shape == (25, *want)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    assert ds.x_train.min() >= 0.0 and ds.x_train.max() <= 1.0
    assert ds.num_classes == 3 and set(np.unique(ds.y_train)) == {0, 1, 2}
    again, other = load_dataset(cfg, seed=1), load_dataset(cfg, seed=2)
    np.testing.assert_array_equal(ds.x_train, again.x_train)
    assert not np.array_equal(ds.x_train, other.x_train)


def test_synthetic_is_learnable():
    """A nearest-class-mean classifier fit on train beats chance (10%) clearly on test."""
    cfg = DataConfig(dataset="synthetic", synthetic_shape="16", synthetic_size=1000, synthetic_classes=10)
    ds = load_dataset(cfg, seed=0)
    means = np.stack([ds.x_train[ds.y_train == c].mean(0) for c in range(10)])
    pred = ((ds.x_test[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
    assert (pred == ds.y_test).mean() > 0.5
    # the test labels must really follow the inputs: shuffled labels give about chance
    assert (pred == np.random.default_rng(0).permutation(ds.y_test)).mean() < 0.25


@pytest.mark.parametrize(
    ("dataset", "size", "classes", "shape"),
    [("synthetic", 2000, 10, "28x28x1"), ("synthetic", 10, 1000, "28x28x1"), ("synthetic", 20000, 3, "5")]
    + [("synthetic-text", 100000, 10, ""), ("synthetic-text", 1000, 20000, "")],
)
def test_synthetic_memory_estimates_match_the_measured_peak(dataset, size, classes, shape):
    """What the refusal of a dataset beyond the host's memory estimates is the peak numpy and Python
    allocate (``tracemalloc``), within a margin: never far below it, never several times above it."""
    import tracemalloc

    from jaxmp.training.data import synthetic_bytes
    from jaxmp.training.text import synthetic_text_bytes

    cfg = DataConfig(dataset=dataset, synthetic_size=size, synthetic_classes=classes, synthetic_shape=shape or "1")
    tracemalloc.start()
    try:
        load_dataset(cfg, seed=0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    if dataset == "synthetic":
        estimate = synthetic_bytes(parse_synthetic_shape(shape), size, classes)
    else:
        estimate = synthetic_text_bytes(size, classes)
    assert 0.95 * peak <= estimate <= 1.6 * peak


def test_synthetic_data_beyond_the_host_is_refused_before_allocating():
    cfg = DataConfig(dataset="synthetic", synthetic_size=2 * 10**9, synthetic_classes=10)
    with pytest.raises(
        ConfigError,
        match=r"^--synthetic-size 2000000000 --synthetic-classes 10 --synthetic-shape "
        r"28x28x1: the synthetic dataset needs about 18.6 TiB of host memory, this machine has ",
    ):
        load_dataset(cfg, seed=0)


# ----------------------------------------------------------------------------------------- batching


def test_num_batches_drops_remainder():
    assert num_batches(10, 3) == 3 and num_batches(9, 3) == 3 and num_batches(2, 3) == 0
    with pytest.raises(ConfigError):
        num_batches(10, 0)


def test_epoch_order_is_deterministic_permutation():
    a = epoch_order(50, seed=3, epoch=1)
    np.testing.assert_array_equal(np.sort(a), np.arange(50))
    np.testing.assert_array_equal(a, epoch_order(50, seed=3, epoch=1))
    assert not np.array_equal(a, epoch_order(50, seed=3, epoch=2))
    assert not np.array_equal(a, epoch_order(50, seed=4, epoch=1))


def take(it, k):
    return [next(it) for _ in range(k)]


def test_train_batches_epochs_are_permutations():
    ds = tiny_dataset(10)
    batches = take(train_batches(ds, batch_size=3, seed=0), 9)  # 3 epochs of 3 full batches
    assert all(x.shape == (3, 1) and y.shape == (3,) for x, y in batches)
    for x, y in batches:
        np.testing.assert_array_equal(x[:, 0].astype(np.int32), y)  # x and y stay paired
    epochs = [np.concatenate([y for _, y in batches[e * 3 : e * 3 + 3]]) for e in range(3)]
    for ids in epochs:
        assert len(set(ids.tolist())) == 9  # each example at most once per epoch; one of 10 left out
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled each epoch


def test_train_batches_cover_every_example_each_epoch():
    ds = tiny_dataset(12)
    batches = take(train_batches(ds, batch_size=4, seed=5), 6)
    for e in range(2):
        ids = np.concatenate([y for _, y in batches[e * 3 : e * 3 + 3]])
        np.testing.assert_array_equal(np.sort(ids), np.arange(12))


def test_train_batches_deterministic_and_seed_dependent():
    ds = tiny_dataset(20)
    a = take(train_batches(ds, 4, seed=7), 12)
    b = take(train_batches(ds, 4, seed=7), 12)
    c = take(train_batches(ds, 4, seed=8), 12)
    assert all(np.array_equal(ya, yb) for (_, ya), (_, yb) in zip(a, b, strict=True))
    assert not all(np.array_equal(ya, yc) for (_, ya), (_, yc) in zip(a, c, strict=True))


@pytest.mark.parametrize("k", [1, 2, 3, 5, 8])
def test_train_batches_resume_at_step(k):
    ds = tiny_dataset(10)
    full = take(train_batches(ds, 3, seed=2), k + 4)
    resumed = take(train_batches(ds, 3, seed=2, start_step=k), 4)
    for (_, y_full), (_, y_res) in zip(full[k:], resumed, strict=True):
        np.testing.assert_array_equal(y_full, y_res)


def test_batch_larger_than_dataset_fails_at_call_time():
    with pytest.raises(ConfigError, match="--batch-size 11 is larger than the 10 training examples of tiny"):
        train_batches(tiny_dataset(10), batch_size=11, seed=0)


def test_eval_batches_cover_each_example_once():
    x = np.arange(10, dtype=np.float32).reshape(10, 1, 1, 1) + 1.0
    y = np.arange(10, dtype=np.int32) % 3
    batches = list(eval_batches(x, y, 4))
    assert len(batches) == 3
    assert all(xb.shape == (4, 1, 1, 1) and yb.shape == (4,) and m.shape == (4,) for xb, yb, m in batches)
    assert all(m.dtype == np.float32 for _, _, m in batches)
    xs = np.concatenate([xb for xb, _, _ in batches])
    ys = np.concatenate([yb for _, yb, _ in batches])
    mask = np.concatenate([m for _, _, m in batches])
    np.testing.assert_array_equal(mask, [1] * 10 + [0] * 2)
    np.testing.assert_array_equal(xs[:10], x)
    np.testing.assert_array_equal(ys[:10], y)
    np.testing.assert_array_equal(xs[10:], 0.0)
    assert mask.sum() == len(x)


def test_eval_batches_exact_multiple_has_no_padding():
    x, y = np.ones((8, 2), np.float32), np.zeros(8, np.int32)
    batches = list(eval_batches(x, y, 4))
    assert len(batches) == 2 and all(m.all() for _, _, m in batches)
