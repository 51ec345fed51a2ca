"""gpu_check.py, which no GPU has run yet: in its dry mode every part runs on the CPU with tiny shapes,
so that it cannot rot before a GPU is lent; its figures are not judged here, its plumbing is."""

import json
import os
import subprocess
import sys

import pytest
import torch

import gpu_check
from config import UserError
from model import ModelArgs, Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_dry_run_runs_every_part_and_records_each_figure(tmp_path):
    done = subprocess.run([sys.executable, "gpu_check.py", "--dry_run", f"--out={tmp_path}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["dry_run"] and results["torch"] == torch.__version__
    assert {p: r["status"] for p, r in results["parts"].items()} == dict.fromkeys(gpu_check.PARTS, "ok"), \
        {p: r.get("error", "")[-500:] for p, r in results["parts"].items()}
    for part, r in results["parts"].items():
        assert r["figures"] and r["commands"] and r["seconds"] > 0, part
        assert all(isinstance(f["value"], (int, float)) for f in r["figures"].values()), part
    figures = {k: f for r in results["parts"].values() for k, f in r["figures"].items()}
    # Where a figure has an exact answer even on tiny shapes, it is checked here as on a GPU.
    assert figures["memorize.py --generate: flags that disagree with greedy generation"]["value"] == 0
    assert figures["memorize.py: planted continuations found memorized"]["met"]
    assert all(f["value"] == 1.0 for k, f in figures.items() if "tokens equal to eager greedy" in k)
    assert "| memorize |" in (tmp_path / "results.md").read_text()


def test_the_static_cache_decoder_gives_the_tokens_of_model_generate():
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, multiple_of=32,
                                  max_seq_len=64))
    model.init_weights()
    prompt = torch.randint(0, 300, (3, 5))
    assert torch.equal(gpu_check.StaticDecoder(model.eval()).generate(prompt, 12), model.generate(prompt, 12))


def test_a_failing_part_keeps_the_other_parts_figures(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "part_llama32", lambda *a: 1 / 0)
    results = gpu_check.main(["--dry_run", f"--out={tmp_path}", "--parts=memorize,llama32"])
    assert results["parts"]["llama32"]["status"] == "failed" and "ZeroDivisionError" in results["parts"]["llama32"]["error"]
    assert results["parts"]["memorize"]["status"] == "ok" and results["parts"]["memorize"]["figures"]
    assert json.loads((tmp_path / "results.json").read_text())["parts"].keys() == {"memorize", "llama32"}


def test_without_a_gpu_the_real_check_stops_in_one_line_naming_the_dry_run(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the real check would run")
    with pytest.raises(UserError, match="pass --dry_run"):
        gpu_check.main([f"--out={tmp_path}"])
    with pytest.raises(UserError, match="unknown gpus"):
        gpu_check.main(["--dry_run", "--parts=gpus"])
