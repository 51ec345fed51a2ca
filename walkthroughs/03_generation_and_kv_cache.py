# %% [markdown]
# # 3. Generation: masks, the KV cache, and sampling
#
# A model that predicts the next token generates text by appending its choice and predicting again.
# Done naively, step t recomputes all t positions. The **KV cache** keeps every layer's keys and
# values of the positions already seen, so a step computes one new position. This chapter draws the
# masks that say who may look at whom, writes a cached decoding loop by hand and checks it against
# recomputing from scratch and against `model.generate`, builds top-k and top-p sampling, and works
# out how much memory the cache takes for the official shapes, with and without grouped-query
# attention. A few seconds.

# %%
import lesson  # first: it puts the project's files (model.py, train.py, ...) on the path

import torch

import model
from model import CONFIGS, ModelArgs, Transformer

check = lesson.Checks("03")
torch.manual_seed(0)
args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, multiple_of=32, max_seq_len=128)
llama = Transformer(args)
llama.init_weights()
llama.eval()

# %% [markdown]
# ## Masks
#
# **Causal**: position i may attend to positions 0..i. **Document masking** (Llama 3 paper, section
# 3.2): training packs several documents into one row; position i may attend to j only if both lie
# in the same document. A document starts at every `<|begin_of_text|>` (BOS).

# %%
import matplotlib.pyplot as plt  # noqa: E402

BOS = 7
row = torch.tensor([[BOS, 11, 12, 13, BOS, 21, 22, BOS, 31, 32, 33, 34]])
doc_ids = model.doc_ids_from_bos(row, BOS)
print("document of each position:", doc_ids.tolist()[0])
T = row.shape[1]
causal = torch.ones(T, T, dtype=torch.bool).tril()
same_document = doc_ids[0][:, None] == doc_ids[0][None, :]
check("the document mask is causal AND same-document", torch.equal(causal & same_document,
                                                                  model.document_causal_mask(doc_ids)[0, 0]))
fig, axes = plt.subplots(1, 2, figsize=(7, 3.4))
for ax, m, title in ((axes[0], causal, "causal"), (axes[1], causal & same_document, "causal + documents")):
    ax.imshow(m, cmap="Blues")
    ax.set(title=title, xlabel="key position j", ylabel="query position i")
lesson.save_figure(fig, "03_masks")

with torch.no_grad():
    packed = llama(row, doc_ids=doc_ids)
    alone = llama(row[:, 4:7])  # the second document by itself, from position 0
check.close("with document masking, a document's logits are what it gets alone (RoPE is relative)",
            packed[0, 4:7], alone[0], rtol=1e-4, atol=1e-4)

# %% [markdown]
# ## Greedy decoding, from scratch and with the cache
#
# From scratch: run the whole sequence every step, take the argmax of the last position.
#
# With the cache: first a **prefill** runs the prompt once and writes every layer's keys and values
# into preallocated buffers; then each **decode** step feeds one token at position `start_pos`, writes
# its key and value at that position, and attends over everything cached. One new token may look at
# every cached position, so it needs no mask.

# %%
prompt = torch.randint(0, 300, (3, 6))
new = 10


@torch.no_grad()
def greedy_from_scratch(m, prompt, n):
    seq = prompt
    for _ in range(n):
        next_token = m(seq)[:, -1].argmax(-1)  # all positions again, every step
        seq = torch.cat([seq, next_token[:, None]], 1)
    return seq[:, prompt.shape[1]:]


@torch.no_grad()
def greedy_with_cache(m, prompt, n):
    B, P = prompt.shape
    m.setup_cache(B, P + n)  # per layer: keys and values (B, n_kv_heads, P + n, head_dim), zeros
    logits = m(prompt, start_pos=0)[:, -1]  # prefill: writes positions 0..P-1
    out = []
    for i in range(n):
        token = logits.argmax(-1)
        out.append(token)
        logits = m(token[:, None], start_pos=P + i)[:, -1]  # decode: one position, P + i
    m.clear_cache()
    return torch.stack(out, 1)


scratch, cached = greedy_from_scratch(llama, prompt, new), greedy_with_cache(llama, prompt, new)
print(cached)
check("the cached loop gives the tokens of recomputing from scratch", torch.equal(scratch, cached))
check("... and model.generate's (batched, greedy)", torch.equal(cached, llama.generate(prompt, new)))

# %% [markdown]
# ## Sampling: temperature, top-k, top-p
#
# Greedy decoding always takes the most likely token. Sampling draws from softmax(logits / T):
# T < 1 sharpens the distribution, T > 1 flattens it. **Top-k** keeps the k most likely tokens;
# **top-p** (nucleus) keeps the smallest set of most likely tokens whose probability reaches p.

