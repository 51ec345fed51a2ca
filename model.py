"""
The Llama 3 / 3.1 / 3.2 transformer in one file, in the order of the math.

- `ModelArgs` takes Meta's `params.json` field names, so `ModelArgs(**params)` works; `CONFIGS`
  holds the official shapes and small presets of the same family.
- RMSNorm, and rotary position embeddings (RoPE: theta 500k, Meta's adjacent-pair layout) computed in
  fp32, with Llama 3.1's frequency scaling for long context (factor 8; Llama 3.2 uses 32).
- Grouped-query attention, written as the formula softmax(q k^T / sqrt(d) + mask) v; PyTorch's fused
  kernels compute the same beside it (`FUSED_ATTENTION` chooses). A preallocated KV cache, and document
  masking for packed sequences (Llama 3 paper, section 3.2: no attention across documents).
- SwiGLU feed-forward with Meta's hidden-size rule; pre-norm blocks; optional tied embeddings (3.2).
- Batched generation (prefill, then one token at a time against the cache): greedy, temperature,
  top-k, top-p, stop tokens.

Reading and writing checkpoints (this project's, Meta's, Hugging Face's) is checkpoint.py's.
"""

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelArgs:
    # Meta's params.json fields (their defaults are Llama 3 8B's shape).
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # None: as many as query heads (no grouping)
    vocab_size: int = 128256
    multiple_of: int = 256  # the SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    use_scaled_rope: bool = False  # Llama 3.1's long-context frequency scaling
    # What Meta keeps in code rather than in params.json.
    max_seq_len: int = 8192  # the longest sequence the rotary table covers
    tie_word_embeddings: bool = False  # Llama 3.2 1B and 3B share input and output embeddings
    rope_scaling_factor: float = 8.0  # Llama 3.1: 8; Llama 3.2: 32
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_seq_len: int = 8192  # the context length the model was pretrained at
    ffn_hidden_dim: Optional[int] = None  # set it to override Meta's hidden-size rule
    max_batch_size: int = 32  # accepted for params.json compatibility; the cache is sized per call

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError("dim must divide by n_heads, and n_heads by n_kv_heads")
        if (self.dim // self.n_heads) % 2:
            raise ValueError("the head dimension must be even for rotary embeddings")

    @property
    def head_dim(self):
        return self.dim // self.n_heads

    @property
    def hidden_dim(self):
        """SwiGLU's hidden size: 2/3 of 4*dim (same parameter count as a 4*dim GELU MLP), times
        ffn_dim_multiplier, rounded up to a multiple of multiple_of (Meta's FeedForward)."""
        if self.ffn_hidden_dim is not None:
            return self.ffn_hidden_dim
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


_llama3 = dict(vocab_size=128256, rope_theta=500000.0, norm_eps=1e-5)
CONFIGS = {
    # Official shapes (Llama 3 paper, table 3; Meta's params.json files).
    "llama3-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, multiple_of=1024,
                      ffn_dim_multiplier=1.3, **_llama3),
    "llama3-70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096,
                       ffn_dim_multiplier=1.3, **_llama3),
    "llama3.1-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, multiple_of=1024,
                        ffn_dim_multiplier=1.3, use_scaled_rope=True, max_seq_len=131072, **_llama3),
    "llama3.1-70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096,
                         ffn_dim_multiplier=1.3, use_scaled_rope=True, max_seq_len=131072, **_llama3),
    "llama3.1-405b": dict(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, multiple_of=4096,
                          ffn_dim_multiplier=1.2, use_scaled_rope=True, max_seq_len=131072, **_llama3),
    "llama3.2-1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, multiple_of=256,
                        ffn_dim_multiplier=1.5, use_scaled_rope=True, rope_scaling_factor=32.0,
                        tie_word_embeddings=True, max_seq_len=131072, **_llama3),
    "llama3.2-3b": dict(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, multiple_of=256,
                        ffn_dim_multiplier=1.0, use_scaled_rope=True, rope_scaling_factor=32.0,
                        tie_word_embeddings=True, max_seq_len=131072, **_llama3),
    # Small presets of the same family that train on a CPU. vocab_size is taken from the dataset.
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, max_seq_len=1024),
    "small": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, multiple_of=64, max_seq_len=1024),
    "medium": dict(dim=256, n_layers=6, n_heads=8, n_kv_heads=4, multiple_of=64, max_seq_len=1024),
    "bench": dict(dim=384, n_layers=6, n_heads=6, n_kv_heads=2, ffn_hidden_dim=1024, vocab_size=8192,
                  max_seq_len=1024),
    # GPU presets for the distillation study: a ~100M teacher and a ~20M student (32k vocabulary).
    "gpu-100m": dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=4, multiple_of=256, vocab_size=32768,
                     tie_word_embeddings=True,
                     max_seq_len=2048),
    "gpu-20m": dict(dim=384, n_layers=6, n_heads=6, n_kv_heads=2, multiple_of=256, vocab_size=32768,
                    tie_word_embeddings=True,
                    max_seq_len=2048),
}


