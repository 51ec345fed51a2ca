"""
Row-wise quantization of a Transformer's linear layers for decoding: int8 weights, or FP8 weights and
activations as the Llama 3 paper serves 405B.

- Why: decoding at a small batch reads every weight once per token, so the bytes of the weights
  bound its speed. int8 weights with one scale per output row are 4x fewer bytes than fp32 and 2x
  fewer than bf16; the activations stay in floating point (weight-only). How much faster that makes
  decoding depends on the kernel: on the project's earlier 2-core test VM (AMD EPYC, Zen 4) it
  multiplies 15 G int8 weights/s against 8.4 G fp32 ones, so 1.9x on the Llama 3.2 1B shape and
  nothing on the small bench shape, where per-operation overhead dominates (README, "Decoding with
  int8 weights").
- Row-wise: scale = max |row| / 127 and q = round(w / scale), so each weight is off by at most
  scale / 2; the scale absorbs rows of very different sizes (Llama 3 paper, section 6.2, computes
  its FP8 scale factors across rows for the same reason).
- On a CPU, decoding's few rows go through PyTorch's int8 weight-only kernel with the activations
  in bf16 (its fast path; with fp32 activations it runs 14-48x slower on that AMD EPYC VM), and a
  prefill's many rows through one bf16 matmul on the weight converted to bf16.
  Elsewhere the int8 weight is converted to the activations' dtype and multiplied, then each output
  scaled: memory is saved there, not time. (CUDA has the int8 kernel too: untested here, no GPU.)
- The paper's choices are options of `quantize`: `layers="ffn"` quantizes the feed-forward layers
  only, leaving self-attention in the model's dtype, and `keep_ends=True` leaves the first and
  last blocks and the output layer unquantized ("akin to Zhang et al. (2021), we do not perform
  quantization in the first and last Transformer layers"). Together they are the paper's choice of
  what to quantize. With tied embeddings (Llama 3.2) a quantized output layer shares its int8 table
  with the embedding lookup.
- `from_pretrained` quantizes while loading, one tensor at a time, so memory never holds the whole
  model in floating point; `quantized_copy` does the same from a model already in memory.

- The paper's own scheme, `kind="fp8"`: weights *and* activations in float8 e4m3 with one scale per
  row (a weight's output row, an activation's token), the activations' scales computed on the fly
  from each row's largest magnitude, bounded above by 1200 ("we upper bound the dynamic scaling
  factors to 1200"), and the product through `torch._scaled_mm` (Hopper GPUs; PyTorch's CPU kernel
  computes the same, slowly). Only feed-forward layers, as the paper does: `layers="ffn"`.

    model = quantize(load_model("out/small"))                                   # every linear layer
    model = quantize(load_model("out/small"), layers="ffn", keep_ends=True)      # the paper's choice
    model = from_pretrained("path/Llama-3.2-1B", "int8", dtype=torch.bfloat16)  # while loading
    model = quantize(model, "fp8", layers="ffn", keep_ends=True)                  # Llama 3's FP8 (GPU)
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import empty_model, load_model, load_weights

KINDS = ("none", "int8", "fp8")
LAYERS = ("all", "ffn")
CHUNK_ELEMENTS = 1 << 20  # rows are quantized in chunks of about this many weights (4 MB in fp32)
# The CPU kernel works one input row at a time (about 0.2 ms per row on an 8192 x 2048 weight, 2
# threads of the AMD EPYC VM); converting the weight to bf16 for one bf16 matmul costs about 10 ms
# whatever the rows: from about 50 rows (a prefill, a perplexity evaluation) the conversion is faster.
KERNEL_MAX_ROWS = 48


def quantize_rows(w):
    """(q, scale) for a float matrix w (N, K): q int8 (N, K) and scale (N,) in w's dtype, with
    |w - q * scale| <= scale / 2 for every weight. Row chunks bound the temporaries."""
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty(w.shape[0], dtype=w.dtype, device=w.device)
    step = max(1, CHUNK_ELEMENTS // max(1, w.shape[1]))
    for i in range(0, w.shape[0], step):
        rows = w[i:i + step].float()
        # The scale as stored (rounded to w's dtype) is the one q is computed with, so the bound
        # holds for it; a row of zeros gets scale 1 (any scale gives q = 0).
        s = (rows.abs().amax(1) / 127).to(w.dtype).float()
        s = torch.where(s > 0, s, torch.ones_like(s))
        q[i:i + step] = (rows / s[:, None]).round_().clamp_(-127, 127)
        scale[i:i + step] = s
    return q, scale


class QuantizedRows(nn.Module):
    """A weight (N, K) stored in a low-precision dtype with one scale per row, as `quantize_rows`
    (int8) or `fp8_rows` makes them. Loading a float `weight` into it (as model.load_weights does,
    or load_state_dict) quantizes it on the way in."""
    stored = None  # the weight's dtype once quantized

    def __init__(self, weight, scale):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.register_buffer("scale", scale)
        self.register_load_state_dict_pre_hook(self._quantize_on_load)

    @staticmethod
    def rows(w):
        """(q, scale) of a float matrix w."""
        raise NotImplementedError

    @classmethod
    def quantized(cls, float_weight):
        return cls(*cls.rows(float_weight.detach()))

    @staticmethod
    def _quantize_on_load(module, state_dict, prefix, *_):
        w = state_dict.get(prefix + "weight")
        if w is not None and w.dtype != module.stored:
            state_dict[prefix + "weight"], state_dict[prefix + "scale"] = module.rows(w)


class Int8Rows(QuantizedRows):
    """An int8 weight (N, K) and one scale per row (N,), in the model's dtype."""
    stored = torch.int8
    rows = staticmethod(quantize_rows)

    def dequantized(self):
        return self.weight.to(self.scale.dtype) * self.scale[:, None]