# %%
logits = torch.randn(2, 300)


def filtered(logits, temperature, top_k=None, top_p=None):
    logits = logits / temperature
    if top_k is not None:
        kth = logits.topk(top_k).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        probs, order = logits.softmax(-1).sort(descending=True)
        before = probs.cumsum(-1) - probs  # the mass of the tokens more likely than each
        drop = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, before > top_p)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


kept = torch.isfinite(filtered(logits, 1.0, top_k=5))
check("top-k keeps exactly k tokens per row", kept.sum(-1).tolist() == [5, 5])
nucleus = filtered(logits, 1.0, top_p=0.5).softmax(-1)
mass = logits.softmax(-1)[nucleus > 0].sum() / 2
print(f"top-p 0.5 keeps {int((nucleus[0] > 0).sum())} and {int((nucleus[1] > 0).sum())} tokens, holding {mass:.2f} of the mass")
check("top-p keeps the fewest tokens that hold p", all(
    logits[r].softmax(-1).sort(descending=True).values[:int((nucleus[r] > 0).sum()) - 1].sum() < 0.5
    <= logits[r].softmax(-1)[nucleus[r] > 0].sum() for r in range(2)))
for settings in ({"temperature": 0.8}, {"temperature": 1.0, "top_k": 5}, {"temperature": 1.3, "top_p": 0.5}):
    ours = torch.multinomial(filtered(logits, **settings).softmax(-1), 1, generator=torch.Generator().manual_seed(3))
    theirs = model.sample(logits, **settings, generator=torch.Generator().manual_seed(3))
    check(f"our sampling with {settings} draws model.sample's tokens", torch.equal(ours[:, 0], theirs))
check("temperature 0 is greedy", torch.equal(model.sample(logits, 0.0), logits.argmax(-1)))

# %% [markdown]
# ## What the cache costs
#
# Per token, every layer stores a key and a value of `n_kv_heads x head_dim` numbers. With 2 bytes
# per number (bf16), for one sequence:
#
#     bytes per token = 2 (K and V) x layers x n_kv_heads x head_dim x 2 bytes
#
# Grouped-query attention divides it by n_heads / n_kv_heads: 4 for Llama 3 8B, 8 for 70B, 16 for 405B.

# %%
def cache_bytes(cfg, tokens, kv_heads=None, bytes_per_number=2):
    a = ModelArgs(**cfg)
    return 2 * a.n_layers * (kv_heads or a.n_kv_heads) * a.head_dim * tokens * bytes_per_number


print(f"{'model':>14} {'heads / kv heads':>16} {'context':>8} {'GQA, a full context':>20} {'without GQA':>13}")
for name in ("llama3.2-1b", "llama3-8b", "llama3-70b", "llama3.1-405b"):
    a = ModelArgs(**CONFIGS[name])  # max_seq_len: 8k for Llama 3, 128k for 3.1 and 3.2
    gqa, mha = cache_bytes(CONFIGS[name], a.max_seq_len), cache_bytes(CONFIGS[name], a.max_seq_len, kv_heads=a.n_heads)
    print(f"{name:>14} {a.n_heads:>9} / {a.n_kv_heads:<4} {a.max_seq_len:>8,} {gqa / 2**30:>16.1f} GiB {mha / 2**30:>9.1f} GiB")
    check(f"{name}: GQA makes the cache {a.n_heads // a.n_kv_heads}x smaller", mha == gqa * a.n_heads // a.n_kv_heads)
small = Transformer(args)
small.setup_cache(1, 100)
allocated = sum(t.numel() * t.element_size() for layer in small.layers
                for t in (layer.attention.cache_k, layer.attention.cache_v))
check("the formula counts what setup_cache allocates (fp32: 4 bytes a number)",
      allocated == cache_bytes(vars(args), 100, bytes_per_number=4))

check.done()

# %% [markdown]
# ## Exercises
#
# 1. Time `greedy_from_scratch` against `greedy_with_cache` for 100 new tokens on a 12-layer model
#    (`ModelArgs(dim=256, n_layers=12, ...)`). Check that the cached loop is faster.
# 2. A packed row with three documents: the last document's first token is a BOS. Which positions can
#    it see? Check with `model.document_causal_mask` that its row of the mask has exactly one True.
# 3. For Llama 3 70B at 8,192 tokens and batch 16, how many GiB does the bf16 cache take? Check:
#    `cache_bytes(CONFIGS["llama3-70b"], 8192) * 16 / 2**30` is 40.
#
# Next: [04_training.py](04_training.py).
