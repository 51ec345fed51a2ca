"""quantize.py: row-wise int8 weights that stay within their rounding of the float model, loaded one
tensor at a time, and the paper's choice of layers."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

import quantize
from checkpoint import export_hf, load_model, save_model
from model import ModelArgs, Transformer
from quantize import Int8Embedding, Int8Linear, dequantized_matmul, kernel_matmul, quantize_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
U_BF16 = 2.0 ** -8  # unit roundoff of bf16 (8 significant bits): |round(a) - a| <= U_BF16 |a|
U_FP32 = 2.0 ** -24


def rows_of_different_sizes(n=48, k=80, seed=0):
    """A matrix whose rows span six orders of magnitude, with a row of zeros."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.logspace(-4, 2, n)[:, None]
    w[5] = 0.0
    return w


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_weight_is_within_half_its_row_scale(dtype):
    w = rows_of_different_sizes().to(dtype)
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and scale.dtype == dtype and scale.shape == (w.shape[0],)
    err = (w.double() - q.double() * scale.double()[:, None]).abs()
    assert (err <= scale.double()[:, None] / 2).all()
    assert (q.abs().amax(1)[torch.arange(len(w)) != 5] == 127).all()  # each row uses the whole range
    assert (q[5] == 0).all()


def test_quantizing_in_row_chunks_equals_quantizing_at_once(monkeypatch):
    w = rows_of_different_sizes()
    whole = quantize_rows(w)
    monkeypatch.setattr(quantize, "CHUNK_ELEMENTS", 3 * w.shape[1] + 1)  # 3 rows a chunk, the last one short
    chunked = quantize_rows(w)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])


def test_int8_linear_equals_an_explicit_dequantize_then_matmul_within_rounding():
    """The reference is W_hat = q * scale formed explicitly, times x, in float64. For output n, with
    A_n = sum_k |x_k| |W_hat_nk| and y_n the reference, to first order (1% more covers the rest):

    - the CPU kernel (a few rows) rounds x and the scales to bf16 and its result to bf16, and
      accumulates in fp32: |error_n| <= U_BF16 A_n + K U_FP32 A_n + 2 U_BF16 |y_n|;
    - the bf16 matmul (many rows) rounds x to bf16 (q is exact in bf16), accumulates in fp32, rounds
      its result, the scale and the scaled result to bf16: |error_n| <= (U_BF16 + K U_FP32) A_n +
      3 U_BF16 |y_n|;
    - the matmul used off the CPU, in fp32 here, accumulates in fp32 and then scales:
      |error_n| <= K U_FP32 A_n + U_FP32 |y_n|."""
    w = rows_of_different_sizes()
    layer = Int8Linear.quantized(w)
    w_hat = layer.weight.double() * layer.scale.double()[:, None]
    K = w.shape[1]
    g = torch.Generator().manual_seed(1)
    for x, matmul, dtype, n_rounded in [
            (torch.randn(3, 5, K, generator=g), kernel_matmul, None, 2),  # 15 rows: the kernel
            (torch.randn(4, 16, K, generator=g), dequantized_matmul, torch.bfloat16, 3),  # 64: bf16 matmul
            (torch.randn(3, 5, K, generator=g), dequantized_matmul, torch.float32, None)]:  # off the CPU
        y, a = x.double() @ w_hat.T, x.double().abs() @ w_hat.abs().T
        out = matmul(x, layer.weight, layer.scale, *([dtype] if dtype else []))
        assert out.shape == (*x.shape[:-1], w.shape[0]) and out.dtype == torch.float32
        if dtype == torch.float32:
            bound = 1.01 * (K * U_FP32 * a + U_FP32 * y.abs())
            # and the product is W_hat's, not W's: their difference is far above this bound
            assert ((out.double() - x.double() @ w.double().T).abs() > 100 * bound).any()
        else:
            assert torch.equal(layer(x), out)  # the path Int8Linear takes on a CPU for these rows
            bound = 1.01 * ((U_BF16 + K * U_FP32) * a + n_rounded * U_BF16 * y.abs())
        assert ((out.double() - y).abs() <= bound).all()


def unit_gain_model(tied, seed=0):
    """A small model whose linear layers keep the size of what goes through them (std 1/sqrt(fan_in)),
    so that every layer's rounding reaches the logits."""
    torch.manual_seed(seed)
    m = Transformer(ModelArgs(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32,
                              max_seq_len=64, tie_word_embeddings=tied))
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=p.shape[-1] ** -0.5)
    return m.eval()