# ----------------------------------------------------------------------------------------------
# RMSNorm


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in fp32 and cast back (as Meta does)."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


# ----------------------------------------------------------------------------------------------
# Linear layers


CPU_HAS_AMX = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()  # Intel's matrix tiles (bf16)


class Linear(nn.Linear):
    """y = x W^T without a bias (Llama's layers have none): nn.Linear, with one faster path chosen
    here. Decoding one row with bf16 weights on a CPU with AMX tiles goes through torch.mv, PyTorch's
    matrix-vector kernel: there the general product (oneDNN) is slower for a single row, and the Llama
    3.2 1B shape decodes 1.3x as fast this way (measured on an Intel Xeon, docs/performance.md; not
    measured on other CPUs, which keep the general product). Both accumulate in fp32."""

    def __init__(self, d_in, d_out):
        super().__init__(d_in, d_out, bias=False)

    def forward(self, x):
        one_row = x.numel() == x.shape[-1]
        if one_row and CPU_HAS_AMX and x.device.type == "cpu" and x.dtype == self.weight.dtype == torch.bfloat16:
            return torch.mv(self.weight, x.reshape(-1)).view(*x.shape[:-1], -1)
        return F.linear(x, self.weight)


# ----------------------------------------------------------------------------------------------
# Rotary position embeddings


def rope_frequencies(args: ModelArgs, device="cpu"):
    """The rotation frequency of each pair of channels, theta^(-2i/head_dim), in fp32.

    Llama 3.1 (paper section 3.3 and Meta's `apply_scaling`): wavelengths longer than the
    original context / low_freq_factor are slowed down by `factor`, wavelengths shorter than
    original / high_freq_factor are kept, and those between are interpolated smoothly."""
    hd = args.head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd))
    if not args.use_scaled_rope:
        return freqs
    old_len, factor = args.rope_original_max_seq_len, args.rope_scaling_factor
    low, high = args.rope_low_freq_factor, args.rope_high_freq_factor
    wavelen = 2 * math.pi / freqs
    smooth = (old_len / wavelen - low) / (high - low)
    interpolated = (1 - smooth) * freqs / factor + smooth * freqs
    scaled = torch.where(wavelen > old_len / low, freqs / factor, interpolated)
    return torch.where(wavelen < old_len / high, freqs, scaled)


