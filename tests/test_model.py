"""model.py: shapes, official sizes, RoPE, attention as the formula and its fused kernels, masks, generation.
(Loading checkpoints, and logits equal to transformers': test_checkpoint.py.)"""

import math

import pytest
import torch
import torch.nn.functional as F

import model
from model import CONFIGS, ModelArgs, Transformer, doc_ids_from_bos, rope_frequencies, sample

def tiny_args(**kw):
    base = dict(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=300, multiple_of=32,
                max_seq_len=256)
    return ModelArgs(**{**base, **kw})


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    m = Transformer(tiny_args(**kw))
    m.init_weights()
    return m.eval()


# --- shapes -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, expected", [
    ("llama3-8b", 8_030_261_248), ("llama3.1-8b", 8_030_261_248), ("llama3-70b", 70_553_706_496),
    ("llama3.1-405b", 405_853_388_800), ("llama3.2-1b", 1_235_814_400), ("llama3.2-3b", 3_212_749_824),
])
def test_official_configs_have_the_published_parameter_counts(name, expected):
    with torch.device("meta"):
        m = Transformer(ModelArgs(**CONFIGS[name]))
    assert m.num_params() == expected


def test_model_args_accepts_meta_params_json():
    params = {"dim": 2048, "ffn_dim_multiplier": 1.5, "multiple_of": 256, "n_heads": 32, "n_kv_heads": 8,
              "n_layers": 16, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True,
              "vocab_size": 128256}
    args = ModelArgs(**params)
    assert args.hidden_dim == 8192 and args.head_dim == 64


def test_scaled_rope_frequencies_follow_metas_piecewise_rule():
    args = ModelArgs(dim=4096, n_heads=32, use_scaled_rope=True, rope_scaling_factor=8.0)
    got = rope_frequencies(args)
    base = [1.0 / (500000.0 ** (i / 128)) for i in range(0, 128, 2)]
    expected = []
    for f in base:  # the rule as the Llama 3.1 paper states it, one frequency at a time
        wavelen = 2 * math.pi / f
        if wavelen < 8192 / 4:
            expected.append(f)
        elif wavelen > 8192 / 1:
            expected.append(f / 8)
        else:
            s = (8192 / wavelen - 1) / (4 - 1)
            expected.append((1 - s) * f / 8 + s * f)
    assert torch.allclose(got, torch.tensor(expected), rtol=1e-5)
    assert got[0] == base[0] and not torch.allclose(got[-1], torch.tensor(base[-1]))


def test_forward_returns_logits_and_hidden_states():
    m = tiny_model()
    x = torch.randint(0, 300, (3, 17))
    assert m(x).shape == (3, 17, 300)
    h = m(x, return_hidden=True)
    assert h.shape == (3, 17, 64)
    assert torch.allclose(m.output(h), m(x), atol=1e-6)


def test_attention_is_causal():
    m = tiny_model()
    x = torch.randint(0, 300, (1, 20))
    y = x.clone()
    y[0, 15:] = (y[0, 15:] + 1) % 300
    assert torch.allclose(m(x)[0, :15], m(y)[0, :15], atol=1e-6)
    assert not torch.allclose(m(x)[0, 15:], m(y)[0, 15:], atol=1e-3)


def test_document_masking_makes_each_document_see_only_itself():
    bos = 7
    m = tiny_model()
    doc_a = torch.tensor([bos] + [11, 12, 13, 14, 15, 16])
    doc_b = torch.tensor([bos] + [21, 22, 23, 24, 25, 26, 27, 28])
    packed = torch.cat([doc_a, doc_b])[None]
    doc_ids = doc_ids_from_bos(packed, bos)
    with_mask = m(packed, doc_ids=doc_ids)
    alone = m(doc_b[None])
    # RoPE is relative, so the second document alone (from position 0) gives the same logits.
    assert torch.allclose(with_mask[0, len(doc_a):], alone[0], atol=1e-5)
    without_mask = m(packed)
    assert not torch.allclose(without_mask[0, len(doc_a):], alone[0], atol=1e-3)


def logits_of_every_attention_case(m):
    """fp32 logits of a prefill without a mask (causal), a packed prefill with document masking,
    decoding one token at a time against the KV cache, and three tokens at once after a cached
    prefix (a mask)."""
    x = torch.randint(0, 300, (3, 20), generator=torch.Generator().manual_seed(1))
    x[:, [0, 8]] = 7  # two documents per row
    out = {"prefill": m(x), "masked prefill": m(x, doc_ids=doc_ids_from_bos(x, 7))}
    m.setup_cache(3, 20)
    m.last_logits(x[:, :10], 0)
    out["decode"] = torch.stack([m.last_logits(x[:, t:t + 1], t) for t in range(10, 17)])
    out["tokens after a cache"] = m(x[:, 17:20], start_pos=17)
    m.clear_cache()
    return out


def test_attention_is_the_formula_softmax_of_scaled_scores_times_values():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 5, 8, generator=g) for h in (4, 2, 2))  # 4 query heads share 2 key/value heads
    got = model.attention(q, k, v)
    for head in range(4):
        kv = head // 2  # query heads 0, 1 read key/value head 0; heads 2, 3 head 1
        scores = q[:, head] @ k[:, kv].transpose(-1, -2) / math.sqrt(8)
        scores = scores.masked_fill(torch.ones(5, 5).triu(1).bool(), float("-inf"))  # no look ahead
        torch.testing.assert_close(got[:, head], scores.softmax(-1) @ v[:, kv])


