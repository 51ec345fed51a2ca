"""
The Llama 3 / 3.1 / 3.2 transformer in one file, in the order of the math.

- `ModelArgs` takes Meta's `params.json` field names, so `ModelArgs(**params)` works.
- RMSNorm and rotary embeddings (RoPE, theta 500k, Meta's adjacent-pair layout, one complex
  product) computed in fp32, with Llama 3.1's frequency scaling for long context (factor 8; Llama
  3.2 uses 32).
- Grouped-query attention through `scaled_dot_product_attention`, reading the shared key/value
  heads in place wherever a kernel can (in fp32 on a CPU, where bf16 is slower), a preallocated
  KV cache, and document masking for packed sequences (Llama 3 paper, section 3.2: no attention
  across documents).
- SwiGLU feed-forward with Meta's hidden-size rule; pre-norm blocks; optional tied embeddings (3.2).
- Batched generation: greedy, temperature, top-k, top-p, stop tokens.
- `CONFIGS` with the official shapes and small presets; a documented initialization for training.
- Loading this project's checkpoints, Meta's `consolidated.*.pth` folders and Hugging Face folders
  without holding two copies of the weights; saving, and exporting to Hugging Face's layout. A file
  that cannot be read (damaged, truncated, not a plain tensor file) is refused naming the file.
"""

import dataclasses
import glob
import json
import math
import os
import pickle
import warnings
import zipfile
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from config import UserError  # a file that cannot be read is the user's to fix: one line, no traceback


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
# Attention, feed-forward, block


def attention(q, k, v, mask=None):
    """softmax(q k^T / sqrt(hd) + mask) v for q (B, H, T, hd) and k, v (B, H_kv, S, hd): each group
    of H / H_kv query heads reads the same key/value head. Causal when mask is None and T > 1."""
    if q.device.type != "cpu":
        return accelerator_attention(q, k, v, mask)
    # The CPU kernel reads the shared heads in place (enable_gqa), with or without a mask: against
    # copying them out per query head, 1.5-2.6x as fast with 6 / 2 heads and 0.9-1.5x with 32 / 8
    # at 256 tokens, 3-30x when decoding (measured on 2 busy cores). It runs in fp32 even under bf16
    # autocast: in bf16 its forward and backward are slower than in fp32 (2.2x at head_dim 32, 1.2x
    # at 64), and attention is a small share of a step's FLOPs.
    with torch.autocast("cpu", enabled=False):
        y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                           is_causal=mask is None and q.shape[2] > 1, enable_gqa=True)
    return y.type_as(q)


def accelerator_attention(q, k, v, mask=None):
    """attention() on CUDA (and MPS), where the kernel depends on the case. Copying the key/value
    heads out to one per query head costs a copy of the whole KV cache per layer and decoding step,
    so it is done only where no kernel reads shared heads in place."""
    B, H, T, hd = q.shape
    groups = H // k.shape[1]
    if mask is None and T == 1:
        # Decoding one token: the query heads of a group become rows of one query against their
        # shared head, (B, H, 1, hd) -> (B, H_kv, groups, hd). Any kernel, any dtype, no copy.
        return F.scaled_dot_product_attention(q.reshape(B, H // groups, groups, hd), k, v).reshape(B, H, 1, hd)
    if mask is None and q.dtype in (torch.float16, torch.bfloat16):
        return F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=True)  # flash attention
    # fp32 (the memory-efficient kernel) or a mask (no flash attention): kernels that need one
    # key/value head per query head.
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1)


