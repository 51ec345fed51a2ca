# %% [markdown]
# # 1. The tokenizer: from text to Llama 3's token ids
#
# A language model reads integers, not text. Llama 3 turns text into integers in three steps:
#
# 1. **split** the text into pieces with a regular expression (words, numbers, punctuation, spaces),
# 2. turn each piece into its **UTF-8 bytes** (so any text at all can be written: 256 symbols),
# 3. **merge** adjacent symbols, most frequent pairs first (byte-pair encoding, BPE), into tokens.
#
# Then 256 **special tokens** (`<|begin_of_text|>`, `<|eot_id|>`, ...) are added after the BPE tokens,
# and the **chat format** strings messages together with them.
#
# In this chapter we build each step in a few lines and check it against the project's
# `tokenizer.py` (which wraps OpenAI's `tiktoken`, as Meta's reference does). Run it with
# `python walkthroughs/01_tokenizer.py`; it takes a few seconds.

# %%
import lesson  # first: it puts the project's files (model.py, train.py, ...) on the path

import collections
import os

import regex
import tiktoken

from tokenizer import NUM_SPECIAL_TOKENS, PAT_STR, SPECIAL_TOKENS, Tokenizer, read_bpe_file, train_bpe

check = lesson.Checks("01")

# %% [markdown]
# ## Step 1: the split regex
#
# BPE never merges across the pieces this regex cuts. Its alternatives, in order: English
# contractions (`'s`, `'re`, ...), a word with at most one leading non-letter (so " the" keeps its
# space), numbers of **at most three digits** (so 2024 is "202" + "4": numbers get a regular
# structure), punctuation runs, and whitespace.

# %%
text = "Llama 3's tokenizer, in 2024: 128,000 tokens!\n\nROMEO: But, soft!"
pieces = regex.findall(PAT_STR, text)
print(pieces)
check("the pieces put back together are the text", "".join(pieces) == text)
check("a number is cut into pieces of at most 3 digits", "202" in pieces and "4" in pieces and "128" in pieces)
check("a word keeps the space before it", " tokenizer" in pieces)

# %% [markdown]
# ## Step 2 and 3: bytes, then merges learned from a corpus
#
# We learn merges from a small text. Each piece becomes a list of byte values (0-255). Then, again
# and again: count every adjacent pair of symbols over the corpus (each piece weighted by how often
# it occurs), and give the most frequent pair a new id. A tie goes to the smallest pair, so training
# is deterministic. The merges' order is their **rank**: when encoding, lower ranks merge first.

# %%
corpus = """\
ROMEO: But, soft! what light through yonder window breaks?
It is the east, and Juliet is the sun.
Arise, fair sun, and kill the envious moon,
Who is already sick and pale with grief,
That thou her maid art far more fair than she.
JULIET: O Romeo, Romeo! wherefore art thou Romeo?
Deny thy father and refuse thy name;
Or, if thou wilt not, be but sworn my love,
And I'll no longer be a Capulet.
""" * 3


