"""
The Llama 3 tokenizer: byte-level BPE on tiktoken, and a small trainer for files in the same format.

- Loads a tiktoken-format file (`base64(token_bytes) rank` per line); Meta's `tokenizer.model` is one.
- Llama 3's pre-tokenization regex and its 256 special tokens, placed right after the BPE ranks
  (so with Meta's 128,000 ranks: <|begin_of_text|> = 128000, <|eot_id|> = 128009).
- `encode` treats special-token text inside user text as ordinary text: a document that contains
  the string "<|eot_id|>" cannot end a turn.
- The Llama 3 chat format: a header per message, content, <|eot_id|>; prompts end with an assistant
  header for the model to complete.
- `train_bpe` learns a small byte-level BPE from a corpus (the offline default for small models),
  with incremental pair counts so that each merge only touches the words that contain the pair.
"""

import base64
import hashlib
import heapq
import os
from collections import Counter, defaultdict

import regex
import tiktoken
from config import UserError, atomic_path, progress_bar

# Llama 3's split regex (Meta's reference): English contractions, words with one optional leading
# non-letter, numbers of at most 3 digits, punctuation runs, and whitespace. BPE never merges
# across these pieces.
PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_SPECIAL_TOKENS = 256
# The named special tokens of Llama 3.1, in id order; reserved tokens fill the rest of the 256.
NAMED_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",  # end of message (a tool call follows)
    "<|eot_id|>",  # end of turn
    "<|python_tag|>",
]
SPECIAL_TOKENS = NAMED_SPECIAL_TOKENS + [
    f"<|reserved_special_token_{i}|>" for i in range(2, 2 + NUM_SPECIAL_TOKENS - len(NAMED_SPECIAL_TOKENS))
]
# tiktoken can panic on very long inputs and its regex is slow on very long runs of (non-)whitespace,
# so, like Meta's reference, encode splits text into bounded pieces first.
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000


def read_bpe_file(path):
    """Read a tiktoken BPE file into {token_bytes: rank}; UserError if it is missing or malformed."""
    if not os.path.isfile(path):
        raise UserError(f"tokenizer file {path!r} does not exist; pass the path of a tiktoken tokenizer.model")
    ranks = {}
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token_b64, rank = line.split()
                ranks[base64.b64decode(token_b64, validate=True)] = int(rank)
            except ValueError:
                raise UserError(f"{path} line {line_no} is not `base64-token rank`; "
                                "pass a tiktoken-format tokenizer.model") from None
    # Special tokens go right after the ranks, so the ranks must be exactly 0..n-1, and tiktoken
    # builds every token from single bytes, so all 256 must be there for any text to be encodable.
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise UserError(f"{path} does not hold distinct ranks 0..n-1; pass a tiktoken-format tokenizer.model")
    if any(bytes([b]) not in ranks for b in range(256)):
        raise UserError(f"{path} lacks some of the 256 single-byte tokens; pass a complete byte-level BPE file")
    return ranks


class Tokenizer:
    """Llama 3's tokenizer over a tiktoken BPE file: `encode`, `decode` and the chat format."""

    def __init__(self, path):
        mergeable_ranks = read_bpe_file(path)
        with open(path, "rb") as f:
            self.sha256 = hashlib.sha256(f.read()).hexdigest()
        self.path = path
        n_base = len(mergeable_ranks)
        self.special_tokens = {tok: n_base + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self.model = tiktoken.Encoding(
            name=os.path.basename(path),
            pat_str=PAT_STR,
            mergeable_ranks=mergeable_ranks,
            special_tokens=self.special_tokens,
        )
        self.n_words = self.model.n_vocab  # BPE ranks + 256 special tokens
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.eot_id = self.special_tokens["<|eot_id|>"]
        self.stop_tokens = {self.eos_id, self.special_tokens["<|eom_id|>"], self.eot_id}

    def encode(self, text, bos=False, eos=False):
        """Token ids of `text`; special-token text inside it is encoded as ordinary text."""
        ids = [self.bos_id] if bos else []
        for i in range(0, len(text), MAX_ENCODE_CHARS):
            for piece in _split_long_runs(text[i : i + MAX_ENCODE_CHARS], MAX_RUN_CHARS):
                ids.extend(self.model.encode_ordinary(piece))
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids):
        """The text of token ids (special tokens as their text; invalid UTF-8 becomes U+FFFD)."""
        return self.model.decode([int(i) for i in ids])

    # -- chat format (Llama 3 model card: header, content, end of turn) --

    def encode_header(self, role):
        """`<|start_header_id|>role<|end_header_id|>` followed by a blank line."""
        return [self.special_tokens["<|start_header_id|>"], *self.encode(role),
                self.special_tokens["<|end_header_id|>"], *self.encode("\n\n")]

    def encode_message(self, message):
        """One message `{"role": ..., "content": ...}`: header, stripped content, <|eot_id|>."""
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise UserError(f"a chat message is a dict with string 'role' and 'content', not {message!r}")
        return self.encode_header(message["role"]) + self.encode(message["content"].strip()) + [self.eot_id]

    def encode_dialog_prompt(self, messages):
        """<|begin_of_text|>, every message, then an empty assistant header for the model to complete."""
        ids = [self.bos_id]
        for message in messages:
            ids.extend(self.encode_message(message))
        return ids + self.encode_header("assistant")