class Attention(nn.Module):
    """Grouped-query attention: n_kv_heads key/value heads shared by groups of query heads."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
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
        y = attention(q, k, v, mask)  # (B, H, T, hd)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)

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
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
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


# ----------------------------------------------------------------------------------------------
# Checkpoints: this project's folders, Meta's folders and Hugging Face folders.
# Every reader yields the checkpoint's tensors one at a time under this project's names; the model
# is built on the meta device (no memory) and each tensor assigned as it arrives, so loading holds
# one copy of the weights, not two.

WEIGHTS, CONFIG = "model.safetensors", "config.json"
REPLACE = "replace it with an intact copy (or train the checkpoint again)"


def first_line(error, limit=160):
    """An exception's message cut to one short line (torch's and safetensors' run to paragraphs)."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def read_json(path):
    """A JSON object from a checkpoint's config.json, params.json or index; UserError if damaged."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({first_line(e)}); {REPLACE}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} holds a JSON {type(obj).__name__}, not an object of settings; {REPLACE}")
    return obj


def load_tensor_file(path):
    """A file of tensors saved by torch.save (Meta's consolidated.*.pth, train.py's train_state.pt),
    read with weights_only: a restricted unpickler that only rebuilds tensors and plain containers,
    so a file that would run code is refused rather than run. Zip-format files are memory-mapped."""
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing a file
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError:
        raise UserError(f"{path} is not a plain tensor file (it is damaged, or holds Python objects that only an "
                        f"unpickler that can run code would load, which this project never does); {REPLACE}") from None
    except (RuntimeError, EOFError, OSError) as e:  # a damaged or truncated archive
        raise UserError(f"{path} is damaged or truncated ({first_line(e)}); {REPLACE}") from None


def checkpoint_format(path):
    """'own', 'meta' or 'hf', from the files in the folder path."""
    if os.path.isfile(os.path.join(path, CONFIG)):
        return "own" if "model_args" in read_json(os.path.join(path, CONFIG)) else "hf"
    if os.path.isfile(os.path.join(path, "params.json")):
        return "meta"
    raise FileNotFoundError(
        f"{path} is not a checkpoint folder: it needs config.json (this project's or Hugging Face's) "
        "or params.json with consolidated.*.pth (Meta's)")


def read_checkpoint_meta(path):
    """The config.json of one of this project's checkpoint folders, without loading weights."""
    return read_json(os.path.join(path, CONFIG))


def model_args_from_dict(d, source="the settings"):
    """ModelArgs from a dict, ignoring keys this file does not know (newer params.json fields)."""
    known = {f.name for f in dataclasses.fields(ModelArgs)}
    try:
        return ModelArgs(**{k: v for k, v in d.items() if k in known})
    except TypeError:
        raise UserError(f"{source} gives a model setting of the wrong type (a shape that is not a number?); "
                        f"{REPLACE}") from None
    except ValueError as e:  # numbers that do not fit together
        raise UserError(f"{source} describes no valid model ({first_line(e)}); {REPLACE}") from None


def few(names, n=3):
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def load_weights(model, tensors, device, dtype, source="the checkpoint"):
    """Fill a model built on the meta device from (name, tensor) pairs in this project's names.

    Tensors are taken one at a time: each is moved to device, cast to dtype if floating, and
    assigned before the next is read (a layer quantized by quantize.py quantizes the float weight it
    receives). Weights that do not fit the model (missing, unexpected, or of another shape) are a
    UserError naming source and a few of them. Returns the model."""
    tied, unexpected = model.args.tie_word_embeddings, []
    for name, tensor in tensors:
        if tied and name == "output.weight":
            continue  # the output layer reads the embedding table: tied below
        module_name, _, attr = name.rpartition(".")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            unexpected.append(name)
            continue
        target = getattr(module, attr, None)
        if isinstance(target, torch.Tensor) and target.shape != tensor.shape:
            raise UserError(f"the weights in {source} do not fit its config ({name} has shape "
                            f"{tuple(tensor.shape)}, the model {tuple(target.shape)}); {REPLACE}")
        tensor = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else None)
        try:
            result = module.load_state_dict({attr: tensor}, strict=False, assign=True)
        except RuntimeError as e:  # a shape check of load_state_dict's own
            raise UserError(f"the weights in {source} do not fit its config ({name}: {first_line(e)}); "
                            f"{REPLACE}") from None
        unexpected += [name for _ in result.unexpected_keys]
        del tensor  # dropped before the next one is read (the readers drop theirs too)
    if tied:
        model.tie_weights()
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    # an int8 layer's scales come with its weight (quantize.py): name the weight alone
    missing = [n for n in missing if not (n.endswith(".scale") and n.removesuffix("scale") + "weight" in missing)]
    if missing or unexpected:
        raise UserError(f"the weights in {source} do not fit the model (missing: {few(missing) or 'none'}; "
                        f"unexpected: {few(unexpected) or 'none'}); {REPLACE}")
    model.init_rope()
    return model.to(device)