def rope_table(args: ModelArgs, device="cpu"):
    """cos and sin of position * frequency, each (max_seq_len, head_dim // 2), fp32."""
    freqs = rope_frequencies(args, device)
    angles = torch.outer(torch.arange(args.max_seq_len, dtype=torch.float32, device=device), freqs)
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x, rotation):
    """Rotate each adjacent channel pair (x[2i], x[2i+1]) of x (B, T, H, hd) by its angle, in fp32.

    As in Meta's code, a pair is read as the complex number x[2i] + i x[2i+1] and multiplied by
    rotation = cos + i sin (T, hd/2): one fused complex product, much faster forward and backward
    than the same arithmetic on the real and imaginary halves. This is Meta's layout (adjacent
    pairs); Hugging Face stores q/k permuted to rotate halves."""
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, T, H, hd/2) complex
    return torch.view_as_real(xc * rotation[:, None, :]).flatten(-2).type_as(x)


# ----------------------------------------------------------------------------------------------
# Attention


def attention(q, k, v, mask=None):
    """softmax(q k^T / sqrt(head_dim) + mask) v, as the formula reads.

    q (B, H, T, hd) holds the T new positions' queries; k, v (B, H_kv, S, hd) the keys and values of
    all S positions they may look at (S > T after a cached prefix). Grouped-query attention: H is a
    multiple of H_kv, and each group of H / H_kv query heads shares one key/value head (here repeated
    to one per query head). mask (T, S) or (B, 1, T, S) is True where a query may look; None means
    causal (position t sees 0..t) when T > 1, and no mask for one new token, which sees everything."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, H, S, hd)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, T, S)
    if mask is None and q.shape[2] > 1:
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1) @ v  # (B, H, T, hd)


# True: attention() is computed by PyTorch's fused kernels (scaled_dot_product_attention), which give
# the same result up to rounding without forming the (T, S) scores; False: by the formula above, for
# reading or checking (tests/test_model.py compares the two). The one place the choice is made.
FUSED_ATTENTION = True


class Attention(nn.Module):
    """Grouped-query attention: n_kv_heads key/value heads shared by groups of query heads."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = Linear(args.dim, args.n_heads * args.head_dim)
        self.wk = Linear(args.dim, args.n_kv_heads * args.head_dim)
        self.wv = Linear(args.dim, args.n_kv_heads * args.head_dim)
        self.wo = Linear(args.n_heads * args.head_dim, args.dim)
        self.cache_k = self.cache_v = None  # (B, n_kv_heads, cache_len, head_dim) while generating

    def forward(self, x, rotation, start_pos=0, mask=None):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, rotation), apply_rope(k, rotation)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, hd)
        if self.cache_k is not None:
            # Write this step's keys and values at start_pos, then attend over the whole prefix.
            self.cache_k[:B, :, start_pos:start_pos + T] = k
            self.cache_v[:B, :, start_pos:start_pos + T] = v
            k, v = self.cache_k[:B, :, :start_pos + T], self.cache_v[:B, :, :start_pos + T]
        y = (fused_attention if FUSED_ATTENTION else attention)(q, k, v, mask)  # (B, H, T, hd)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


def fused_attention(q, k, v, mask=None):
    """attention() through scaled_dot_product_attention, whose best kernel depends on the device."""
    if q.device.type != "cpu":
        return accelerator_attention(q, k, v, mask)
    # The CPU kernel reads the shared heads in place (enable_gqa), with or without a mask: against
    # copying them out per query head, 1.5-2.6x as fast with 6 / 2 heads and 0.9-1.5x with 32 / 8
    # at 256 tokens, 3-30x when decoding (AMD Zen 4, 2 busy cores). Under bf16 autocast it still runs
    # in fp32 unless the CPU multiplies bf16 on AMX tiles and the heads are wide: forward + backward,
    # 8 x 256 tokens, 2 threads, bf16 against fp32 took 1.6x as long at head_dim 32, as long at 64,
    # and 0.67x as long at 128 on an Intel Xeon (Sapphire Rapids); on an AMD Zen 4 (no AMX) 2.2x and
    # 1.2x as long at 32 and 64.
    low = q.dtype == torch.bfloat16 and q.shape[-1] >= 128 and CPU_HAS_AMX
    dtype = torch.bfloat16 if low else torch.float32
    with torch.autocast("cpu", enabled=False):
        y = F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype), attn_mask=mask,
                                           is_causal=mask is None and q.shape[2] > 1, enable_gqa=True)
    return y.type_as(q)


