"""extract.py: the extraction attack of Carlini et al. 2021 on the trained family of test_memorize."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import extract
import quantize
from checkpoint import save_model
from config import UserError
from test_distributed import free_port
from conftest import models_arg, train_to_memorize
from test_memorize import ROOT

pytestmark = pytest.mark.usefixtures("one_thread")


def attack_args(w, tmp, *extra):
    return [f"--data={w['data']}", models_arg(w), f"--out={tmp}", "--window=8", "--batch_size=4", *extra]


# --- the training-window index and the rankings ----------------------------------------------------

def test_extraction_precision_ranks_by_each_score():
    cols = {"log_ppl": np.array([1.0, 2.0, 3.0, 4.0]), "zlib_entropy": np.array([1.0, 100.0, 1.0, 1.0]),
            "reference_log_ppl": np.array([1.0, 1.0, 30.0, 1.0])}
    hits = np.array([False, True, True, False])
    p = extract.extraction_report(cols, hits, ks=(1, 2))
    assert p["perplexity"] == {"1": 0.0, "2": 0.5, "4": 0.5}
    assert p["zlib_ratio"]["1"] == 1.0  # row 1: 2 / 100
    assert p["reference_ratio"]["1"] == 1.0  # row 2: 3 / 30


# --- sampling ------------------------------------------------------------------------------------------

def test_the_attack_samples_from_the_sampler_and_scores_with_its_target(world):
    teacher, baseline, tok = world["models"]["teacher"], world["models"]["baseline"], world["tok"]
    ex = extract.extraction_samples(teacher, None, 4, 10, tok.bos_id, 1, 4, tok, 0,
                                    progress=False, sampler=baseline)  # top-k 1: the sampler's greedy tokens
    bos = torch.full((4, 1), tok.bos_id)
    np.testing.assert_array_equal(ex["tokens"], baseline.generate(bos, 10).numpy())
    with torch.no_grad():
        target_log_ppl = -extract.token_logprobs(teacher, torch.cat([bos, torch.from_numpy(ex["tokens"])], 1)).mean(1)
    np.testing.assert_allclose(ex["log_ppl"], target_log_ppl.numpy(), rtol=1e-6)


def test_quantize_int8_hands_the_attack_an_int8_copy_of_its_target_as_sampler(world, tmp_path, monkeypatch):
    seen = {}

    def spy(target, reference, n, length, *args, sampler=None, **kwargs):
        seen.update(target=target, reference=reference, sampler=sampler)
        return {"tokens": np.zeros((n, length), np.int64), "log_ppl": np.ones(n), "zlib_entropy": np.ones(n),
                "reference_log_ppl": np.ones(n)}

    monkeypatch.setattr(extract, "extraction_samples", spy)
    extract.main(attack_args(world, tmp_path / "x", "--samples=4", "--quantize=int8"))
    assert not quantize.is_quantized(seen["target"]) and quantize.is_quantized(seen["sampler"])
    assert seen["reference"] is not None and not quantize.is_quantized(seen["reference"])  # the baseline, fp32


# --- the command ---------------------------------------------------------------------------------------

def test_command_line_writes_the_attack_report(world, tmp_path):
    out = tmp_path / "attack"
    s = extract.main(attack_args(world, out, "--samples=6"))
    assert s["samples"] == 6 and s["target"] == "teacher" and s["reference"] == "baseline"
    assert s["length"] == world["rows"].shape[1] - 1 and set(s["precision"]) == {"perplexity", "zlib_ratio",
                                                                                  "reference_ratio"}
    lines = [json.loads(line) for line in open(out / "samples.jsonl")]
    assert len(lines) == 6 and sum(r["contains_training_window"] for r in lines) == s["hits"]
    assert "Extraction attack on teacher" in (out / "report.md").read_text()
    assert json.loads((out / "summary.json").read_text())["hits"] == s["hits"]


def test_samples_are_extracted_when_they_hold_a_training_window_and_not_otherwise(world, tmp_path):
    # A model trained on one row from BOS emits that row when sampled with top-k 1: every sample
    # holds a training window. One trained on rows that are not in the data emits none.
    rows = world["rows"]
    outside = rows.copy()
    outside[:, 1:] = (outside[:, 1:] + 97) % 256
    for name, trained_on, expected in (("in", rows[[0]], 4), ("out", outside[[0]], 0)):
        path = str(tmp_path / name)
        save_model(train_to_memorize(trained_on, seed=7), path, extra={"tokenizer_sha256": world["tok"].sha256})
        s = extract.main([f"--data={world['data']}", f"--models=teacher:{path}", f"--out={tmp_path / (name + '_r')}",
                          "--window=8", "--samples=4", "--top_k=1"])
        assert s["hits"] == expected and s["reference"] is None


def test_under_torchrun_the_attack_equals_one_process(world, tmp_path):
    args = attack_args(world, "{out}", "--samples=12")
    one = extract.main([a.format(out=tmp_path / "one") for a in args])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "extract.py", *[a.format(out=tmp_path / "two") for a in args]]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=240)
    assert (tmp_path / "two" / "samples.jsonl").read_bytes() == (tmp_path / "one" / "samples.jsonl").read_bytes()
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["precision"] == one["precision"]


def test_a_target_that_is_not_among_the_models_is_refused_before_any_work(world, tmp_path):
    with pytest.raises(UserError, match="--target=student_x is not one of the models"):
        extract.main(attack_args(world, tmp_path / "r", "--target=student_x"))
    assert not (tmp_path / "r").exists()
