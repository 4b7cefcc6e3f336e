"""Datasets as host-side numpy arrays, and the global batches a training run consumes.

Why numpy and not JAX here: data loading, shuffling and batching are host work that needs no device,
so every array in this module is a plain ``np.ndarray`` on the host. A batch is the *global* batch:
the trainer places it on the device mesh (``jax.device_put`` with a ``NamedSharding``), and only then
is it split over the ``data`` axis. Keeping that split out of this module means the same batch stream
feeds every mesh shape, and a run's data order depends only on ``(seed, step)``, never on the number
of devices.

Conventions: images are float32 NHWC ``(N, H, W, C)`` scaled to ``[0, 1]``; a synthetic dataset with a
plain feature count is float32 ``(N, F)``; token ids are int32 ``(N, T)``; labels are int32, one per
example ``(N,)`` or one per token ``(N, T)``, and a negative label (:data:`IGNORE`) marks a token that
counts in no loss or metric. Every bad input (missing or corrupt IDX
file, unparsable shape, batch larger than the data) raises :class:`~jaxmp.config.ConfigError` with one
sentence naming the value or file and what is wrong.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from collections.abc import Callable, Iterator
from typing import NamedTuple

import numpy as np

from jaxmp.config import ConfigError, DataConfig
from jaxmp.training.memory import check_host_fits

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
DIGITS_SPLIT_SEED = 0  # fixed, so the digits test set is the same for every run seed
DIGITS_TEST_SIZE = 360
IDX_LABELS_MAGIC = 0x00000801
IDX_IMAGES_MAGIC = 0x00000803
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


IGNORE = -1  # the label of a token (or example) that counts in no loss or metric


class Dataset(NamedTuple):
    """A train/test split held in host memory.

    ``x_*``: float32 in ``[0, 1]`` (images NHWC ``(N, H, W, C)``, or ``(N, F)`` features), or int32
    token ids ``(N, T)``. ``y_*``: int32 class ids in ``[0, num_classes)``, one per example ``(N,)`` or
    one per token ``(N, T)``; a negative label is ignored (:data:`IGNORE`). For text, ``num_classes`` is
    the vocabulary size and ``vocab`` the text of each token id (for printing samples).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    name: str
    vocab: tuple[str, ...] | None = None

    @staticmethod
    def of(train, test=None, *, classes: int | None = None, name: str = "own") -> Dataset:
        """A dataset of your own host arrays: ``train = (x, y)`` (and ``test``, default: ``train``);
        ``classes`` defaults to the largest label + 1. Integer examples are token ids, which must lie
        in the vocabulary ``0..classes - 1`` when the labels are per token. ``ConfigError`` for arrays
        that do not pair up, labels outside the classes, or token ids outside the vocabulary."""
        (x, y), (xt, yt) = _pair(train, "train"), _pair(train if test is None else test, "test")
        if xt.shape[1:] != x.shape[1:] or yt.shape[1:] != y.shape[1:]:
            raise ConfigError(
                f"test examples and labels have shapes {xt.shape[1:]} and {yt.shape[1:]}, train ones "
                f"{x.shape[1:]} and {y.shape[1:]}."
            )
        classes = int(max(y.max(), yt.max())) + 1 if classes is None else classes
        if max(y.max(), yt.max()) >= classes:
            raise ConfigError(f"labels must be class ids in 0..{classes - 1} (or {IGNORE} to ignore one).")
        if y.ndim > 1:  # per-token labels: the examples are token ids (checked by _pair)
            check_token_ids(x, classes, "train")
            check_token_ids(xt, classes, "test")
        return Dataset(x, y, xt, yt, classes, name)


def check_token_ids(ids: np.ndarray, vocab: int, what: str) -> None:
    """``ConfigError`` naming the first token id outside ``0..vocab - 1``."""
    bad = np.flatnonzero((ids < 0) | (ids >= vocab))
    if bad.size:
        row, col = np.unravel_index(bad[0], ids.shape)[:2]
        raise ConfigError(
            f"{what} token id {int(ids.flat[bad[0]])} (example {row}, position {col}) is outside the "
            f"vocabulary of {vocab} tokens (0..{vocab - 1})."
        )