def _split_long_runs(text, max_run):
    """Split `text` so that no piece holds more than `max_run` consecutive (non-)whitespace chars."""
    start, run, run_is_space = 0, 0, None
    for i, ch in enumerate(text):
        is_space = ch.isspace()
        run = run + 1 if is_space == run_is_space else 1
        run_is_space = is_space
        if run > max_run:
            yield text[start:i]
            start, run = i, 1
    yield text[start:]


# ---------------------------------------------------------------------------------------------
# Training a byte-level BPE (Sennrich et al., 2016, on bytes as in GPT-2) in tiktoken's format.


def _merge_word(word, a, b, new_id):
    """`word` with every adjacent (a, b) replaced by new_id, scanning left to right."""
    out, i, n = [], 0, len(word)
    while i < n:
        if i + 1 < n and word[i] == a and word[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def train_bpe(text_iter, vocab_size, path, progress=True):
    """Learn `vocab_size - 256` BPE ranks from the texts in `text_iter`, write them to `path`.

    Ranks 0..255 are the single bytes (so every byte string is encodable), then one rank per merge
    in the order learned: tiktoken applies merges by rank, so rank order must be merge order.
    Returns the `Tokenizer` of the written file.
    """
    n_ranks = vocab_size - NUM_SPECIAL_TOKENS
    if n_ranks < 256:
        raise UserError(f"vocab_size {vocab_size} leaves no room for the 256 bytes and 256 special tokens; "
                        "use at least 512")
    # 1. Pre-tokenize with Llama 3's regex and count unique pieces ("words"): merges stay inside words.
    split = regex.compile(PAT_STR)
    word_counts = Counter()
    for text in text_iter:
        word_counts.update(split.findall(text))
    words = [list(w.encode("utf-8")) for w in word_counts]
    freqs = list(word_counts.values())

    # 2. Count adjacent pairs, weighted by word frequency, and remember which words hold each pair.
    pair_counts, pair_words = defaultdict(int), defaultdict(set)
    for i, word in enumerate(words):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += freqs[i]
            pair_words[pair].add(i)
    # A max-heap of (-count, pair); entries go stale when counts change and are skipped when popped.
    # Ties go to the smallest pair ids, so training is deterministic.
    heap = [(-c, p) for p, c in pair_counts.items()]
    heapq.heapify(heap)

    # 3. Merge the most frequent pair, n_ranks - 256 times, updating only the words that hold it.
    vocab = [bytes([b]) for b in range(256)]
    rank_of = {tok: r for r, tok in enumerate(vocab)}
    bar = progress_bar(total=n_ranks - 256, desc="training BPE", unit="merge", disable=not progress)
    while len(vocab) < n_ranks:
        if not heap:
            bar.close()
            raise UserError(f"the training text only supports {len(vocab)} BPE ranks, fewer than the "
                            f"{n_ranks} that vocab_size {vocab_size} needs; use more text or a smaller vocab_size")
        neg_count, (a, b) = heapq.heappop(heap)
        if pair_counts.get((a, b)) != -neg_count:
            continue  # stale heap entry
        token = vocab[a] + vocab[b]
        # The same bytes can arise from two different pairs ("a"+"bc", "ab"+"c"); tiktoken needs
        # unique tokens, so such a merge reuses the existing id instead of adding a rank.
        new_id = rank_of.get(token)
        if new_id is None:
            new_id = rank_of[token] = len(vocab)
            vocab.append(token)
            bar.update()
        touched = set()
        for i in pair_words.pop((a, b), ()):
            old = words[i]
            new = _merge_word(old, a, b, new_id)
            if len(new) == len(old):
                continue  # the pair left this word in an earlier merge
            for pair in zip(old, old[1:]):
                pair_counts[pair] -= freqs[i]
                touched.add(pair)
            for pair in zip(new, new[1:]):
                pair_counts[pair] += freqs[i]
                pair_words[pair].add(i)
                touched.add(pair)
            words[i] = new
        for pair in touched:
            if pair_counts[pair] > 0:
                heapq.heappush(heap, (-pair_counts[pair], pair))
            else:
                del pair_counts[pair]
    bar.close()

    # 4. Write `base64(token) rank` lines, whole or not at all.
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for rank, token in enumerate(vocab):
            f.write(base64.b64encode(token) + b" " + str(rank).encode() + b"\n")
    return Tokenizer(path)