def _safetensors_entries(files):
    """(file, name, tensor) from .safetensors files, one tensor at a time. The file is reopened for
    each: while it is open, every page read from its memory map counts in this process's memory.
    A missing file is refused before anything is read, a damaged or truncated one naming it."""
    from safetensors import SafetensorError, safe_open
    for file in files:
        if not os.path.isfile(file):
            raise UserError(f"{file} is missing; copy the whole checkpoint folder")

    def read(file, key=None):  # the file's names, or one tensor
        try:
            with safe_open(file, framework="pt") as f:
                return list(f.keys()) if key is None else f.get_tensor(key)
        except SafetensorError as e:
            raise UserError(f"{file} is damaged or truncated ({first_line(e)}); {REPLACE}") from None

    def entries():
        for file in files:
            for key in read(file):
                tensor = read(file, key)
                yield file, key, tensor
                del tensor
    return entries()


def read_own(path):
    config = os.path.join(path, CONFIG)
    args = model_args_from_dict(read_json(config)["model_args"], config)
    return args, ((key, tensor) for _, key, tensor in _safetensors_entries([os.path.join(path, WEIGHTS)]))


def read_meta(path):
    """Meta's folder: params.json and consolidated.00.pth ... one shard per model-parallel rank.
    Sharded tensors are concatenated by Meta's layout: column-parallel layers (wq, wk, wv, w1, w3,
    output) and the vocabulary-parallel embedding on dim 0, row-parallel ones (wo, w2) on dim 1;
    norms are replicated. Key/value heads replicated across more shards than heads are de-duplicated.
    The shards are memory-mapped: pages read stay counted in this process's memory until loading ends."""
    params = read_json(os.path.join(path, "params.json"))
    files = sorted(glob.glob(os.path.join(path, "consolidated.*.pth")))
    if not files:
        raise FileNotFoundError(f"{path} has params.json but no consolidated.*.pth weights")
    shards = [load_tensor_file(f) for f in files]  # memory-mapped: no copy in RAM
    for f, shard in zip(files, shards):
        if not isinstance(shard, dict) or set(shard) != set(shards[0]):
            raise UserError(f"{f} does not hold the same tensors as {files[0]}; {REPLACE}")
    state = {}
    for key in shards[0]:
        parts = [s[key] for s in shards]
        if len(parts) == 1 or key.endswith("norm.weight"):
            state[key] = parts[0]
        elif key.endswith(("wo.weight", "w2.weight")):
            state[key] = torch.cat(parts, dim=1)
        else:
            state[key] = torch.cat(parts, dim=0)
    if "rope.freqs" in state:
        del state["rope.freqs"]  # Llama 2 era buffer, recomputed here
    tied = "output.weight" not in state
    # Meta's params.json omits the 3.2 scaling factor; its 1B and 3B (the tied ones) use 32.
    params.setdefault("tie_word_embeddings", tied)
    if tied and params.get("use_scaled_rope"):
        params.setdefault("rope_scaling_factor", 32.0)
    if "tok_embeddings.weight" not in state:
        raise UserError(f"{files[0]} holds no tok_embeddings.weight, so it is not a Llama checkpoint; {REPLACE}")
    params["vocab_size"] = state["tok_embeddings.weight"].shape[0]
    args = model_args_from_dict(params, os.path.join(path, "params.json"))
    kv_rows = args.n_kv_heads * args.head_dim
    for key in [k for k in state if k.endswith(("wk.weight", "wv.weight"))]:
        w = state[key]
        if w.shape[0] > kv_rows:  # each shard held a copy of its key/value heads
            reps = w.shape[0] // kv_rows
            state[key] = w.view(args.n_kv_heads, reps, args.head_dim, -1)[:, 0].reshape(kv_rows, -1)
    return args, state.items()