def kernel_matmul(x, q, scale):
    """x (..., K) times (q * scale[:, None])^T through PyTorch's CPU int8 weight-only kernel, which
    takes 2-D bf16 rows: the activations are rounded to bf16 and the result returned in x's dtype."""
    rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()
    y = torch.ops.aten._weight_int8pack_mm(rows, q, scale.to(torch.bfloat16))
    return y.view(*x.shape[:-1], -1).to(x.dtype)


def dequantized_matmul(x, q, scale, dtype):
    """The same product through a copy of the weight converted to dtype, returned in x's dtype:
    scaling each output after the matmul equals scaling each row of the weight before it."""
    return (F.linear(x.to(dtype), q.to(dtype)) * scale.to(dtype)).to(x.dtype)


class Int8Linear(Int8Rows):
    """y = x W^T with W = q * scale[:, None]: x (..., K) -> (..., N) in x's dtype. On a CPU, the int8
    kernel for a few rows (decoding) and a bf16 matmul for many (prefill); elsewhere x's dtype."""

    def forward(self, x):
        if x.device.type != "cpu":
            return dequantized_matmul(x, self.weight, self.scale, x.dtype)
        if x.numel() <= KERNEL_MAX_ROWS * x.shape[-1]:
            return kernel_matmul(x, self.weight, self.scale)
        return dequantized_matmul(x, self.weight, self.scale, torch.bfloat16)


class Int8Embedding(Int8Rows):
    """The embedding lookup from an int8 table: each looked-up row times its scale, in the scale's
    dtype (the model's). A tied output layer (Llama 3.2) shares the table and its scales."""

    def forward(self, tokens):
        return F.embedding(tokens, self.weight).to(self.scale.dtype) * self.scale[tokens, None]


# ----------------------------------------------------------------------------------------------
# Row-wise FP8 (Llama 3 paper, section 6.2)

FP8_MAX = 448.0  # the largest float8 e4m3 number
ACTIVATION_BOUND = 1200.0  # the paper's upper bound on an activation row's scaling magnitude