@pytest.mark.parametrize("tied", [False, True])
def test_quantized_logits_stay_within_the_error_the_row_scales_predict(tied):
    """Derivation. Rounding to nearest leaves each weight of row n off by e with |e| <= s_n / 2,
    spread evenly, so E[e^2] = s_n^2 / 12: matrix l's relative error, RMS(error) / RMS(W), is
    eps_l = sqrt(mean_n s_n^2 / 12) / RMS(W_l). A product W x with x independent of the errors
    carries the same relative error, and the bf16 matmul on a CPU adds the rounding of its input,
    its result and the scaled result (relative error uniform in +-U_BF16: variance U_BF16^2 / 3
    each). Through layers that keep the size of what passes (this model's init), independent
    relative errors add in quadrature, so the logits' relative RMS error is about
    sqrt(sum_l eps_l^2 + U_BF16^2 per matmul). The tolerance is twice that, for the gains of
    attention and SwiGLU around 1. An embedding table (tied: shared with the output layer) counts
    once per use."""
    model = unit_gain_model(tied)
    tokens = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(tokens)
        q = quantize.quantize(model)
        out = q(tokens)
    layers = [m for m in q.modules() if isinstance(m, (Int8Linear, Int8Embedding))]
    assert len(layers) == 4 * 7 + 1 + tied  # every linear layer, and the shared table when tied
    variance = 0.0
    for m in layers:
        w_hat = m.dequantized().double()
        variance += (m.scale.double() ** 2).mean() / 12 / w_hat.pow(2).mean()
        variance += U_BF16 ** 2 if isinstance(m, Int8Linear) else 0.0
    tolerance = 2 * variance.sqrt().item()
    error = ((out - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()
    assert 0 < error <= tolerance


def test_generate_runs_unchanged_on_a_quantized_model():
    """Greedy decoding with the KV cache equals recomputing the whole sequence each step, on the
    int8 model (a tied one: the embedding lookup reads the int8 table too)."""
    q = quantize.quantize(unit_gain_model(tied=True))
    prompt = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(3))
    out = q.generate(prompt, 12)
    seq = prompt
    with torch.no_grad():
        for _ in range(12):
            seq = torch.cat([seq, q(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq[:, 5:])


def test_the_papers_choice_keeps_attention_the_ends_and_the_output_layer():
    model = unit_gain_model(tied=False)
    q = quantize.quantize(model, layers="ffn", keep_ends=True)
    int8 = {n for n, m in q.named_modules() if isinstance(m, Int8Linear)}
    assert int8 == {f"layers.{i}.feed_forward.{w}" for i in (1, 2) for w in ("w1", "w2", "w3")}
    assert isinstance(q.layers[1].attention.wq, nn.Linear) and isinstance(q.output, nn.Linear)
    assert not isinstance(q.tok_embeddings, Int8Embedding)
    with pytest.raises(ValueError, match="layers is one of"):
        quantize.quantize(unit_gain_model(tied=False), layers="attention")
    with pytest.raises(ValueError, match="kind is one of"):
        quantize.quantize(unit_gain_model(tied=False), kind="int4")


@pytest.mark.parametrize("tied", [False, True])
def test_quantizing_while_loading_equals_quantizing_the_loaded_model(tmp_path, tied):
    model = unit_gain_model(tied)
    save_model(model, str(tmp_path / "own"))
    export_hf(model, str(tmp_path / "hf"))
    after = quantize.quantize(load_model(str(tmp_path / "own")))
    for folder in ("own", "hf"):
        loaded = quantize.from_pretrained(str(tmp_path / folder), "int8")
        assert loaded.state_dict().keys() == after.state_dict().keys()
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), after.state_dict().values()))
        if tied:
            assert loaded.output.weight is loaded.tok_embeddings.weight
            assert loaded.output.scale is loaded.tok_embeddings.scale
    half = quantize.from_pretrained(str(tmp_path / "own"), "int8", dtype=torch.bfloat16)
    assert half.norm.weight.dtype == half.layers[0].feed_forward.w1.scale.dtype == torch.bfloat16
    assert half(torch.zeros(1, 3, dtype=torch.long)).dtype == torch.bfloat16


CHILD = textwrap.dedent("""
    import json, sys, tempfile
    import checkpoint, model, quantize
    def status(field):
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith(field)).split()[1]) * 1024
    # Load a tiny checkpoint first: the libraries' own memory (safetensors, torch's meta kernels)
    # is then counted before the measurement, not in it.
    with tempfile.TemporaryDirectory() as tmp:
        args = model.ModelArgs(dim=16, n_layers=1, n_heads=2, vocab_size=32, multiple_of=16, max_seq_len=8)
        checkpoint.save_model(model.Transformer(args), tmp)
        quantize.from_pretrained(tmp, "int8")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak (VmHWM) to the memory in use now (VmRSS)
    before = status("VmRSS")
    m = quantize.from_pretrained(sys.argv[1], "int8")
    tensors = {id(t): t for t in [*m.parameters(), *m.buffers()]}.values()
    print(json.dumps({"grew": status("VmHWM") - before, "held": sum(t.numel() * t.element_size() for t in tensors)}))
""")