def _pair(arrays, what: str) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)``: examples as float32 (integer ones as int32 token ids), labels as int32, one per
    example or one per token (``y.shape == x.shape``)."""
    try:
        x, y = arrays
    except (TypeError, ValueError):
        raise ConfigError(f"{what} data must be a pair (examples, labels) of arrays.") from None
    x, y = np.asarray(x), np.asarray(y)
    per_token = y.ndim > 1 and y.shape == x.shape
    if x.ndim < 2 or not (y.ndim == 1 or per_token) or len(x) != len(y) or len(x) == 0:
        raise ConfigError(
            f"{what} data: {x.shape} examples and {y.shape} labels do not pair up (one label per example, "
            "or one per token: labels of the examples' shape)."
        )
    if not np.issubdtype(y.dtype, np.integer):
        raise ConfigError(f"{what} labels must be integer class ids, got {y.dtype}.")
    if per_token and not np.issubdtype(x.dtype, np.integer):
        raise ConfigError(f"{what} data: per-token labels need integer token ids as examples, got {x.dtype}.")
    integer = np.issubdtype(x.dtype, np.integer)
    x = x.astype(np.int32 if integer else np.float32)
    if not integer:
        bad = np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))
        if bad.size:
            raise ConfigError(
                f"{what} data: example {bad[0]} holds a non-finite value (NaN or infinity), and {bad.size} "
                "example(s) in all; clean or drop them."
            )
    return x, y.astype(np.int32)


# ----------------------------------------------------------------------------------------- loading


def load_dataset(cfg: DataConfig, seed: int) -> Dataset:
    """Load the dataset ``cfg.dataset`` names.

    Args:
        cfg: the data options (dataset name, IDX folder, synthetic shape/size/classes).
        seed: the run seed; only the synthetic dataset depends on it (real datasets have a fixed split
            so evaluation is comparable across runs).

    Returns:
        The :class:`Dataset`.

    Raises:
        ConfigError: unknown dataset, missing/corrupt IDX files, a bad synthetic shape, or data beyond the
            host's memory.
    """
    if cfg.dataset not in DATASETS:
        raise ConfigError(f"--dataset {cfg.dataset!r} is not one of {', '.join(DATASETS)}.")
    try:
        return DATASETS[cfg.dataset](cfg, seed)
    except MemoryError:  # what the estimates of the synthetic datasets let through: still one line
        raise ConfigError(f"--dataset {cfg.dataset}: the host ran out of memory loading or building it.") from None


def _load_idx(cfg: DataConfig, seed: int) -> Dataset:
    data_dir = cfg.data_dir
    if data_dir is None and cfg.dataset == "fashion-mnist":
        data_dir = FASHION_MNIST_DIR
    if data_dir is None:
        raise ConfigError(
            f"--dataset {cfg.dataset} needs --data-dir, a folder with the IDX files "
            f"{', '.join(IDX_FILES.values())} (plain or .gz)."
        )
    return load_idx_dataset(data_dir, cfg.dataset)


def _load_synthetic(cfg: DataConfig, seed: int) -> Dataset:
    return make_synthetic(parse_synthetic_shape(cfg.synthetic_shape), cfg.synthetic_size, cfg.synthetic_classes, seed)


def synthetic_bytes(shape: tuple[int, ...], size: int, num_classes: int) -> int:
    """Host memory :func:`make_synthetic` needs at its peak: the prototypes, the training examples three
    times over while they are mixed (noise, scaled prototypes, their sum), the test examples, and the
    labels (int64 draws, then int32)."""
    example = 4 * math.prod(shape)
    test = max(size // 4, 1)
    return example * (num_classes + 3 * size + test) + 12 * (size + test)


def load_digits() -> Dataset:
    """scikit-learn's bundled 8x8 digits, split 1437 train / 360 test by a fixed permutation.

    Returns:
        A :class:`Dataset` with images ``(N, 8, 8, 1)`` in ``[0, 1]`` (raw values 0..16 divided by 16).
    """
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    x = (np.asarray(bunch.images, dtype=np.float32) / 16.0)[..., None]
    y = np.asarray(bunch.target, dtype=np.int32)
    order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(y))
    test, train = order[:DIGITS_TEST_SIZE], order[DIGITS_TEST_SIZE:]
    return Dataset(x[train], y[train], x[test], y[test], num_classes=10, name="digits")


def load_idx_dataset(data_dir: str, name: str) -> Dataset:
    """MNIST-format dataset from the four standard IDX files (each plain or ``.gz``) in ``data_dir``.

    Args:
        data_dir: the folder with ``train-images-idx3-ubyte`` etc.
        name: the dataset name recorded in the result (``mnist`` or ``fashion-mnist``).

    Returns:
        A :class:`Dataset` with images ``(N, 28, 28, 1)`` (or the files' size) scaled by 1/255.

    Raises:
        ConfigError: missing folder or file, corrupt file, or inconsistent files.
    """
    if not os.path.isdir(data_dir):
        raise ConfigError(f"--data-dir {data_dir} is not a folder (expected the IDX files of {name} there).")
    paths = {key: find_idx_file(data_dir, base) for key, base in IDX_FILES.items()}
    arrays = {key: read_idx(path) for key, path in paths.items()}
    for split in ("train", "test"):
        _check_idx_pair(arrays, paths, split)
    train_hw, test_hw = arrays["train_images"].shape[1:], arrays["test_images"].shape[1:]
    if train_hw != test_hw:
        raise ConfigError(f"{paths['test_images']} holds {test_hw} images but the training images are {train_hw}.")

    def images(key: str) -> np.ndarray:
        return (arrays[key].astype(np.float32) / 255.0)[..., None]

    return Dataset(
        images("train_images"),
        arrays["train_labels"].astype(np.int32),
        images("test_images"),
        arrays["test_labels"].astype(np.int32),
        num_classes=10,
        name=name,
    )


def _check_idx_pair(arrays: dict[str, np.ndarray], paths: dict[str, str], split: str) -> None:
    """Check that one split's images and labels files fit together.

    Args:
        arrays: the parsed IDX arrays by key (``train_images``, ``train_labels``, ...).
        paths: the file each array came from, by the same keys.
        split: ``train`` or ``test``.

    Raises:
        ConfigError: images not 3-D or labels not 1-D (files swapped?), counts differ, or a label >= 10.
    """
    images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
    images_path, labels_path = paths[f"{split}_images"], paths[f"{split}_labels"]
    if images.ndim != 3:
        raise ConfigError(f"IDX file {images_path} holds {images.ndim}-D data, not 3-D images.")
    if labels.ndim != 1:
        raise ConfigError(f"IDX file {labels_path} holds {labels.ndim}-D data, not 1-D labels.")
    if len(labels) != len(images):
        raise ConfigError(
            f"IDX file {labels_path} has {len(labels)} labels but {images_path} has {len(images)} images."
        )
    if labels.size and labels.max() >= 10:
        raise ConfigError(f"IDX file {labels_path} has label {labels.max()}, but labels must be 0..9.")


def find_idx_file(data_dir: str, base: str) -> str:
    """The path of IDX file ``base`` in ``data_dir``: plain if present, else ``base.gz``.

    Args:
        data_dir: the folder to look in.
        base: the standard file name without ``.gz``, e.g. ``train-images-idx3-ubyte``.

    Returns:
        The existing path.

    Raises:
        ConfigError: neither the plain nor the gzipped file exists.
    """
    path = os.path.join(data_dir, base)
    for candidate in (path, path + ".gz"):
        if os.path.isfile(candidate):
            return candidate
    raise ConfigError(f"IDX file {path} (or {path}.gz) does not exist.")


def read_idx(path: str) -> np.ndarray:
    """Parse one IDX file of unsigned bytes (labels ``0x00000801`` or images ``0x00000803``).

    Args:
        path: the file; a name ending in ``.gz`` is decompressed first.

    Returns:
        A uint8 array of the header's shape: ``(N,)`` for labels, ``(N, rows, cols)`` for images.

    Raises:
        ConfigError: unreadable file, bad gzip, bad magic number, or a byte count that does not match.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if path.endswith(".gz"):
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise ConfigError(f"IDX file {path} cannot be read or decompressed ({e}).") from None
    if len(raw) < 4:
        raise ConfigError(f"IDX file {path} is truncated: {len(raw)} bytes, shorter than its header.")
    magic = int.from_bytes(raw[:4], "big")
    if magic not in (IDX_LABELS_MAGIC, IDX_IMAGES_MAGIC):
        raise ConfigError(
            f"IDX file {path} has magic number {magic:#010x}, not {IDX_LABELS_MAGIC:#010x} (labels) "
            f"or {IDX_IMAGES_MAGIC:#010x} (images)."
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ConfigError(f"IDX file {path} is truncated: {len(raw)} bytes, shorter than its header.")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        raise ConfigError(
            f"IDX file {path} has {len(raw)} bytes but its header {dims} needs {expected} "
            f"({'truncated' if len(raw) < expected else 'trailing data'})."
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


# --------------------------------------------------------------------------------------- synthetic


def parse_synthetic_shape(text: str) -> tuple[int, ...]:
    """Parse ``--synthetic-shape``: ``"HxWxC"`` (an image) or ``"F"`` (a feature count).

    Args:
        text: the option value, e.g. ``"28x28x1"`` or ``"64"``.

    Returns:
        ``(H, W, C)`` or ``(F,)``, all positive.

    Raises:
        ConfigError: any other form, or a zero/negative size.
    """
    parts = text.strip().lower().split("x")
    if len(parts) in (1, 3) and all(p.strip().isdecimal() and int(p) > 0 for p in parts):
        return tuple(int(p) for p in parts)
    raise ConfigError(
        f"--synthetic-shape {text!r} is not HxWxC (e.g. 28x28x1) or a feature count (e.g. 64) of positive integers."
    )


def make_synthetic(shape: tuple[int, ...], size: int, num_classes: int, seed: int) -> Dataset:
    """A learnable synthetic classification task: noisy copies of one random prototype per class.

    Each class ``c`` has a prototype ``p_c`` uniform in ``[0, 1]``; an example of class ``c`` is
    ``0.4 * p_c + 0.6 * u`` with fresh uniform noise ``u``, so it stays in ``[0, 1]`` and the class is
    recoverable (nearest class mean, or any trained model) well above chance.

    Args:
        shape: ``(H, W, C)`` for NHWC images or ``(F,)`` for features.
        size: number of training examples; the test set has ``max(size // 4, 1)``.
        num_classes: number of classes (positive).
        seed: seeds prototypes, examples and labels.

    Returns:
        A :class:`Dataset` named ``synthetic``.

    Raises:
        ConfigError: a size or class count below 1, or arrays beyond the host's memory.
    """
    if size < 1 or num_classes < 1:
        raise ConfigError(
            f"synthetic data needs positive --synthetic-size and --synthetic-classes, got {size} and {num_classes}."
        )
    subject = f"--synthetic-size {size} --synthetic-classes {num_classes} --synthetic-shape {'x'.join(map(str, shape))}"
    check_host_fits(subject, "the synthetic dataset", synthetic_bytes(shape, size, num_classes))
    prototypes = np.random.default_rng([seed, 0]).random((num_classes, *shape), dtype=np.float32)

    def split(n: int, stream: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([seed, stream])
        y = rng.integers(0, num_classes, size=n).astype(np.int32)
        noise = rng.random((n, *shape), dtype=np.float32)
        return (0.4 * prototypes[y] + 0.6 * noise).astype(np.float32), y

    x_train, y_train = split(size, 1)
    x_test, y_test = split(max(size // 4, 1), 2)
    return Dataset(x_train, y_train, x_test, y_test, num_classes=num_classes, name="synthetic")


# ---------------------------------------------------------------------------------------- batching


def num_batches(n_examples: int, batch_size: int) -> int:
    """Full batches per epoch (the last partial batch is dropped).

    Args:
        n_examples: examples in the training set.
        batch_size: global batch size (positive).

    Returns:
        ``n_examples // batch_size``.
    """
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be positive, got {batch_size}.")
    return n_examples // batch_size


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled example order of one epoch, a pure function of ``(seed, epoch)``.

    Args:
        n: number of examples.
        seed: the run seed (0 or positive).
        epoch: the epoch index (0 or positive).

    Returns:
        A permutation of ``range(n)`` (int64).
    """
    if seed < 0 or epoch < 0:
        raise ConfigError(f"--seed must be 0 or positive, got {seed} (epoch {epoch}).")
    return np.random.default_rng(np.random.SeedSequence((seed, epoch))).permutation(n)


def batch_rows(ds: Dataset, batch_size: int, seed: int, start_step: int = 0) -> Iterator[np.ndarray]:
    """An endless stream of the training-example indices of each global batch, reshuffled every epoch.

    Step ``k`` is always the same batch for the same ``seed`` and ``batch_size``: it is batch
    ``k % nb`` of epoch ``k // nb`` (``nb`` full batches per epoch), so a resumed run passes its
    step count as ``start_step`` and continues at the same data position. Indices rather than
    examples, so that each process of a multi-process run can read only the rows its devices hold.

    Args:
        ds: the dataset; only the training split is used.
        batch_size: global batch size.
        seed: shuffling seed.
        start_step: the step of the first batch yielded.

    Returns:
        An iterator of int64 arrays of ``batch_size`` row indices into ``ds.x_train``.

    Raises:
        ConfigError: (at call time, not first ``next``) the training set is smaller than one batch,
            or ``start_step`` is negative.
    """
    n = len(ds.x_train)
    per_epoch = num_batches(n, batch_size)
    if per_epoch == 0:
        raise ConfigError(f"--batch-size {batch_size} is larger than the {n} training examples of {ds.name}.")
    if start_step < 0:
        raise ConfigError(f"start step must be 0 or positive, got {start_step}.")
    epoch_order(n, seed, 0)  # validates the seed eagerly

    def stream() -> Iterator[np.ndarray]:
        epoch, index = divmod(start_step, per_epoch)
        while True:
            order = epoch_order(n, seed, epoch)
            for i in range(index, per_epoch):
                yield order[i * batch_size : (i + 1) * batch_size]
            epoch, index = epoch + 1, 0

    return stream()


def train_batches(
    ds: Dataset, batch_size: int, seed: int, start_step: int = 0
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The global batches ``(x, y)`` of :func:`batch_rows` (same arguments, same errors)."""
    rows = batch_rows(ds, batch_size, seed, start_step)
    return ((ds.x_train[idx], ds.y_train[idx]) for idx in rows)


def eval_batches(x: np.ndarray, y: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The whole evaluation set in fixed-size batches, the last padded, with a mask of real examples.

    Every batch has exactly ``batch_size`` rows (so one compiled eval step serves them all); padded
    rows are zeros with label 0 and mask 0, so ``sum(mask * per_label_metric)`` counts every
    label exactly once.

    Args:
        x: inputs, leading axis = examples.
        y: labels, same length (one per example or one per token).
        batch_size: rows per batch (positive).

    Returns:
        An iterator of ``(x, y, mask)``; ``mask`` is float32 of the labels' shape, 1 for real rows.
    """
    if len(x) != len(y):
        raise ConfigError(f"eval inputs have {len(x)} examples but {len(y)} labels.")
    num_batches(len(x), batch_size)  # validates batch_size eagerly

    def stream() -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        for start in range(0, len(x), batch_size):
            xb, yb = x[start : start + batch_size], y[start : start + batch_size]
            real = len(xb)
            mask = np.zeros((batch_size, *y.shape[1:]), dtype=np.float32)
            mask[:real] = 1.0
            if real < batch_size:
                xb = np.concatenate([xb, np.zeros((batch_size - real, *x.shape[1:]), x.dtype)])
                yb = np.concatenate([yb, np.zeros((batch_size - real, *y.shape[1:]), y.dtype)])
            yield xb, yb, mask

    return stream()


def _text_loader(name: str) -> Callable[[DataConfig, int], Dataset]:
    """The loader ``name`` of :mod:`jaxmp.training.text`, imported when called (that module imports this one)."""

    def load(cfg: DataConfig, seed: int) -> Dataset:
        from jaxmp.training import text

        return getattr(text, name)(cfg, seed)

    return load


# --dataset: name -> loader of (data options, run seed).
DATASETS: dict[str, Callable[[DataConfig, int], Dataset]] = {
    "digits": lambda cfg, seed: load_digits(),
    "fashion-mnist": _load_idx,
    "mnist": _load_idx,
    "synthetic": _load_synthetic,
    "shakespeare": _text_loader("load_shakespeare"),
    "synthetic-text": _text_loader("load_synthetic_text"),
}
