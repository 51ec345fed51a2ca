"""bench.py: the checks it prints next to its timings hold on a tiny model, and its decoding bound
counts the bytes a step must read. (Its timings themselves are never asserted.)"""

import dataclasses
import re

import pytest
import torch

import bench
from config import UserError, parse_config
from model import ModelArgs, Transformer
from quantize import quantized_copy


def test_bench_runs_and_its_correctness_checks_hold(capsys):
    pytest.importorskip("transformers")
    cfg = parse_config(bench.BenchConfig, ["--model=tiny", "--repeats=1", "--warmup=0", "--batch_size=2",
                                           "--seq_len=32", "--new_tokens=8", "--mem_examples=8",
                                           "--mem_batch_size=4", "--skip_memory"])
    bench.bench(cfg)
    out = capsys.readouterr().out
    # transformers loaded through export_hf computes our logits
    assert float(re.search(r"largest logit difference from ours ([0-9.e+-]+)", out).group(1)) < 1e-4
    # same greedy tokens at batch 1 and 8
    assert out.count("transformers generate 100%") == 2
    # every way of measuring memorization finds the 4 planted rows and only them
    assert out.count("4 of the 4 memorized rows found, 8 of 8 rows right") == 3
    for target in (">= 3x on a CPU", ">= 1.5x", "<= 1.15"):
        assert re.search(r"\d+\.\d\d  \(" + re.escape(target), out)
    assert re.findall(r"(\d+)% of the bandwidth bound", out)


def test_decode_bytes_counts_weights_once_and_the_cache_per_row_and_position():
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=100, max_seq_len=64)
    untied, tied = Transformer(args), Transformer(dataclasses.replace(args, tie_word_embeddings=True))
    table = args.vocab_size * args.dim * 4
    total = sum(p.numel() * 4 for p in untied.parameters())
    # untied: the embedding table is not read (one row per token is), the output matrix is
    assert bench.decode_bytes(untied, 1, 0) == total - table
    # tied: the one shared table is read by the output layer
    assert bench.decode_bytes(tied, 1, 0) == total - table
    # the cache: keys and values, per layer, row, KV head, head dimension and position
    per_position = 2 * args.n_layers * args.n_kv_heads * (args.dim // args.n_heads) * 4
    assert bench.decode_bytes(untied, 3, 10) - bench.decode_bytes(untied, 3, 0) == 3 * 10 * per_position
    # bf16 weights and cache: half the bytes
    assert bench.decode_bytes(untied.to(torch.bfloat16), 3, 10) * 2 == bench.decode_bytes(untied.float(), 3, 10)


def test_decode_bytes_counts_int8_weights_at_one_byte_and_their_row_scales():
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=100, max_seq_len=64)
    for tied in (False, True):
        model = Transformer(dataclasses.replace(args, tie_word_embeddings=tied))
        q = quantized_copy(model)
        linear = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
        rest = sum(p.numel() * 4 for p in model.parameters() if p.dim() == 1)  # the norms stay fp32
        # every matrix the step reads (the output layer's, shared with the embedding when tied):
        # one byte per weight and a 4-byte scale per row
        assert bench.decode_bytes(q, 1, 0) == rest + sum(w.numel() + w.shape[0] * 4 for w in linear)


def test_an_unknown_section_is_named_before_any_work():
    cfg = parse_config(bench.BenchConfig, ["--sections=training,decoding"])
    with pytest.raises(UserError, match="unknown decoding; pick from training, generation"):
        bench.bench(cfg)


def test_the_quality_section_asks_for_a_trained_model():
    with pytest.raises(UserError, match="pass --ckpt=out/<run> and --data=data/<name>"):
        bench.bench(parse_config(bench.BenchConfig, ["--sections=quality", "--skip_hf"]))
