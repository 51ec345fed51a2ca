"""data.py: the dataset folder is written whole or not at all, read back as written, refused in one
sentence when missing or damaged; distinct examples are found however often they were planted."""

import numpy as np
import pytest

from config import UserError
from data import NgramIndex, distinct_examples, open_split, read_info, window_counts, write_dataset
from test_prepare import make_docs, prepare_run, write_txt


def test_write_dataset_and_open_split_round_trip(tmp_path):
    tokenizer = tmp_path / "data" / "ds" / "tokenizer.model"
    prepare_run(tmp_path, write_txt(tmp_path / "in", make_docs(4)))
    rows = np.arange(5 * 8).reshape(5, 8) % 500
    splits = {"train": rows, "val": rows[:2]}
    meta = write_dataset(tmp_path / "gen", tokenizer, splits, "examples", {"source": "x"})
    assert meta["source"] == "x" and meta["example_len"] == 8 and meta["splits"]["train"]["examples"] == 5
    split = open_split(tmp_path / "gen", "train")
    assert split.shape == (5, 8) and split.dtype == np.uint16 and (split == rows).all()
    with pytest.raises(ValueError, match="ids below 600"):
        write_dataset(tmp_path / "gen", tokenizer, {"train": rows + 600}, "examples")
    assert (open_split(tmp_path / "gen", "train") == rows).all()  # the failed write left it intact


def test_reading_a_missing_or_damaged_dataset_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no meta.json"):
        read_info(tmp_path / "nothing")
    prepare_run(tmp_path, write_txt(tmp_path / "in", make_docs(4)), "--val_fraction=0")
    out = tmp_path / "data" / "ds"
    with pytest.raises(UserError, match=r"no validation data \(--val_fraction=0\); .* larger --val_fraction"):
        open_split(out, "val")
    with pytest.raises(UserError, match="no 'test' split"):
        open_split(out, "test")
    with open(out / "train.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(UserError, match="does not match meta.json"):
        open_split(out, "train")


def test_distinct_examples_are_the_first_copies_in_row_order_with_their_counts_and_groups():
    rows = np.array([[5, 1], [7, 2], [5, 1], [9, 9], [7, 2], [5, 1]])
    first, copies, group = distinct_examples(rows)
    assert first.tolist() == [0, 1, 3] and copies.tolist() == [3, 2, 1]
    assert group.tolist() == [0, 1, 0, 2, 1, 0]  # each row's example, as a position in first
    assert (rows[first][group] == rows).all()


def test_ngram_index_finds_planted_windows_and_not_absent_ones():
    rng = np.random.default_rng(4)
    train = rng.integers(0, 100_000, (20, 30)).astype(np.uint32)
    index = NgramIndex(train, 8, chunk_rows=3)
    noise = lambda n: rng.integers(0, 100_000, n)  # noqa: E731
    samples = np.stack([
        np.r_[noise(5), train[3, 10:18], noise(7)],  # a whole training window
        np.r_[noise(5), train[7, 0:12], noise(3)],   # a longer one, from the row's start
        np.r_[noise(5), train[7, 22:30], noise(7)],  # the last window of a row
        np.r_[noise(5), train[3, 10:17], noise(8)],  # 7 tokens only
        np.r_[train[3, 25:30], train[4, 0:3], noise(12)],  # across two rows: not a training window
        noise(20),
    ])
    assert index.contains(samples).tolist() == [True, True, True, False, False, False]


def test_window_counts_count_every_occurrence_in_any_row_and_chunk_but_none_across_rows():
    rng = np.random.default_rng(5)
    train = rng.integers(0, 100_000, (10, 30)).astype(np.uint32)
    train[6] = train[2]                  # a copied row, in another chunk
    train[8, 4:12] = train[2, 15:23]     # the same 8 tokens inside another row, at another position
    train[3, 26:30] = train[2, 15:19]    # half of it at the end of a row, the rest starting the next:
    train[4, 0:4] = train[2, 19:23]      # not a window of the rows
    windows = np.stack([train[2, 15:23], train[2, 0:8], train[5, 3:11], rng.integers(0, 100_000, 8),
                        train[2, 15:23]])  # the first window again
    assert window_counts(train, windows, chunk_rows=3).tolist() == [3, 2, 1, 0, 3]
