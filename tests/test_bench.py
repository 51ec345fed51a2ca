"""bench.py: the checks it prints next to its timings hold on a tiny model, and its decoding bound
counts the bytes a step must read. (Its timings themselves are never asserted.)"""

import dataclasses
import re

import pytest
import torch

import bench
from config import UserError, parse_config
from model import ModelArgs, Transformer


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


def test_an_unknown_section_is_named_before_any_work():
    cfg = parse_config(bench.BenchConfig, ["--sections=training,decoding"])
    with pytest.raises(UserError, match="unknown decoding; pick from training, generation"):
        bench.bench(cfg)
