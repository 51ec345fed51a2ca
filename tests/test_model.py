"""model.py: shapes, official sizes, parity with Hugging Face transformers, checkpoints, generation."""

import json
import math
import os

import pytest
import torch

import model
from checkpoint import export_hf, load_model, save_model
from config import UserError
from model import CONFIGS, ModelArgs, Transformer, doc_ids_from_bos, rope_frequencies, sample

transformers = pytest.importorskip("transformers")


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


# --- parity with the reference implementation ---------------------------------------------------

def hf_model(tmp_path, tie=False, factor=None, seed=0):
    rope = None if factor is None else dict(rope_type="llama3", factor=factor, low_freq_factor=1.0,
                                            high_freq_factor=4.0, original_max_position_embeddings=32)
    cfg = transformers.LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=256, rope_theta=500000.0, rope_scaling=rope,
        rms_norm_eps=1e-5, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path)
    return hf


@pytest.mark.parametrize("tie, factor", [(False, None), (False, 8.0), (True, 32.0)])
def test_logits_and_greedy_generation_match_transformers(tmp_path, tie, factor):
    hf = hf_model(tmp_path, tie=tie, factor=factor)
    ours = load_model(str(tmp_path)).eval()
    assert ours.args.tie_word_embeddings == tie and ours.args.use_scaled_rope == (factor is not None)
    x = torch.randint(0, 300, (2, 150))  # longer than the original context, so scaling matters
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, ours(x), atol=1e-4)
        prompt = x[:, :12]
        theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=40,
                             do_sample=False, pad_token_id=0)[:, 12:]
    assert torch.equal(ours.generate(prompt, 40), theirs)


def test_export_hf_loads_in_transformers_with_the_same_logits(tmp_path):
    for tie in (False, True):
        m = tiny_model(tie_word_embeddings=tie, use_scaled_rope=True, rope_original_max_seq_len=32)
        path = tmp_path / f"hf{tie}"
        export_hf(m, str(path))
        hf = transformers.LlamaForCausalLM.from_pretrained(str(path)).eval()
        x = torch.randint(0, 300, (2, 100))
        with torch.no_grad():
            assert torch.allclose(hf(x).logits, m(x), atol=1e-4)


def test_newer_rope_parameters_config_key_loads_the_same_model(tmp_path):
    hf_model(tmp_path, factor=8.0)
    old = load_model(str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    rope = cfg.pop("rope_scaling")
    cfg["rope_parameters"] = {**rope, "rope_theta": cfg.pop("rope_theta")}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    new = load_model(str(tmp_path))
    assert new.args == old.args
    x = torch.randint(0, 300, (1, 50))
    assert torch.equal(new(x), old(x))


def test_sharded_hf_folder_with_index_loads(tmp_path):
    hf = hf_model(tmp_path / "one")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    a = load_model(str(tmp_path / "one"))
    b = load_model(str(tmp_path / "sharded"))
    x = torch.randint(0, 300, (1, 30))
    assert torch.equal(a(x), b(x))


# --- Meta's and this project's folders ----------------------------------------------------------

def write_meta_folder(m, path, n_shards, replicate_kv=False):
    """Split m's weights the way Meta's model-parallel checkpoints are laid out."""
    os.makedirs(path)
    a = m.args
    params = {k: getattr(a, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size",
                                          "multiple_of", "ffn_dim_multiplier", "norm_eps", "rope_theta")}
    params["use_scaled_rope"] = a.use_scaled_rope
    (path / "params.json").write_text(json.dumps(params))
    shards = [{} for _ in range(n_shards)]
    for k, v in m.state_dict().items():
        if k == "output.weight" and a.tie_word_embeddings:
            continue
        if k.endswith("norm.weight"):
            parts = [v] * n_shards
        elif k.endswith(("wo.weight", "w2.weight")):
            parts = v.chunk(n_shards, dim=1)
        elif replicate_kv and k.endswith(("wk.weight", "wv.weight")):
            # more shards than key/value heads: each shard holds a copy of one head
            heads = v.view(a.n_kv_heads, a.head_dim, -1)
            per = n_shards // a.n_kv_heads
            parts = [heads[i // per] for i in range(n_shards)]
        else:
            parts = v.chunk(n_shards, dim=0)
        for s, p in zip(shards, parts):
            s[k] = p.clone()
    for i, s in enumerate(shards):
        torch.save(s, path / f"consolidated.{i:02d}.pth")


@pytest.mark.parametrize("n_shards, replicate_kv", [(1, False), (2, False), (4, True)])
def test_meta_folder_loads_with_shards_concatenated(tmp_path, n_shards, replicate_kv):
    m = tiny_model(n_kv_heads=2 if not replicate_kv else 2)
    write_meta_folder(m, tmp_path / "meta", n_shards, replicate_kv)
    loaded = load_model(str(tmp_path / "meta"))
    x = torch.randint(0, 300, (2, 40))
    assert torch.equal(loaded(x), m(x))


def test_meta_folder_of_a_tied_model_gets_llama32_scaling(tmp_path):
    m = tiny_model(tie_word_embeddings=True, use_scaled_rope=True, rope_scaling_factor=32.0)
    write_meta_folder(m, tmp_path / "meta", 1)
    loaded = load_model(str(tmp_path / "meta"))
    assert loaded.args.tie_word_embeddings and loaded.args.rope_scaling_factor == 32.0


def test_own_checkpoint_round_trips_and_stores_tied_weights_once(tmp_path):
    from safetensors import safe_open
    m = tiny_model(tie_word_embeddings=True)
    save_model(m, str(tmp_path), extra={"note": "x"})
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert "output.weight" not in f.keys()
    loaded = load_model(str(tmp_path))
    assert loaded.output.weight is loaded.tok_embeddings.weight
    x = torch.randint(0, 300, (2, 20))
    assert torch.equal(loaded(x), m(x))
    assert json.loads((tmp_path / "config.json").read_text())["note"] == "x"


def test_loading_in_bf16_gives_bf16_parameters(tmp_path):
    save_model(tiny_model(), str(tmp_path))
    m = load_model(str(tmp_path), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    assert m.rope_cos.dtype == torch.float32


def test_a_folder_without_weights_is_refused(tmp_path):
    with pytest.raises(UserError, match="is not a checkpoint folder: it needs config.json"):
        load_model(str(tmp_path))


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