def test_loading_int8_holds_the_int8_model_and_about_one_checkpoint_tensor(tmp_path):
    """Peak resident memory (VmHWM) of a fresh process loading a 34M-parameter bf16 checkpoint with
    int8 weights and fp32 for the rest (as sample.py --quantize=int8 loads a Hugging Face folder)
    grows by at most the int8 model it ends with, plus the largest tensor of the checkpoint in bf16
    and in fp32 (its conversion), plus quantize_rows' two chunk temporaries and 8 MB for the
    allocator: about 73 MB, where the model in fp32 takes 137 MB. glibc is told to return every
    freed block above 64 KiB to the system, so freed memory it keeps for later does not count."""
    torch.manual_seed(0)
    args = ModelArgs(dim=512, n_layers=8, n_heads=8, n_kv_heads=2, vocab_size=8192, ffn_hidden_dim=2048,
                     max_seq_len=64, tie_word_embeddings=True)
    model = Transformer(args).to(torch.bfloat16)
    save_model(model, str(tmp_path))
    fp32_bytes = sum(p.numel() * 4 for p in model.parameters())
    largest = max(p.numel() for p in model.parameters())  # the embedding table
    del model
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(64 * 1024), PYTHONPATH=ROOT)
    result = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], env=env, capture_output=True,
                            text=True, check=True)
    measured = json.loads(result.stdout)
    assert measured["held"] < fp32_bytes / 3.5  # int8 weights, fp32 norms and scales
    bound = measured["held"] + largest * (2 + 4) + 2 * 4 * quantize.CHUNK_ELEMENTS + (8 << 20)
    assert measured["grew"] <= bound < 0.6 * fp32_bytes


# --- row-wise FP8 (the Llama 3 paper's serving format) -----------------------------------------------

def test_fp8_rows_keep_every_value_within_e4m3_rounding_of_its_row_scale():
    w = rows_of_different_sizes()
    q, scale = quantize.fp8_rows(w)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (w.shape[0], 1)
    back = q.float() * scale
    # e4m3 keeps 3 mantissa bits: a relative error of at most 2^-4 for normal numbers, and an
    # absolute one of at most half its smallest step, 2^-10 of the scale, below them
    assert ((back - w.float()).abs() <= torch.maximum(w.float().abs() * 2**-4, scale * 2**-10)).all()
    largest = q.float().abs().amax(1)
    assert largest[5] == 0 and torch.equal(largest[w.abs().amax(1) > 0], torch.full((w.shape[0] - 1,), 448.0))


def test_an_activation_outlier_saturates_at_the_bound_instead_of_flattening_its_row():
    x = torch.tensor([[0.01, -0.02, 0.03, 5000.0]])
    q, scale = quantize.fp8_rows(x, quantize.ACTIVATION_BOUND)
    back = (q.float() * scale)[0]
    assert scale.item() == pytest.approx(1200 / 448) and back[3] == pytest.approx(1200)
    unbounded = (lambda q, s: (q.float() * s)[0])(*quantize.fp8_rows(x))
    # Without the bound the outlier sets the scale: the smallest value vanishes, the others lose precision.
    assert unbounded[0] == 0 and ((back[:3] - x[0, :3]).abs() < (unbounded[:3] - x[0, :3]).abs()).all()


def test_fp8_linear_equals_the_dequantized_product():
    w = torch.randn(48, 80, generator=torch.Generator().manual_seed(0)) * 0.1
    layer = quantize.Fp8Linear.quantized(w)
    x = torch.randn(3, 5, 80, generator=torch.Generator().manual_seed(1))
    xq, xs = quantize.fp8_rows(x.reshape(-1, 80), quantize.ACTIVATION_BOUND)
    expected = ((xq.float() * xs) @ (layer.weight.float() * layer.scale).t()).to(torch.bfloat16).float()
    torch.testing.assert_close(layer(x).reshape(-1, 48), expected, rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(layer(x), x @ w.t(), rtol=0.1, atol=0.1)  # near the float product


def test_the_papers_fp8_choice_quantizes_the_middle_blocks_feed_forward_only(tmp_path):
    m = unit_gain_model(tied=False)
    q = quantize.quantized_copy(m, "fp8", layers="ffn", keep_ends=True)
    fp8 = sorted(name for name, mod in q.named_modules() if isinstance(mod, quantize.Fp8Linear))
    last = m.args.n_layers - 1
    assert fp8 == sorted(f"layers.{i}.feed_forward.{w}" for i in range(1, last) for w in ("w1", "w2", "w3"))
    assert isinstance(q.output, nn.Linear) and quantize.is_quantized(q)
    tokens = torch.randint(0, m.args.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (q(tokens) - m(tokens)).abs().max() < 0.05 * m(tokens).abs().max()
