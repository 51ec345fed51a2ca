# %% [markdown]
# # 2. Llama 3, block by block
#
# The Llama 3 transformer is a stack of identical blocks between an embedding table and an output
# layer. Each block is
#
#     h   = x + Attention(RMSNorm(x))        # grouped-query attention with rotary positions
#     out = h + SwiGLU(RMSNorm(h))           # the feed-forward network
#
# We build every piece by hand in a few lines, check each against `model.py`, then put them
# together and get the model's logits, and count the parameters of Llama 3.2 1B by hand.
# A few seconds on a laptop.

# %%
import lesson  # first: it puts the project's files (model.py, train.py, ...) on the path

import math

import torch
import torch.nn.functional as F

import model
from checkpoint import from_rotate_half_layout, to_rotate_half_layout
from model import CONFIGS, ModelArgs, Transformer

check = lesson.Checks("02")
torch.manual_seed(0)

# A small Llama: 4 query heads sharing 2 key/value heads, head_dim 16, Llama 3.1's rope scaling.
args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, multiple_of=32, max_seq_len=64,
                 use_scaled_rope=True, rope_original_max_seq_len=32, rope_scaling_factor=8.0)
llama = Transformer(args)
llama.init_weights()
llama.eval()

# %% [markdown]
# ## RMSNorm
#
# Divide each vector by its root mean square (plus a small eps), then scale each channel by a
# learned gain. Unlike LayerNorm there is no mean subtraction and no bias. Meta computes it in fp32.

# %%
def rms_norm(x, gain, eps=1e-5):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * gain


x = torch.randn(3, 64)
gain = torch.rand(64) + 0.5
norm = model.RMSNorm(64)
norm.weight.data = gain
check.close("RMSNorm by hand equals model.RMSNorm", rms_norm(x, gain), norm(x))
check.close("... and PyTorch's own nn.RMSNorm", rms_norm(x, gain), F.rms_norm(x, (64,), gain, eps=1e-5))

# %% [markdown]
# ## Rotary position embeddings (RoPE)
#
# A query or key vector is cut into pairs of channels; pair i is rotated by the angle
# `position * theta^(-2i / head_dim)`, with theta = 500,000 in Llama 3. Low pairs turn fast (they
# tell nearby positions apart), high pairs slowly (they vary over long distances).
#
# Meta's layout pairs **adjacent** channels (0-1, 2-3, ...). Hugging Face's checkpoints pair channel
# i with i + head_dim/2 ("rotate half"): the same rotation of a permuted vector. `checkpoint.py`
# permutes the rows of `wq` and `wk` when it reads or writes a Hugging Face folder.

# %%
def rope(x, positions, freqs):
    """Rotate adjacent pairs (x[2i], x[2i+1]) of x (..., T, head_dim) by positions (T,) * freqs."""
    angle = positions[:, None].float() * freqs[None, :]  # (T, head_dim / 2)
    cos, sin = torch.cos(angle), torch.sin(angle)
    even, odd = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


hd = args.head_dim
plain = ModelArgs(dim=64, n_heads=4)  # no scaling: theta^(-2i / head_dim)
freqs = model.rope_frequencies(plain)
check.close("rope_frequencies is theta^(-2i / head_dim) with theta = 500,000",
            freqs, 1.0 / 500000.0 ** (torch.arange(0, hd, 2).float() / hd))
