"""
The dataset folder: how tokenized text is stored, written by prepare.py and read by everything else.

    data/<name>/
      tokenizer.model   the tiktoken file the ids come from
      meta.json         what the folder holds (below)
      train.bin         the training split, raw ids (uint16 if the vocabulary fits, else uint32)
      val.bin           the validation split (optional)

- Two layouts. `packed`: each split is one stream of documents, each `<|begin_of_text|> ...
  <|end_of_text|>`, for pretraining in windows with document masking. `examples`: each split is rows
  [N, L] of BOS + L-1 tokens cut from one document, for the memorization study, where an example is
  the unit that is memorized or not.
- meta.json: `layout`, `dtype`, `vocab_size`, `tokenizer_sha256`, `bos_id`, `eos_id`, `example_len`
  (examples), and per split its `tokens`, `documents` and `examples`; prepare.py adds where the data
  came from and a fingerprint of its settings.
- A folder is written whole or not at all; a split is read as a memory map, so a million examples
  cost no memory until a batch is read.
- The memorization study measures each distinct example once, however often it was planted in the
  data (`distinct_examples`). Runs of n tokens are looked up in the rows by hash: the extraction
  attack's samples (`NgramIndex`) and how often each example's suffix occurs (`window_counts`).
"""

import json
import os
import shutil

import numpy as np

from config import UserError, atomic_path
from tokenizer import Tokenizer

INFO_KEYS = ("layout", "dtype", "vocab_size", "tokenizer_sha256", "bos_id", "splits")


def write_dataset(out_dir, tokenizer_path, splits, layout, info_extra=None):
    """Write `tokenizer.model`, `<split>.bin` and `meta.json` into `out_dir`, whole or not at all.

    `splits` maps a split name to its tokens: a flat array (layout "packed") or rows [N, L]
    ("examples"). `info_extra` adds keys to meta.json; its "splits" entries are merged per split.
    Returns the meta.json written, as a dict."""
    tok = Tokenizer(tokenizer_path)
    dtype = "uint16" if tok.n_words <= 65536 else "uint32"  # Llama 3's 128k vocabulary needs 32 bits
    info = {"layout": layout, "dtype": dtype, "vocab_size": tok.n_words, "tokenizer_sha256": tok.sha256,
            "bos_id": tok.bos_id, "eos_id": tok.eos_id, "splits": {}}
    splits = {split: np.asarray(array) for split, array in splits.items()}
    for split, array in splits.items():
        in_vocab = array.size == 0 or (array.min() >= 0 and array.max() < tok.n_words)
        if array.ndim != (2 if layout == "examples" else 1) or not in_vocab:
            raise ValueError(f"split {split!r} (shape {array.shape}) is not {layout} ids below {tok.n_words}")
        info["splits"][split] = {"tokens": array.size,
                                 "documents": int((array == tok.bos_id).sum()) if layout == "packed" else None,
                                 "examples": len(array) if layout == "examples" else None}
        if layout == "examples":
            info["example_len"] = array.shape[1]
    for key, value in (info_extra or {}).items():
        if key == "splits":
            for split, extra in value.items():
                info["splits"][split].update(extra)
        else:
            info[key] = value
    with atomic_path(out_dir) as tmp:  # readers never see half a dataset
        os.makedirs(tmp)
        shutil.copyfile(tokenizer_path, os.path.join(tmp, "tokenizer.model"))
        for split, array in splits.items():
            np.ascontiguousarray(array, dtype=dtype).tofile(os.path.join(tmp, f"{split}.bin"))
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            f.write(json.dumps(info, indent=2) + "\n")
    return info


def read_info(data_dir):
    """The dataset's meta.json as a dict; UserError if it is missing or damaged."""
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(path):
        raise UserError(f"{data_dir} is not a prepared dataset (no meta.json); run prepare.py first")
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); run prepare.py again to rewrite the dataset") from None
    missing = [k for k in INFO_KEYS if k not in info] if isinstance(info, dict) else list(INFO_KEYS)
    if missing or info["dtype"] not in ("uint16", "uint32") or info["layout"] not in ("packed", "examples"):
        raise UserError(f"{path} is not a meta.json written by prepare.py (missing or unknown: "
                        f"{', '.join(missing) or 'dtype or layout'}); run prepare.py again to rewrite the dataset")
    return info