def learn_merges(text, n_merges):
    """The BPE merges, in rank order: [((a, b), new_id), ...] over byte ids 0..255."""
    words = collections.Counter(regex.findall(PAT_STR, text))
    symbols = {w: list(w.encode("utf-8")) for w in words}
    merges = []
    for new_id in range(256, 256 + n_merges):
        pairs = collections.Counter()
        for w, count in words.items():
            for pair in zip(symbols[w], symbols[w][1:]):
                pairs[pair] += count
        best = min(pairs, key=lambda p: (-pairs[p], p))  # most frequent; ties to the smallest pair
        merges.append((best, new_id))
        for w in words:  # replace every occurrence of the pair, left to right
            s, out, i = symbols[w], [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            symbols[w] = out
    return merges


merges = learn_merges(corpus, 60)
vocab = {i: bytes([i]) for i in range(256)}
for (a, b), new_id in merges:
    vocab[new_id] = vocab[a] + vocab[b]
print("the first ten merges:", [vocab[new_id].decode() for _, new_id in merges[:10]])

# %% [markdown]
# The project's `train_bpe` learns the same merges (it keeps pair counts up to date incrementally
# instead of recounting, which is what makes a 4,096-token vocabulary on all of Shakespeare take
# seconds), and writes them in tiktoken's file format: one `base64(token bytes) rank` per line.

# %%
os.makedirs(lesson.SCRATCH, exist_ok=True)
path = os.path.join(lesson.SCRATCH, "01_tokenizer.model")
tok = train_bpe([corpus], 256 + 60 + NUM_SPECIAL_TOKENS, path, progress=False)
ranks = read_bpe_file(path)  # {token bytes: rank}, as tiktoken reads the file
# (One difference, which this corpus never meets: when two different pairs spell the same bytes,
# train_bpe gives the second the first's id instead of a new one; tiktoken needs each token once.)
check("train_bpe learns the same 60 merges, in the same order",
      [ranks[vocab[new_id]] for _, new_id in merges] == list(range(256, 316)))

# %% [markdown]
# ## Encoding with the merges
#
# To encode a piece: start from its bytes and repeatedly merge the adjacent pair with the lowest
# rank, until no learned pair is left. Pieces are encoded independently.

# %%
rank_of = {pair: new_id for pair, new_id in merges}  # here a token's id is its rank


def encode(text):
    ids = []
    for piece in regex.findall(PAT_STR, text):
        s = list(piece.encode("utf-8"))
        while len(s) > 1:
            pair = min(zip(s, s[1:]), key=lambda p: rank_of.get(p, float("inf")))
            if pair not in rank_of:
                break
            i = next(i for i in range(len(s) - 1) if (s[i], s[i + 1]) == pair)
            s = s[:i] + [rank_of[pair]] + s[i + 2:]
        ids += s
    return ids


for sample in ["Romeo, Romeo! wherefore art thou Romeo?", "A tokenizer sees bytes: naïve café, 2024."]:
    ours = encode(sample)
    print(len(sample.encode()), "bytes ->", len(ours), "tokens:", [vocab[i].decode(errors="replace") for i in ours])
    check(f"our ids equal tokenizer.py's for {sample[:20]!r}...", ours == tok.encode(sample))
    plain = tiktoken.Encoding("plain", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens={})
    check("... and plain tiktoken's on the same file", ours == plain.encode(sample))
    check("... and decoding gives the text back", tok.decode(ours) == sample)

# %% [markdown]
# In the second sample, `ï` and `é` are two bytes each. No merge of ours joins them, so each byte is
# a token of its own, and a lone byte of a two-byte character is not valid UTF-8 (printed `�`):
# byte-level BPE can write any text, and spends more tokens on what its corpus did not contain.
#
# A picture of what merges buy: how many tokens the corpus takes as merges are added. Each merge
# saves as many tokens as its pair occurred; the first merges save the most.

# %%
import matplotlib.pyplot as plt  # noqa: E402

counts = []
for n in range(0, 61, 5):
    rank_of = {pair: new_id for pair, new_id in merges[:n]}
    counts.append(len(encode(corpus)))
fig, ax = plt.subplots(figsize=(5, 3))
ax.plot(range(0, 61, 5), counts, marker="o")
ax.set(xlabel="merges learned", ylabel="tokens for the corpus", title="BPE: fewer tokens with every merge")
lesson.save_figure(fig, "01_merges")
check("every batch of merges shortens the corpus", all(a > b for a, b in zip(counts, counts[1:])))
rank_of = {pair: new_id for pair, new_id in merges}

# %% [markdown]
# ## Special tokens
#
# Llama 3 reserves 256 ids right after the BPE ranks for special tokens. With Meta's 128,000 ranks,
# `<|begin_of_text|>` is 128000 and `<|eot_id|>` (end of turn) 128009; with our 316 ranks they are
# 316 and 325. User text that merely *contains* the string `<|eot_id|>` is encoded as ordinary
# text, so a document cannot end a chat turn by accident.

# %%
n_ranks = len(ranks)
print({name: tok.special_tokens[name] for name in SPECIAL_TOKENS[:11]})
check("256 special tokens, right after the BPE ranks",
      [tok.special_tokens[s] for s in SPECIAL_TOKENS] == list(range(n_ranks, n_ranks + 256)))
check("begin_of_text and eot_id are the 1st and 10th special token, as in Llama 3 (128000, 128009)",
      (tok.bos_id - n_ranks, tok.eot_id - n_ranks) == (0, 9))
check("the text '<|eot_id|>' in a document is not the special token", tok.eot_id not in tok.encode("<|eot_id|>"))

meta = os.path.join(lesson.ROOT, "..", "shared", "llama3", "tokenizer.model")
if os.path.isfile(meta):  # Meta's real file, where this machine has it
    llama3 = Tokenizer(meta)
    check("Meta's tokenizer: <|begin_of_text|> = 128000, <|eot_id|> = 128009",
          (llama3.bos_id, llama3.eot_id) == (128000, 128009))

# %% [markdown]
# ## The chat format
#
# A conversation is `<|begin_of_text|>`, then for each message a header
# (`<|start_header_id|>role<|end_header_id|>` and a blank line), the content, and `<|eot_id|>`. A
# prompt ends with an empty assistant header: the model's turn.

# %%
s = tok.special_tokens
by_hand = ([tok.bos_id]
           + [s["<|start_header_id|>"]] + encode("user") + [s["<|end_header_id|>"]] + encode("\n\n")
           + encode("Who is Juliet?") + [tok.eot_id]
           + [s["<|start_header_id|>"]] + encode("assistant") + [s["<|end_header_id|>"]] + encode("\n\n"))
got = tok.encode_dialog_prompt([{"role": "user", "content": "Who is Juliet?"}])
print(tok.decode(got))
check("the chat prompt built by hand equals encode_dialog_prompt's", by_hand == got)

check.done()

# %% [markdown]
# ## Exercises
#
# 1. After how many merges does `" Romeo"` (with its space) become a single token? `encode` reads
#    the global `rank_of`: set `rank_of = {pair: i for pair, i in merges[:n]}` for each n, and check
#    that `len(encode(" Romeo")) == 1` for that n and not for n - 1.
# 2. Why does the regex cut numbers into pieces of at most three digits? Encode `"1234567"` and look
#    at the pieces. Check: `regex.findall(PAT_STR, "1234567") == ["123", "456", "7"]`.
# 3. Train a tokenizer of 300 BPE ranks (`vocab_size=556`: the 256 specials come on top) with
#    `train_bpe` on a text in another language (any you like) and
#    compare bytes per token with the corpus above. Check: `len(text.encode()) / len(tok.encode(text))`
#    is larger on the text the tokenizer was trained on.
#
# Next: [02_llama3_block_by_block.py](02_llama3_block_by_block.py), where the ids go into the model.
