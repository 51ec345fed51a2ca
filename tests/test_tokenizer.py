"""Specification of tokenizer.py: Meta's ids, special tokens as plain text, the chat format, BPE training."""

import base64
import os
import random
from collections import Counter

import pytest
import regex
import tiktoken

from config import UserError
from tokenizer import PAT_STR, SPECIAL_TOKENS, Tokenizer, read_bpe_file, train_bpe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
META_TOKENIZER = os.path.join(ROOT, "..", "shared", "llama3", "tokenizer.model")


def make_corpus(n_docs=20, words_per_doc=400, seed=0):
    """Documents of made-up English-like words (a fixed syllable set), so BPE has structure to find."""
    rng = random.Random(seed)
    syllables = ["an", "ber", "cor", "da", "el", "fin", "gor", "ha", "is", "jo", "ka", "lum", "mor", "ne", "or"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(300)]
    docs = []
    for _ in range(n_docs):
        sentences = [" ".join(rng.choices(words, k=rng.randint(4, 12))).capitalize() + rng.choice(".!?")
                     for _ in range(words_per_doc // 8)]
        docs.append("\n".join(sentences) + "\n")
    return docs


@pytest.fixture(scope="module")
def meta_tok():
    if not os.path.isfile(META_TOKENIZER):
        pytest.skip("Meta's tokenizer.model is absent")
    return Tokenizer(META_TOKENIZER)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.model"
    docs = make_corpus()
    return train_bpe(docs, 800, str(path), progress=False), docs


# --- Meta's tokenizer.model: the official ids ---


def test_official_ids_of_a_sentence_with_bos_and_eos(meta_tok):
    tok = meta_tok  # Meta's tokenizer.model
    ids = tok.encode("This is a test sentence.", bos=True, eos=True)
    assert ids == [128000, 2028, 374, 264, 1296, 11914, 13, 128001]


def test_official_ids_of_a_user_message(meta_tok):
    tok = meta_tok  # Meta's tokenizer.model
    ids = tok.encode_message({"role": "user", "content": "This is a test sentence."})
    assert ids == [128006, 882, 128007, 271, 2028, 374, 264, 1296, 11914, 13, 128009]


def test_official_special_token_ids(meta_tok):
    tok = meta_tok  # Meta's tokenizer.model
    assert tok.n_words == 128256
    assert (tok.bos_id, tok.eos_id, tok.eot_id) == (128000, 128001, 128009)
    assert tok.special_tokens["<|start_header_id|>"] == 128006
    assert tok.special_tokens["<|end_header_id|>"] == 128007
    assert tok.special_tokens["<|python_tag|>"] == 128010
    assert tok.special_tokens["<|reserved_special_token_246|>"] == 128255
    assert tok.stop_tokens == {128001, 128008, 128009}
    assert tok.sha256 == "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55"


def test_special_token_text_in_user_text_is_ordinary_text_with_meta_ids(meta_tok):
    tok = meta_tok  # Meta's tokenizer.model
    ids = tok.encode("a <|eot_id|> b <|begin_of_text|>")
    assert not set(ids) & set(tok.special_tokens.values())
    assert tok.decode(ids) == "a <|eot_id|> b <|begin_of_text|>"


# --- a trained tokenizer ---


def test_special_tokens_follow_the_bpe_ranks(trained):
    tok, _ = trained
    assert len(SPECIAL_TOKENS) == 256 and len(set(SPECIAL_TOKENS)) == 256
    assert tok.n_words == 800
    assert tok.bos_id == 800 - 256 and tok.eos_id == 800 - 255 and tok.eot_id == 800 - 247
    assert tok.special_tokens["<|start_header_id|>"] == 800 - 250
    assert sorted(tok.special_tokens.values()) == list(range(544, 800))


def test_special_token_text_in_user_text_is_ordinary_text(trained):
    tok, _ = trained
    text = "<|begin_of_text|>hello<|eot_id|><|reserved_special_token_7|>"
    ids = tok.encode(text)
    assert all(i < tok.bos_id for i in ids)
    assert tok.decode(ids) == text


def test_round_trip_of_unicode_and_bytes_never_seen_in_training(trained):
    tok, _ = trained
    texts = ["Grüße aus Köln — 東京 🙂🚀", "\x00\x01\x7f tabs\t\tand\r\nnewlines\n\n\n", "   ", "",
             "x" * 30000 + " " * 30000 + "y", "'s 'LL 12345 3.14159 ¿qué?"]
    rng = random.Random(0)  # and random code points from all over Unicode (surrogates excluded)
    texts += ["".join(chr(rng.choice([rng.randrange(0xD800), rng.randrange(0xE000, 0x110000)]))
                      for _ in range(200)) for _ in range(20)]
    for text in texts:
        ids = tok.encode(text, bos=True, eos=True)
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        assert tok.decode(ids[1:-1]) == text


def test_trained_bpe_compresses_unseen_text_of_the_same_kind(trained):
    tok, _ = trained
    held_out = "".join(make_corpus(n_docs=3, seed=1))
    assert len(tok.encode(held_out)) < len(held_out.encode("utf-8")) / 2


def test_trained_file_is_tiktoken_format_with_bytes_first_and_merges_in_order(trained):
    tok, _ = trained
    with open(tok.path, "rb") as f:
        lines = f.read().splitlines()
    assert len(lines) == 800 - 256
    tokens = [base64.b64decode(line.split()[0]) for line in lines]
    assert [int(line.split()[1]) for line in lines] == list(range(len(lines)))
    assert tokens[:256] == [bytes([b]) for b in range(256)]
    assert len(set(tokens)) == len(tokens)
    # Merge order: every token past the bytes is made of two tokens of lower rank.
    rank = {t: r for r, t in enumerate(tokens)}
    for r, t in enumerate(tokens[256:], 256):
        assert any(rank.get(t[:k], r) < r and rank.get(t[k:], r) < r for k in range(1, len(t)))
    # tiktoken itself loads it.
    enc = tiktoken.Encoding("t", pat_str=PAT_STR, mergeable_ranks=read_bpe_file(tok.path), special_tokens={})
    assert enc.decode(enc.encode("lumcor is an elha")) == "lumcor is an elha"


def naive_bpe(docs, n_merges):
    """Reference BPE: recount every pair before each merge (ties to the smallest pair ids)."""
    words = Counter(w for d in docs for w in regex.findall(PAT_STR, d))
    seqs = {w: list(w.encode()) for w in words}
    vocab = [bytes([b]) for b in range(256)]
    while len(vocab) < 256 + n_merges:
        pairs = Counter()
        for w, s in seqs.items():
            for p in zip(s, s[1:]):
                pairs[p] += words[w]
        (a, b), _ = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        token = vocab[a] + vocab[b]
        new = vocab.index(token) if token in vocab else len(vocab)
        if new == len(vocab):
            vocab.append(token)
        for w, s in seqs.items():
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == (a, b):
                    out.append(new)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[w] = out
    return vocab


def test_incremental_training_learns_the_same_merges_as_recounting(tmp_path):
    docs = make_corpus(n_docs=4, words_per_doc=200, seed=2)
    tok = train_bpe(docs, 512 + 120, str(tmp_path / "t.model"), progress=False)
    ranks = read_bpe_file(tok.path)
    assert sorted(ranks, key=ranks.get) == naive_bpe(docs, 120)


def test_training_is_deterministic(tmp_path, trained):
    tok, docs = trained
    again = train_bpe(docs, 800, str(tmp_path / "again.model"), progress=False)
    assert again.sha256 == tok.sha256


# --- the chat format ---


def test_dialog_prompt_is_llama3_chat_format_ending_with_an_assistant_header(trained):
    tok, _ = trained
    messages = [{"role": "system", "content": "  Be brief. "}, {"role": "user", "content": "Who is there?\n"}]
    ids = tok.encode_dialog_prompt(messages)
    assert ids[0] == tok.bos_id
    assert tok.decode(ids) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWho is there?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert ids.count(tok.eot_id) == 2 and ids.count(tok.special_tokens["<|start_header_id|>"]) == 3


def test_stop_tokens_are_end_of_text_eom_and_eot(trained):
    tok, _ = trained
    assert tok.stop_tokens == {tok.eos_id, tok.special_tokens["<|eom_id|>"], tok.eot_id}


def test_a_malformed_message_is_a_user_error(trained):
    tok, _ = trained
    with pytest.raises(UserError, match="role"):
        tok.encode_dialog_prompt([{"content": "no role"}])


# --- errors ---


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        Tokenizer(str(tmp_path / "nope.model"))


@pytest.mark.parametrize("content, message", [
    (b"this is not base64!! 0\n", "base64-token rank"),
    (b"YQ== zero\n", "base64-token rank"),
    (b"".join(base64.b64encode(bytes([b])) + b" %d\n" % (b + 1) for b in range(256)), "ranks 0..n-1"),
    (b"".join(base64.b64encode(bytes([b])) + b" %d\n" % b for b in range(255)), "single-byte"),
])
def test_malformed_file_is_a_user_error(tmp_path, content, message):
    path = tmp_path / "bad.model"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        Tokenizer(str(path))


def test_too_little_text_for_the_vocabulary_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="smaller vocab_size"):
        train_bpe(["ab ab"], 4096, str(tmp_path / "t.model"), progress=False)
    with pytest.raises(UserError, match="at least 512"):
        train_bpe(["ab ab"], 300, str(tmp_path / "t.model"), progress=False)