# Hugging Face's names for Meta's, per layer and at the top.
_HF_LAYER = {
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
    "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
}
_HF_TOP = {"model.embed_tokens": "tok_embeddings", "model.norm": "norm", "lm_head": "output"}


def _hf_permute(w, n_heads):
    """Meta's adjacent-pair rotary layout -> Hugging Face's rotate-half layout, for wq/wk rows."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _hf_unpermute(w, n_heads):
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_config_to_args(cfg):
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise ValueError("Llama checkpoints with attention or MLP biases are not supported")
    n_heads = cfg["num_attention_heads"]
    if cfg.get("head_dim") not in (None, cfg["hidden_size"] // n_heads):
        raise ValueError("head_dim must equal hidden_size / num_attention_heads")
    # Older configs keep rope_theta at the top and rope_scaling beside it; newer ones (transformers
    # 5) hold both in rope_parameters.
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise ValueError(f"rope type {rope_type!r} is not Llama 3's")
    args = dict(
        dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads", n_heads), vocab_size=cfg["vocab_size"],
        ffn_hidden_dim=cfg["intermediate_size"], norm_eps=cfg.get("rms_norm_eps", 1e-5),
        rope_theta=theta, max_seq_len=cfg.get("max_position_embeddings", 8192),
        tie_word_embeddings=cfg.get("tie_word_embeddings", False), use_scaled_rope=rope_type == "llama3",
    )
    if rope_type == "llama3":
        args.update(rope_scaling_factor=rope["factor"], rope_low_freq_factor=rope["low_freq_factor"],
                    rope_high_freq_factor=rope["high_freq_factor"],
                    rope_original_max_seq_len=rope["original_max_position_embeddings"])
    return ModelArgs(**args)


def read_hf(path):
    config = os.path.join(path, CONFIG)
    try:
        args = hf_config_to_args(read_json(config))
    except KeyError as e:
        raise UserError(f"{config} has no {e} entry, so it is neither this project's nor a Hugging Face "
                        f"Llama config; {REPLACE}") from None
    except (TypeError, ValueError) as e:
        raise UserError(f"{config} describes no model this file can build ({first_line(e)})") from None
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise UserError(f"{index} has no weight_map of tensor names to files; {REPLACE}")
        files = sorted({os.path.join(path, v) for v in weight_map.values()})
    else:
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"{path} has a Hugging Face config.json but no .safetensors weights")
    return args, _hf_tensors(_safetensors_entries(files), args)


def _hf_tensors(raw, args):
    """Hugging Face's (file, name, tensor) triples renamed to Meta's names, q/k rows un-permuted, one
    tensor at a time."""
    for file, key, w in raw:
        if key.startswith("model.layers."):
            i, _, rest = key.removeprefix("model.layers.").partition(".")
            module, _, param = rest.rpartition(".")
            if module not in _HF_LAYER:
                raise UserError(f"{file} holds {key!r}, which is no part of a Llama layer; this loader "
                                "reads Llama 3 checkpoints (LlamaForCausalLM) only")
            name = f"layers.{i}.{_HF_LAYER[module]}.{param}"
            if module == "self_attn.q_proj":
                w = _hf_unpermute(w, args.n_heads)
            elif module == "self_attn.k_proj":
                w = _hf_unpermute(w, args.n_kv_heads)
        else:
            module, _, param = key.rpartition(".")
            if module not in _HF_TOP:
                continue  # e.g. rotary inv_freq buffers saved by old versions
            name = f"{_HF_TOP[module]}.{param}"
        yield name, w
        del w


def _atomic_save_safetensors(tensors, path, metadata=None):
    from safetensors.torch import save_file
    tmp = path + ".tmp"
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
    os.replace(tmp, path)


def _atomic_write_json(obj, path):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def save_pretrained(model, path, extra=None):
    """This project's folder: model.safetensors (tied output stored once) + config.json."""
    os.makedirs(path, exist_ok=True)
    state = {k: v for k, v in model.state_dict().items()
             if not (model.args.tie_word_embeddings and k == "output.weight")}
    _atomic_save_safetensors(state, os.path.join(path, WEIGHTS), metadata={"format": "pt"})
    _atomic_write_json({"model_args": dataclasses.asdict(model.args), **(extra or {})},
                       os.path.join(path, CONFIG))