def fp8_rows(x, bound=None):
    """(q, scale) with q float8 e4m3 (N, K) and scale fp32 (N, 1), q * scale ~ x (N, K): each row is
    divided by its largest magnitude (bounded above by `bound`, so that one outlier token does not
    flatten the rest of its row to zero) over 448, then rounded to e4m3 (3 mantissa bits)."""
    amax = x.detach().abs().amax(-1, keepdim=True).float()
    if bound is not None:
        amax = amax.clamp(max=bound)
    scale = amax.clamp(min=1e-12) / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


class Fp8Linear(QuantizedRows):
    """y = x W^T with W in float8 e4m3 and one scale per output row, and x quantized the same way per
    token at every call (dynamic scales); the product in float8 with fp32 accumulation
    (torch._scaled_mm), returned in x's dtype."""
    stored = torch.float8_e4m3fn
    rows = staticmethod(fp8_rows)

    def forward(self, x):
        rows, scale = fp8_rows(x.reshape(-1, x.shape[-1]), ACTIVATION_BOUND)
        y = torch._scaled_mm(rows, self.weight.t(), scale_a=scale, scale_b=self.scale.t(), out_dtype=torch.bfloat16)
        return y.view(*x.shape[:-1], -1).to(x.dtype)


def chosen_layers(model, layers="all", keep_ends=False):
    """Names of the linear layers `quantize` converts (see the module docstring for the options)."""
    if layers not in LAYERS:
        raise ValueError(f"layers is one of {', '.join(LAYERS)}, not {layers!r}")
    kept_blocks = {0, model.args.n_layers - 1} if keep_ends else set()
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if name == "output":
            if layers == "all" and not keep_ends:
                names.append(name)
            continue
        block = int(name.split(".")[1])  # layers.<i>.attention.wq, layers.<i>.feed_forward.w1, ...
        if block not in kept_blocks and (layers == "all" or ".feed_forward." in name):
            names.append(name)
    return names


def quantize(model, kind="int8", layers="all", keep_ends=False):
    """Convert a Transformer's linear layers to row-wise int8 (or fp8) in place and return it; works
    on a model built on the meta device too (then each layer quantizes the weight it is loaded with).
    With tied embeddings (Llama 3.2) a quantized int8 output layer takes the embedding with it: both
    read one int8 table; fp8 leaves the output layer as it is. kind: "int8", "fp8", or "none" to
    leave the model as it is."""
    if kind not in KINDS:
        raise ValueError(f"kind is one of {', '.join(KINDS)}, not {kind!r}")
    if kind == "none":
        return model
    layer = {"int8": Int8Linear, "fp8": Fp8Linear}[kind]
    for name in chosen_layers(model, layers, keep_ends):
        if kind == "fp8" and name == "output":
            continue  # its float8 product would need the embedding table in float8 too
        parent, _, child = name.rpartition(".")
        linear = model.get_submodule(name)
        setattr(model.get_submodule(parent) if parent else model, child, layer.quantized(linear.weight))
    if model.args.tie_word_embeddings and isinstance(model.output, Int8Linear):
        model.tok_embeddings = Int8Embedding(model.output.weight.data, model.output.scale)
        model.tie_weights()
    return model


def is_quantized(model):
    return any(isinstance(m, QuantizedRows) for m in model.modules())


def from_pretrained(path, kind="int8", device="cpu", dtype=torch.float32, layers="all", keep_ends=False):
    """A checkpoint folder (any format checkpoint.load_model reads) quantized as it is read: the
    layers are converted on the empty model, then each tensor is loaded (and quantized) in turn, so
    memory holds the quantized model and about one tensor of the checkpoint at most."""
    return load_model(path, device, dtype, build=lambda args: quantize(empty_model(args), kind, layers, keep_ends))


def quantized_copy(model, kind="int8", layers="all", keep_ends=False):
    """A quantized copy of a model in memory, built tensor by tensor (never two float copies)."""
    p = model.norm.weight
    tensors = model.state_dict().items()
    return load_weights(quantize(empty_model(model.args), kind, layers, keep_ends), tensors, p.device, p.dtype)
