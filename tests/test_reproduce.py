"""make reproduce, end to end on a tiny corpus and tiny models: every file and key is produced, the
counts agree with the per-example records, and a rerun skips the steps whose inputs did not change."""

import json
import os
import subprocess

import numpy as np
import pytest

import report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SMALL = 'model = "tiny"\ndim = 32\nn_layers = 1\nn_heads = 4\nn_kv_heads = 2\nbatch_size = 8\nlr = 1e-2\n' \
        'min_lr = 1e-3\nwarmup_steps = 5\neval_interval = 0\nlog_interval = 5\ndtype = "fp32"\n'


def write_preset(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    letters = list("abcdefghijklmnopqrstuvwxyz")
    words = ["".join(rng.choice(letters, size=rng.integers(2, 8))) for _ in range(300)]
    for d in range(12):
        text = " ".join(rng.choice(words, size=900)) + "."
        (corpus / f"doc{d:02d}.txt").write_text(text)
    preset = tmp_path / "preset"
    preset.mkdir()
    (preset / "prepare.toml").write_text(
        f'input = "{corpus}"\nlayout = "examples"\nexample_len = 25\nmax_examples = 64\nvocab_size = 600\n'
        'val_fraction = 0.2\n')
    (preset / "teacher.toml").write_text(SMALL.replace("dim = 32", "dim = 64") + "epochs = 25\n")
    (preset / "baseline.toml").write_text(SMALL + "epochs = 25\n")
    (preset / "student.toml").write_text(SMALL + "epochs = 25\ntemperature = 2.0\nprefix_len = 8\n")
    (preset / "memorize.toml").write_text(
        "prefix_len = 8\nsuffix_len = 8\nbatch_size = 32\ngenerate = true\nextract_samples = 16\n"
        "classifier_trials = 5\nclassifier_min_positives = 2\n")
    return preset


def make(target, preset, tmp_path):
    cmd = ["make", target, f"PRESET={preset}", f"OUT={tmp_path}/out", f"DATA={tmp_path}/data/tiny"]
    return subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True, timeout=300).stdout


def test_make_reproduce_writes_a_consistent_report_and_skips_finished_steps(tmp_path):
    preset = write_preset(tmp_path)
    make("reproduce", preset, tmp_path)
    out = tmp_path / "out"
    for f in ["report.md", "summary.json", "headline.txt", "memorization/per_example.jsonl",
              "memorization/report.md", "memorization/memorization_rate.png"]:
        assert (out / f).is_file(), f
    s = json.loads((out / "summary.json").read_text())
    records = [json.loads(l) for l in open(out / "memorization" / "per_example.jsonl")]
    assert s["n_examples"] == len(records) == 64
    for name in ["teacher", "baseline", "student_soft", "student_hard"]:
        m = s["models"][name]
        assert m["memorized"] == sum(r[name]["memorized"] for r in records)
        assert m["memorization_rate"] == pytest.approx(m["memorized"] / 64)
        assert m["val_ppl"] > 1 and m["params"] > 0
    teacher_specific = [r for r in records if r["teacher"]["memorized"] and not r["baseline"]["memorized"]]
    assert s["teacher_specific"]["count"] == len(teacher_specific)
    assert s["teacher_specific"]["inherited_soft"] == sum(r["student_soft"]["memorized"] for r in teacher_specific)
    assert s["teacher_specific"]["inherited_hard"] == sum(r["student_hard"]["memorized"] for r in teacher_specific)
    assert "auc_mean" in s["classifier"] and "recall_mean" in s["classifier"]
    assert s["wall_seconds"] > 0
    assert s["models"]["teacher"]["params"] > s["models"]["baseline"]["params"]
    # Nothing changed, so a rerun only rewrites the report.
    again = make("reproduce", preset, tmp_path)
    assert "train.py" not in again and "distill.py" not in again and "memorize.py" not in again
    assert "report.py" in again


def test_findings_are_judged_from_the_numbers_not_picked():
    s = {"models": {"baseline": {"memorized": 30, "val_ppl": 10.0}, "student_soft": {"memorized": 10, "val_ppl": 12.0}},
         "easy": {"share_soft": 0.8}, "teacher_specific": {"count": 50, "inherited_soft": 0, "inherited_hard": 3},
         "classifier": {"auc_mean": 0.95, "auc_std": 0.01, "coefficients": {"zlib_entropy": {"mean": 1.5}}}}
    verdicts = {f["finding"]: f["reproduced"] for f in report.findings(s)}
    assert verdicts["the soft student memorizes less than the baseline"] is True
    assert verdicts["... at a better validation perplexity"] is False
    assert verdicts["what the student memorizes is 'easy' (memorized by teacher and baseline)"] is False
    assert verdicts["the soft student inherits under 1% of teacher-specific memorization"] is True
    assert verdicts["hard distillation inherits more teacher-specific examples than soft"] is True
    assert verdicts["low zlib entropy (compressible text) raises the risk"] is False
    s["teacher_specific"]["inherited_hard"] = 0  # neither student inherits any: the run cannot tell
    verdicts = {f["finding"]: f["reproduced"] for f in report.findings(s)}
    assert verdicts["hard distillation inherits more teacher-specific examples than soft"] is None


def test_every_preset_file_parses_with_its_scripts_settings():
    from config import parse_config
    from distill import DistillConfig
    from memorize import MemorizeConfig
    from prepare import PrepareConfig
    from train import TrainConfig
    kinds = {"prepare": PrepareConfig, "teacher": TrainConfig, "baseline": TrainConfig,
             "student": DistillConfig, "memorize": MemorizeConfig}
    presets = [os.path.join(ROOT, "configs", p) for p in os.listdir(os.path.join(ROOT, "configs"))]
    assert len(presets) >= 3
    for preset in presets:
        for kind, cls in kinds.items():
            parse_config(cls, ["--config", os.path.join(preset, f"{kind}.toml")])