def open_split(data_dir, split):
    """A read-only memory map of a split: shape [N, L] (examples) or [n_tokens] (packed)."""
    info = read_info(data_dir)
    path = os.path.join(data_dir, f"{split}.bin")
    counts = info["splits"].get(split)
    if counts is None or not os.path.isfile(path):
        raise UserError(f"{data_dir} has no {split!r} split; rerun prepare.py")
    if counts["tokens"] == 0 and split == "val":
        why = "its documents are shorter than an example" if counts.get("documents") else "--val_fraction=0"
        raise UserError(f"{data_dir} has no validation data ({why}); prepare it again with a larger "
                        "--val_fraction (e.g. 0.1)")
    if counts["tokens"] == 0:
        raise UserError(f"the {split!r} split of {data_dir} is empty; prepare it with more data")
    if os.path.getsize(path) != counts["tokens"] * np.dtype(info["dtype"]).itemsize:
        raise UserError(f"{path} does not match meta.json (truncated or changed?); rerun prepare.py")
    shape = (counts["tokens"],)
    if info["layout"] == "examples":
        shape = (counts["tokens"] // info["example_len"], info["example_len"])
    return np.memmap(path, dtype=info["dtype"], mode="r", shape=shape)


def distinct_examples(rows):
    """(first, copies, group) for example rows [N, L]: the row index of each distinct example's first
    occurrence, in row order; how many rows hold it; and for each row, the position in `first` of
    its example. The memorization study measures each example once, however often it was planted
    (prepare.py --repeats)."""
    _, first, inverse, copies = np.unique(np.asarray(rows), axis=0, return_index=True, return_inverse=True,
                                          return_counts=True)
    order = np.argsort(first)
    position = np.empty_like(order)
    position[order] = np.arange(len(order))
    return first[order], copies[order], position[inverse.ravel()]


def window_hashes(rows, n):
    """(M, T) tokens -> (M, T - n + 1) uint64 hashes of every n-token window: sum_j token_j * c_j mod 2^64
    with fixed random odd c_j (uint64 arithmetic wraps). Distinct windows collide with negligible
    probability, so equal hashes are taken as equal windows."""
    coef = np.random.default_rng(20210609).integers(1, 2**63, size=n, dtype=np.uint64) | np.uint64(1)
    windows = np.lib.stride_tricks.sliding_window_view(np.asarray(rows).astype(np.uint64), n, axis=1)
    return (windows * coef).sum(-1, dtype=np.uint64)


def find_hashes(table, h):
    """(position, found) of each hash h in the sorted array table: where it is, and whether it is there."""
    if len(table) == 0:
        return np.zeros(h.shape, dtype=np.int64), np.zeros(h.shape, dtype=bool)
    pos = np.minimum(np.searchsorted(table, h), len(table) - 1)
    return pos, table[pos] == h


class NgramIndex:
    """The set of every n-token window inside the rows [N, L] (windows do not cross rows), as one
    sorted array of hashes: 8 bytes per window, N * (L - n + 1) windows (1.6 GB for a million
    256-token rows and n = 50, two to three times that while sorting)."""

    def __init__(self, rows, n, chunk_rows=256):
        self.n = n
        parts = [np.unique(window_hashes(rows[i:i + chunk_rows], n))
                 for i in range(0, len(rows) if rows.shape[1] >= n else 0, chunk_rows)]
        self.table = np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.uint64)

    def contains(self, samples):
        """bool (M,): whether each sample (M, T) holds a window of the rows of n tokens or more."""
        samples = np.asarray(samples)
        if samples.shape[1] < self.n:
            return np.zeros(len(samples), dtype=bool)
        return find_hashes(self.table, window_hashes(samples, self.n))[1].any(1)


def window_counts(rows, windows, chunk_rows=256):
    """int (M,): how many times each window (M, n) occurs inside the rows [N, L], at any position
    (not across rows), the rows read a chunk at a time: memory grows with M, not with the rows."""
    n = windows.shape[1]
    wanted, where = np.unique(window_hashes(windows, n)[:, 0], return_inverse=True)
    counts = np.zeros(len(wanted), dtype=np.int64)
    for i in range(0, len(rows) if rows.shape[1] >= n else 0, chunk_rows):
        pos, found = find_hashes(wanted, window_hashes(rows[i:i + chunk_rows], n).ravel())
        counts += np.bincount(pos[found], minlength=len(wanted))
    return counts[where.ravel()]