q = torch.randn(10, hd)
positions = torch.arange(10)
rotation = torch.polar(torch.ones(10, hd // 2), positions[:, None].float() * freqs)  # cos + i sin
ours = rope(q, positions, freqs)
theirs = model.apply_rope(q[None, :, None, :], rotation)[0, :, 0]  # model.py: (B, T, heads, head_dim)
check.close("RoPE by hand equals model.apply_rope (one complex product per pair)", ours, theirs)

# %% [markdown]
# **Why it works: a query-key product depends only on the distance.** Rotate each pair of q by the
# angle of position a and the matching pair of k by that of position b: their dot product depends on
# the angle a - b alone, as rotating both vectors by the same angle leaves it unchanged. Shift both
# positions by the same amount and the attention score stays the same.

# %%
k = torch.randn(10, hd)
score = lambda m, n: (rope(q[None, 0], torch.tensor([m]), freqs) @ rope(k[None, 0], torch.tensor([n]), freqs).T).item()  # noqa: E731
check.close("q at 7 . k at 3 equals q at 27 . k at 23 (distance 4 both times)", score(7, 3), score(27, 23),
            rtol=1e-4, atol=1e-4)

# %% [markdown]
# **The two layouts.** Hugging Face rotates channel i with channel i + head_dim/2. Permute the rows
# of `wq` and `wk` into that order (each head's even channels first, then its odd ones), rotate the
# halves, and every attention score is what Meta's layout gives.

# %%
def rope_rotate_half(x, positions, freqs):
    angle = positions[:, None].float() * freqs[None, :]
    cos, sin = torch.cos(angle).repeat(1, 2), torch.sin(angle).repeat(1, 2)
    first, second = x[..., :hd // 2], x[..., hd // 2:]
    return x * cos + torch.cat([-second, first], -1) * sin


h = torch.randn(10, 64)
wq, wk = llama.layers[0].attention.wq.weight, llama.layers[0].attention.wk.weight
head = lambda t, i: t.view(10, -1, hd)[:, i]  # noqa: E731  (T, head_dim) of head i
meta_q, meta_k = (h @ wq.T), (h @ wk.T)
hf_q, hf_k = h @ to_rotate_half_layout(wq, 4).T, h @ to_rotate_half_layout(wk, 2).T
meta_scores = rope(head(meta_q, 0), positions, freqs) @ rope(head(meta_k, 0), positions, freqs).T
hf_scores = rope_rotate_half(head(hf_q, 0), positions, freqs) @ rope_rotate_half(head(hf_k, 0), positions, freqs).T
check.close("the rotate-half layout on permuted weights gives Meta's attention scores", hf_scores, meta_scores,
            rtol=1e-4, atol=1e-4)
check("and the permutation is undone exactly", torch.equal(from_rotate_half_layout(to_rotate_half_layout(wq, 4), 4), wq))

# %% [markdown]
# **Llama 3.1's frequency scaling** stretches the context from 8k to 128k tokens without retraining
# from scratch: pairs whose wavelength (2 pi / frequency) is short, under 8192 / 4 tokens, keep their
# frequency; those longer than 8192 tokens turn 8 times slower; those between are blended smoothly.

# %%
import matplotlib.pyplot as plt  # noqa: E402

a8b = ModelArgs(**CONFIGS["llama3.1-8b"])
base, scaled = model.rope_frequencies(ModelArgs(**{**CONFIGS["llama3.1-8b"], "use_scaled_rope": False})), model.rope_frequencies(a8b)
wavelength = 2 * math.pi / base
fig, ax = plt.subplots(figsize=(5.5, 3.2))
ax.loglog(wavelength, 2 * math.pi / base, label="Llama 3 (no scaling)")
ax.loglog(wavelength, 2 * math.pi / scaled, label="Llama 3.1 (factor 8)")
for w in (8192 / 4, 8192):
    ax.axvline(w, color="grey", lw=0.6, ls=":")
ax.set(xlabel="wavelength before scaling (tokens)", ylabel="wavelength after", title="RoPE scaling, head_dim 128")
ax.legend()
lesson.save_figure(fig, "02_rope_scaling")
check("short wavelengths (< 2048 tokens) keep their frequency", torch.equal(scaled[wavelength < 2048], base[wavelength < 2048]))
check.close("long ones (> 8192 tokens) turn 8 times slower", scaled[wavelength > 8192], base[wavelength > 8192] / 8)

# %% [markdown]
# ## Grouped-query attention
#
# Llama 3 8B has 32 query heads but only 8 key/value heads: each group of 4 query heads shares one
# key/value head. That makes the KV cache 4 times smaller (chapter 3) at almost no cost in quality.
# In the formula, share = repeat each key/value head for the query heads of its group, then
# `softmax(q k^T / sqrt(head_dim) + causal mask) v`.

# %%
def gqa_attention(q, k, v):
    """q (B, H, T, hd); k, v (B, H_kv, T, hd); causal."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    causal = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v


qh, kh, vh = torch.randn(2, 4, 10, hd), torch.randn(2, 2, 10, hd), torch.randn(2, 2, 10, hd)
check.close("GQA by repeating key/value heads equals the fused kernel that reads them in place",
            gqa_attention(qh, kh, vh), model.fused_attention(qh, kh, vh), rtol=1e-5, atol=1e-5)

# %% [markdown]
# ## SwiGLU, and Meta's hidden-size rule
#
# The feed-forward network is `w2(silu(w1 x) * w3 x)`: a gated unit. With three matrices instead of
# two, its hidden size is 2/3 of the usual 4 x dim, so the parameter count matches; then Meta
# multiplies by `ffn_dim_multiplier` and rounds up to a multiple of `multiple_of`.

# %%
ffn = llama.layers[0].feed_forward
xs = torch.randn(5, 64)
check.close("SwiGLU by hand equals model.FeedForward",
            (F.silu(xs @ ffn.w1.weight.T) * (xs @ ffn.w3.weight.T)) @ ffn.w2.weight.T, ffn(xs))


def hidden_size(dim, multiplier, multiple_of):
    hidden = int(multiplier * int(2 * 4 * dim / 3))
    return multiple_of * math.ceil(hidden / multiple_of)


for name in ("llama3-8b", "llama3-70b", "llama3.1-405b", "llama3.2-1b", "llama3.2-3b"):
    c = CONFIGS[name]
    ours = hidden_size(c["dim"], c["ffn_dim_multiplier"], c["multiple_of"])
    print(f"{name:>14}: dim {c['dim']:>6,}, hidden {ours:>6,}")
    check(f"{name}'s hidden size by the rule is ModelArgs.hidden_dim", ours == ModelArgs(**c).hidden_dim)

# %% [markdown]
# ## The whole model, from the pieces
#
# Embedding lookup; for each block, attention on the normed input (queries, keys and values
# projected, rotated, attended, projected back) added to the residual stream, then the feed-forward
# on the normed result added too; a final RMSNorm and the output layer.

# %%
def logits_by_hand(m, tokens):
    a = m.args
    T = tokens.shape[1]
    freqs = model.rope_frequencies(a)
    pos = torch.arange(T)
    x = m.tok_embeddings.weight[tokens]  # (B, T, dim)
    for layer in m.layers:
        at, ff = layer.attention, layer.feed_forward
        y = rms_norm(x, layer.attention_norm.weight)
        q = (y @ at.wq.weight.T).view(*tokens.shape, a.n_heads, a.head_dim).transpose(1, 2)
        k = (y @ at.wk.weight.T).view(*tokens.shape, a.n_kv_heads, a.head_dim).transpose(1, 2)
        v = (y @ at.wv.weight.T).view(*tokens.shape, a.n_kv_heads, a.head_dim).transpose(1, 2)
        q, k = rope(q, pos, freqs), rope(k, pos, freqs)
        x = x + gqa_attention(q, k, v).transpose(1, 2).reshape(*tokens.shape, -1) @ at.wo.weight.T
        y = rms_norm(x, layer.ffn_norm.weight)
        x = x + (F.silu(y @ ff.w1.weight.T) * (y @ ff.w3.weight.T)) @ ff.w2.weight.T
    return rms_norm(x, m.norm.weight) @ m.output.weight.T


tokens = torch.randint(0, 300, (2, 20))
with torch.no_grad():
    ours, theirs = logits_by_hand(llama, tokens), llama(tokens)
check.close("the whole model by hand gives model.py's logits", ours, theirs, rtol=1e-4, atol=1e-4)

# %% [markdown]
# ## Counting Llama 3.2 1B's parameters
#
# dim 2048, 16 blocks, 32 query heads and 8 key/value heads of 64 channels, hidden size 8192, a
# vocabulary of 128,256 tokens, and the output layer tied to the embedding table (3.2's small models
# store it once).

# %%
dim, layers, heads, kv_heads, hidden, vocab = 2048, 16, 32, 8, 8192, 128256
head_dim = dim // heads
per_block = (dim * heads * head_dim          # wq
             + 2 * dim * kv_heads * head_dim  # wk, wv: 4 times smaller than wq
             + heads * head_dim * dim        # wo
             + 3 * dim * hidden              # w1, w2, w3
             + 2 * dim)                      # two RMSNorm gains
total = vocab * dim + layers * per_block + dim  # embedding (= output), blocks, final norm
print(f"Llama 3.2 1B: {total:,} parameters; the embedding alone is {vocab * dim / total:.0%} of them")
with torch.device("meta"):  # shapes only, no memory
    one_b = Transformer(ModelArgs(**CONFIGS["llama3.2-1b"]))
check("our count equals the model's: 1,235,814,400", total == one_b.num_params() == 1_235_814_400)

check.done()

# %% [markdown]
# ## Exercises
#
# 1. Count Llama 3 8B's parameters the same way (32 blocks, dim 4096, hidden 14,336, an untied output
#    layer). Check against `Transformer(ModelArgs(**CONFIGS["llama3-8b"])).num_params()` built on the
#    meta device: 8,030,261,248.
# 2. RoPE's long-range decay: a key that matches its query (`k = q`) scores highest at distance 0
#    and less on average as the distance grows, as the pairs' rotations fall out of step. With random
#    q and `k = q.clone()`, plot `score(m, 0)` for m in 0..64 (redefine `score` for these vectors) and
#    check that its mean over m in 0..8 exceeds its mean over 56..64. (For unrelated q and k there
#    is nothing to decay: try it.)
# 3. Set `model.FUSED_ATTENTION = False` and run the model: it now computes attention by the formula.
#    Check that `llama(tokens)` is unchanged within 1e-5.
#
# Next: [03_generation_and_kv_cache.py](03_generation_and_kv_cache.py).