def accelerator_attention(q, k, v, mask=None):
    """fused_attention() on CUDA (and MPS). Copying the key/value heads out per query head costs a
    copy of the whole KV cache per layer and decoding step, so it is done only where no kernel reads
    shared heads in place."""
    B, H, T, hd = q.shape
    groups = H // k.shape[1]
    if mask is None and T == 1:
        # Decoding one token: the query heads of a group become rows of one query against their
        # shared head, (B, H, 1, hd) -> (B, H_kv, groups, hd). Any kernel, any dtype, no copy.
        return F.scaled_dot_product_attention(q.reshape(B, H // groups, groups, hd), k, v).reshape(B, H, 1, hd)
    if mask is None and q.dtype in (torch.float16, torch.bfloat16):
        return F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=True)  # flash attention
    # fp32 (the memory-efficient kernel) or a mask (no flash attention): one key/value head per query head.
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1)


# ----------------------------------------------------------------------------------------------
# Feed-forward, block, masks


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = Linear(args.dim, args.hidden_dim)
        self.w2 = Linear(args.hidden_dim, args.dim)
        self.w3 = Linear(args.dim, args.hidden_dim)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm residual block: x + attention(norm(x)), then + feed_forward(norm(.))."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, rotation, start_pos=0, mask=None):
        h = x + self.attention(self.attention_norm(x), rotation, start_pos, mask)
        return h + self.feed_forward(self.ffn_norm(h))


def doc_ids_from_bos(tokens, bos_id):
    """Document index of each position of a packed row: it increases at every BOS. (B, T) long."""
    return torch.cumsum((tokens == bos_id).long(), dim=1)


def document_causal_mask(doc_ids):
    """(B, 1, T, T) bool: position i may attend to j when j <= i and both lie in one document."""
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (causal & same_doc)[:, None]


