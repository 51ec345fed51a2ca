"""checkpoint.py: this project's, Meta's and Hugging Face's folders load with the logits transformers
computes, exports load in transformers, a damaged folder is refused naming it, and an interrupted save
is completed or discarded whole."""

import json
import os

import pytest
import torch

from checkpoint import export_hf, finish_interrupted_save, load_model, save_model
from config import UserError
from test_model import tiny_model

transformers = pytest.importorskip("transformers")


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


# --- the training run folder ----------------------------------------------------------------

def test_an_interrupted_move_replaces_the_sharded_optimizer_folder_whole(tmp_path):
    # FSDP checkpoints hold a folder of optimizer shards; a save killed while moving files into
    # place leaves the new folder in .ckpt-ready/, and the next start puts it in place of the old.
    (tmp_path / "optimizer").mkdir()
    (tmp_path / "optimizer" / "shard-00003.safetensors").write_text("old")
    (tmp_path / ".ckpt-ready" / "optimizer").mkdir(parents=True)
    (tmp_path / ".ckpt-ready" / "optimizer" / "shard-00001.safetensors").write_text("new")
    (tmp_path / ".ckpt-ready" / "train_state.pt").write_text("new")
    finish_interrupted_save(str(tmp_path))
    assert os.listdir(tmp_path / "optimizer") == ["shard-00001.safetensors"]
    assert (tmp_path / "train_state.pt").read_text() == "new" and not (tmp_path / ".ckpt-ready").exists()