def test_the_fused_kernels_give_the_formulas_logits_in_every_case(monkeypatch):
    m = tiny_model()  # 8 query heads, 2 key/value heads
    with torch.no_grad():
        monkeypatch.setattr(model, "FUSED_ATTENTION", False)
        expected = logits_of_every_attention_case(m)
        monkeypatch.setattr(model, "FUSED_ATTENTION", True)
        got = logits_of_every_attention_case(m)
        # The CUDA route (reading shared key/value heads in place where it can), run on the CPU.
        monkeypatch.setattr(model, "fused_attention", model.accelerator_attention)
        accelerator = logits_of_every_attention_case(m)
    for case in expected:
        torch.testing.assert_close(got[case], expected[case], rtol=1e-5, atol=1e-5, msg=case)
        torch.testing.assert_close(accelerator[case], expected[case], rtol=1e-5, atol=1e-5, msg=case)


def test_accelerator_attention_in_bf16_reads_shared_heads_like_the_formula():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 16, 32, generator=g) for h in (8, 2, 2))
    got = model.accelerator_attention(q.bfloat16(), k.bfloat16(), v.bfloat16())  # the flash attention route
    expected = model.attention(q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float())
    assert got.dtype == torch.bfloat16 and (got.float() - expected).abs().max() < 2e-2


# --- generation ---------------------------------------------------------------------------------

def test_kv_cache_greedy_generation_equals_full_recompute():
    m = tiny_model()
    prompt = torch.randint(0, 300, (3, 9))
    seq = prompt.clone()
    with torch.no_grad():
        for _ in range(25):  # no cache: run the whole sequence again for every new token
            seq = torch.cat([seq, m(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(m.generate(prompt, 25), seq[:, 9:])


def test_batched_generation_equals_one_row_at_a_time():
    m = tiny_model()
    prompt = torch.randint(0, 300, (4, 10))
    batched = m.generate(prompt, 20)
    for i in range(4):
        assert torch.equal(m.generate(prompt[i:i + 1], 20)[0], batched[i])


def test_stop_tokens_end_a_row_and_repeat_the_stop_token():
    m = tiny_model()
    prompt = torch.randint(0, 300, (2, 5))
    free = m.generate(prompt, 20)
    stop = int(free[0, 3])
    stopped = m.generate(prompt, 20, stop_tokens={stop})
    first = (free[0] == stop).nonzero()[0].item()
    assert torch.equal(stopped[0, :first + 1], free[0, :first + 1])
    assert (stopped[0, first:] == stop).all()


def test_sampling_is_reproducible_and_top_k_1_is_greedy():
    m = tiny_model()
    prompt = torch.randint(0, 300, (2, 5))
    a = m.generate(prompt, 15, temperature=1.0, generator=torch.Generator().manual_seed(3))
    b = m.generate(prompt, 15, temperature=1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert torch.equal(m.generate(prompt, 15, temperature=0.8, top_k=1), m.generate(prompt, 15))


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    picks = {int(sample(logits, 1.0, top_p=0.7, generator=g)) for _ in range(300)}
    assert picks == {0, 1}  # 0.5 alone is under 0.7; 0.5 + 0.3 covers it
    picks = {int(sample(logits, 1.0, top_k=3, generator=g)) for _ in range(300)}
    assert picks == {0, 1, 2}


def test_bf16_attention_with_wide_heads_on_a_cpu_gives_the_formulas_result():
    # head_dim 128 under bf16: on a CPU with AMX tiles the kernel runs in bf16 (faster there), on
    # others in fp32; either way the result is the formula's, within bf16 rounding.
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 24, 128, generator=g) for h in (8, 2, 2))
    got = model.fused_attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    expected = model.attention(q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float())
    assert got.dtype == torch.bfloat16 and (got.float() - expected).abs().max() < 2e-2


def test_one_bf16_row_goes_through_the_matrix_vector_kernel_with_the_general_products_numbers(monkeypatch):
    # Decoding one row with bf16 weights on a CPU with AMX takes torch.mv (model.Linear); every other
    # input, and every CPU without AMX, takes F.linear. Either way the result is the product's within
    # bf16 rounding.
    monkeypatch.setattr(model, "CPU_HAS_AMX", True)
    calls = []
    real_mv = torch.mv

    def recording_mv(*args):
        calls.append(args[0].shape)
        return real_mv(*args)

    monkeypatch.setattr(torch, "mv", recording_mv)
    g = torch.Generator().manual_seed(0)
    layer = model.Linear(96, 160)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(160, 96, generator=g))
    x = torch.randn(1, 1, 96, generator=g)
    plain = layer(x)  # fp32: F.linear
    assert calls == [] and torch.equal(plain, x @ layer.weight.t())
    layer = layer.bfloat16()
    one_row = layer(x.bfloat16())
    assert calls == [(160, 96)] and one_row.shape == (1, 1, 160) and one_row.dtype == torch.bfloat16
    exact = (x.bfloat16().double() @ layer.weight.double().t())
    assert (one_row.double() - exact).abs().max() <= 2 ** -7 * exact.abs().max()  # within bf16 rounding
    rows = layer(torch.cat([x, x]).bfloat16())  # two rows: the general product
    assert len(calls) == 1 and (rows.double() - exact).abs().max() <= 2 ** -7 * exact.abs().max()
    monkeypatch.setattr(model, "CPU_HAS_AMX", False)
    assert torch.equal(layer(x.bfloat16()), F.linear(x.bfloat16(), layer.weight)) and len(calls) == 1