# ----------------------------------------------------------------------------------------------
# The transformer


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = Linear(args.dim, args.vocab_size)
        if args.tie_word_embeddings:
            self.tie_weights()
        self.init_rope()

    def tie_weights(self):
        """The output layer reads the embedding table (Llama 3.2 1B and 3B): every tensor of the
        embedding (its weight, and its scales once quantized by quantize.py) is the output layer's."""
        for name, tensor in self.tok_embeddings.state_dict(keep_vars=True).items():
            setattr(self.output, name, tensor)

    def init_rope(self):
        """(Re)build the fp32 rotary table; needed after building on the meta device."""
        device = self.tok_embeddings.weight.device
        device = "cpu" if device.type == "meta" else device
        cos, sin = rope_table(self.args, device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self):
        """Initialization for training from scratch (uses torch's global RNG: seed it first).

        - tok_embeddings: N(0, 0.02), the GPT-2 / OLMo choice; when tied it is also the output.
        - wq, wk, wv, w1, w3: N(0, 0.02).
        - wo, w2 (the projections that write into the residual stream): N(0, 0.02 / sqrt(2 n_layers)),
          so the residual stream's variance does not grow with depth (GPT-2's scaled init).
        - output (untied): N(0, 0.02).
        - RMSNorm weights: 1."""
        std, out_std = 0.02, 0.02 / math.sqrt(2 * self.args.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, mean=0.0, std=out_std)
            else:
                nn.init.normal_(p, mean=0.0, std=std)

    def num_params(self):
        """Number of parameters, tied weights counted once (works on the meta device too)."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, tokens, doc_ids=None, start_pos=0, return_hidden=False):
        """tokens (B, T) -> logits (B, T, vocab_size), or the final normed hidden states (B, T, dim)
        with return_hidden=True. doc_ids (B, T) turns on document masking; start_pos is where the
        tokens sit in the KV cache during generation."""
        B, T = tokens.shape
        if start_pos + T > self.args.max_seq_len:
            raise ValueError(f"sequence of {start_pos + T} tokens exceeds max_seq_len {self.args.max_seq_len}")
        h = self.tok_embeddings(tokens)
        positions = slice(start_pos, start_pos + T)
        rotation = torch.complex(self.rope_cos[positions].float(), self.rope_sin[positions].float())
        mask = None
        if doc_ids is not None and bool((doc_ids[:, 0] != doc_ids[:, -1]).any()):
            mask = document_causal_mask(doc_ids)  # only when some row holds several documents
        elif start_pos > 0 and T > 1:
            # Several new tokens after a cached prefix: each sees the whole prefix and the new
            # tokens up to itself. (One new token sees everything, so it needs no mask.)
            q_pos = torch.arange(start_pos, start_pos + T, device=tokens.device)
            mask = q_pos[:, None] >= torch.arange(start_pos + T, device=tokens.device)[None, :]
        for layer in self.layers:
            h = layer(h, rotation, start_pos, mask)
        h = self.norm(h)
        return h if return_hidden else self.output(h)

    # ------------------------------------------------------------------------------------------
    # Generation: prefill the prompt, then decode one token at a time against the KV cache.

    def setup_cache(self, batch_size, cache_len):
        p = self.norm.weight  # the model's dtype (the embedding may be int8: quantize.py)
        shape = (batch_size, self.args.n_kv_heads, cache_len, self.args.head_dim)
        for layer in self.layers:
            layer.attention.cache_k = torch.zeros(shape, dtype=p.dtype, device=p.device)
            layer.attention.cache_v = torch.zeros(shape, dtype=p.dtype, device=p.device)

    def clear_cache(self):
        for layer in self.layers:
            layer.attention.cache_k = layer.attention.cache_v = None

    def last_logits(self, tokens, start_pos):
        """fp32 logits of the last position only: the output layer runs on one token per row."""
        h = self(tokens, start_pos=start_pos, return_hidden=True)[:, -1]
        return self.output(h).float()

    @torch.no_grad()
    def generate(self, prompt, max_new_tokens, temperature=0.0, top_k=None, top_p=None,
                 stop_tokens=None, generator=None, on_token=None):
        """Continue each row of prompt (B, P) by max_new_tokens tokens; returns them, (B, max_new_tokens).

        temperature 0 is greedy decoding. A row that emits one of stop_tokens keeps repeating that
        token afterwards, so callers cut each row at its first stop token. on_token, if given, is
        called with each step's tokens (B,) as they are produced (for streaming output)."""
        B, P = prompt.shape
        self.setup_cache(B, P + max_new_tokens)
        out = torch.empty(B, max_new_tokens, dtype=torch.long, device=prompt.device)
        stops = torch.tensor(sorted(stop_tokens or []), dtype=torch.long, device=prompt.device)
        done = torch.zeros(B, dtype=torch.bool, device=prompt.device)
        try:
            logits, pos = self.last_logits(prompt, 0), P
            for i in range(max_new_tokens):
                token = sample(logits, temperature, top_k, top_p, generator)
                if stops.numel():
                    token = torch.where(done, out[:, i - 1] if i else token, token)
                    done |= torch.isin(token, stops)
                out[:, i] = token
                if on_token is not None:
                    on_token(token)
                if i + 1 == max_new_tokens or (stops.numel() and bool(done.all())):
                    out[:, i + 1:] = token[:, None]
                    break
                logits, pos = self.last_logits(token[:, None], pos), pos + 1
        finally:
            self.clear_cache()
        return out


def sample(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """Pick the next token from logits (B, V): argmax at temperature 0, else sample from the
    temperature-scaled distribution restricted to the top_k tokens and/or the top_p nucleus."""
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens more likely than it already cover top_p.
        drop = probs.cumsum(-1) - probs > top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