def export_hf(model, path, bos_token_id=None, eos_token_id=None):
    """A folder that transformers' LlamaForCausalLM.from_pretrained loads with the same logits."""
    a = model.args
    os.makedirs(path, exist_ok=True)
    cfg = dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=a.dim,
        num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads,
        head_dim=a.head_dim, intermediate_size=a.hidden_dim, vocab_size=a.vocab_size,
        rms_norm_eps=a.norm_eps, rope_theta=a.rope_theta, max_position_embeddings=a.max_seq_len,
        tie_word_embeddings=a.tie_word_embeddings, hidden_act="silu", attention_bias=False,
        mlp_bias=False, torch_dtype=str(model.tok_embeddings.weight.dtype).removeprefix("torch."),
        bos_token_id=bos_token_id, eos_token_id=eos_token_id,
        rope_scaling=None if not a.use_scaled_rope else dict(
            rope_type="llama3", factor=a.rope_scaling_factor, low_freq_factor=a.rope_low_freq_factor,
            high_freq_factor=a.rope_high_freq_factor,
            original_max_position_embeddings=a.rope_original_max_seq_len),
    )
    to_hf_layer = {v: k for k, v in _HF_LAYER.items()}
    to_hf_top = {v: k for k, v in _HF_TOP.items()}
    state = {}
    for name, w in model.state_dict().items():
        if name == "output.weight" and a.tie_word_embeddings:
            continue
        module, param = name.rsplit(".", 1)
        if module.startswith("layers."):
            _, i, sub = module.split(".", 2)
            if sub == "attention.wq":
                w = _hf_permute(w, a.n_heads)
            elif sub == "attention.wk":
                w = _hf_permute(w, a.n_kv_heads)
            key = f"model.layers.{i}.{to_hf_layer[sub]}.{param}"
        else:
            key = f"{to_hf_top[module]}.{param}"
        state[key] = w
    _atomic_save_safetensors(state, os.path.join(path, WEIGHTS), metadata={"format": "pt"})
    _atomic_write_json(cfg, os.path.join(path, CONFIG))


def read_checkpoint(path):
    """(ModelArgs, iterable of (name, tensor) in this project's names) of any checkpoint folder this
    project knows: its own, Meta's or Hugging Face's. Tensors are read as the iterable is consumed."""
    return {"own": read_own, "meta": read_meta, "hf": read_hf}[checkpoint_format(path)](path)


def empty_model(args):
    """A Transformer on the meta device: every shape, no memory, for load_weights to fill."""
    with torch.device("meta"):
        return Transformer(args)


def from_pretrained(path, device="cpu", dtype=torch.float32):
    """Load any checkpoint folder this project knows, holding one copy of the weights."""
    args, tensors = read_checkpoint(path)
    return load_weights(empty_model(args), tensors, device, dtype, source=path)


Transformer.from_pretrained = staticmethod(from_pretrained)
Transformer.save_pretrained = save_pretrained
Transformer.export_hf = export_hf
