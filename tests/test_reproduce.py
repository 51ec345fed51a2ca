"""make reproduce and make robustness, end to end on a tiny corpus and tiny models: every file and
key is produced, the counts agree with the per-example records and the training logs, the k-of-n
table agrees with the per-seed summaries, and a rerun skips the steps whose inputs did not change."""

import json
import os
import subprocess

import numpy as np

import report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHAPE = 'model = "tiny"\ndim = 32\nn_layers = 1\nn_heads = 4\nn_kv_heads = 2\ndtype = "fp32"\n'
TUNE = 'batch_size = 8\nlr = 1e-2\nmin_lr = 1e-3\nwarmup_steps = 5\neval_interval = 0\nlog_interval = 5\n' \
       'dtype = "fp32"\nmem_every = 10\nmem_prefix_len = 8\nmem_suffix_len = 8\n'


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
        f'input = "{corpus}"\nlayout = "examples"\nexample_len = 25\nmax_examples = 48\nvocab_size = 600\n'
        'val_fraction = 0.2\npart = "finetune"\nfinetune_fraction = 0.5\nrepeats = "4:4,8:4"\n')
    (preset / "prepare_base.toml").write_text('layout = "packed"\npart = "pretrain"\nrepeats = ""\n')
    for size, dim in (("teacher", 64), ("student", 32)):
        (preset / f"base_{size}.toml").write_text(SHAPE.replace("dim = 32", f"dim = {dim}") + "seq_len = 32\n"
                                                  "batch_size = 8\nmax_steps = 20\nwarmup_steps = 5\n")
    (preset / "teacher.toml").write_text(TUNE + "epochs = 20\n")
    (preset / "baseline.toml").write_text(TUNE + "epochs = 20\n")
    (preset / "student.toml").write_text(TUNE + "epochs = 20\ntemperature = 2.0\nprefix_len = 8\n")
    (preset / "memorize.toml").write_text(
        "prefix_len = 8\nsuffix_len = 8\nbatch_size = 32\ngenerate = true\n"
        "classifier_trials = 5\nclassifier_min_positives = 2\n")
    (preset / "extract.toml").write_text("samples = 16\nwindow = 8\nbatch_size = 8\n")
    return preset


def make(target, preset, tmp_path, *args):
    cmd = ["make", target, f"PRESET={preset}", f"DATA={tmp_path}/data/tiny", f"BASE_DATA={tmp_path}/data/tiny_base",
           f"BASES={tmp_path}/bases", f"ROBUSTNESS={tmp_path}/robustness", f"OUT={tmp_path}/reproduce", "SEEDS=2",
           *args]
    # A fresh top-level make, as a user's: under `make test` the outer make's settings would make this
    # one a sub-make without job slots, and the steps would run one at a time instead of side by side.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    return subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True, timeout=600, env=env).stdout


def records(folder):
    with open(folder / "memorization" / "per_example.jsonl") as f:
        return [json.loads(line) for line in f]


def test_make_robustness_runs_three_consistent_families_and_tallies_each_finding(tmp_path):
    preset = write_preset(tmp_path)
    checkout_out = os.path.join(ROOT, "out", "reproduce")
    was_there = os.path.exists(checkout_out)
    make("robustness", preset, tmp_path, "FAMILY_SEEDS=1 2 3")
    assert os.path.exists(checkout_out) == was_there  # everything went to the folders it was given
    root = tmp_path / "robustness"
    summaries = {}
    for k in (1, 2, 3):
        out = root / f"seed{k}"
        for f in ["report.md", "summary.json", "headline.txt", "memorization/per_example.jsonl",
                  "memorization/report.md", "extraction/summary.json", "extraction/samples.jsonl"]:
            assert (out / f).is_file(), f"seed{k}/{f}"
        s = summaries[f"seed{k}"] = json.loads((out / "summary.json").read_text())
        rows = records(out)
        # 48 distinct examples, of which 8 were planted 4 or 8 times: 48 + 4 * 3 + 4 * 7 rows.
        assert s["n_examples"] == len(rows) == 48 and s["n_rows"] == 88 and s["copies"] == {"1": 40, "4": 4, "8": 4}
        for name in ["base_teacher", "base_student", "teacher", "baseline", "baseline_seed2", "student_soft",
                     "student_hard"]:
            m = s["models"][name]
            assert m["memorized"] == sum(r[name]["memorized"] for r in rows) and m["val_ppl"] > 1
            # The preset decodes every suffix too: greedy decoding and the one-pass flag agree everywhere.
            assert m["flag_disagreements"] == 0 and m["generated_memorized"] == m["memorized"]
        specific = [r for r in rows if r["teacher"]["memorized"] and not (r["baseline"]["memorized"]
                                                                          or r["baseline_seed2"]["memorized"])]
        assert s["teacher_specific"]["count"] == len(specific)
        assert s["natural"]["n_examples"] == 40
        assert s["natural"]["models"]["teacher"]["memorized"] == sum(r["teacher"]["memorized"] for r in rows
                                                                     if r["copies"] == 1)
        # The training log's last memorization row is the flag memorize.py measured on the final model.
        last = [json.loads(line) for line in open(out / "baseline" / "log.jsonl")
                if '"memorization"' in line][-1]
        assert sorted(last["indices"]) == sorted(r["index"] for r in rows if r["baseline"]["memorized"])
        assert [p["epoch"] for p in s["dynamics"]["curves"]["teacher"]] == [0, 10, 20]
        seeds = json.loads((out / "baseline" / "config.json").read_text())["train_config"]["seed"]
        assert seeds == int(f"{k}1")  # family k's first baseline
        assert {r["condition"] for r in s["regime"]} and all(isinstance(r["met"], bool) for r in s["regime"])
    # The temperature sweep and filtering ran on the first seed only, and its report judged them.
    assert summaries["seed1"]["sweep"]["students"].keys() == {"T=1", "T=2", "T=3", "T=4"}
    assert summaries["seed1"]["filtering"] is not None and summaries["seed2"]["filtering"] is None
    assert not (root / "seed2" / "sweep").exists()
    agg = json.loads((root / "summary.json").read_text())
    assert agg["findings"].keys() >= {"less", "perplexity", "easy", "inherited", "hard_over_soft", "auc", "zlib",
                                      "temperature", "filtering"}
    for key, row in agg["findings"].items():
        verdicts = [f["reproduced"] for label in summaries for f in summaries[label]["findings"] if f["key"] == key]
        assert row["holds"] == verdicts.count(True) and row["judged"] == sum(v is not None for v in verdicts)
        assert row["of"] == len(verdicts) == (1 if key in ("temperature", "filtering") else 3)
    table = (root / "report.md").read_text()
    assert "holds in" in table and all(f"[seed{k}](seed{k}/report.md)" in table for k in (1, 2, 3))
    assert s["extraction"]["samples"] == 16 and "## Extraction attack" in (root / "seed1" / "report.md").read_text()
    # Nothing changed, so a rerun only rewrites the reports.
    again = make("robustness", preset, tmp_path, "FAMILY_SEEDS=1 2 3")
    assert "train.py" not in again and "distill.py" not in again and "memorize.py" not in again
    assert "report.py" in again
    # The same family trained again from scratch, elsewhere: the same per-example records, byte for byte.
    make("reproduce", preset, tmp_path, "FAMILY_SEED=2", f"OUT={tmp_path}/seed2_again")
    for f in ("memorization/per_example.jsonl", "extraction/samples.jsonl"):
        assert (tmp_path / "seed2_again" / f).read_bytes() == (root / "seed2" / f).read_bytes(), f


def test_findings_are_judged_from_the_numbers_not_picked():
    s = {"models": {"baseline": {"memorized": 30, "val_ppl": 10.0}, "student_soft": {"memorized": 10, "val_ppl": 12.0}},
         "easy": {"share_soft": 0.8}, "teacher_specific": {"count": 50, "inherited_soft": 0, "inherited_hard": 3},
         "classifier": {"auc_mean": 0.95, "auc_std": 0.01, "coefficients": {"zlib_entropy": {"mean": 1.5}}}}
    verdicts = {f["key"]: f["reproduced"] for f in report.findings(s)}
    assert verdicts == {"less": True, "perplexity": False, "easy": False, "inherited": True, "hard_over_soft": True,
                        "auc": True, "zlib": False}
    s["teacher_specific"]["inherited_hard"] = 0  # neither student inherits any: the run cannot tell
    assert {f["key"]: f["reproduced"] for f in report.findings(s)}["hard_over_soft"] is None
    sweep = {"students": {"T=1": {"memorized": 9}, "T=4": {"memorized": 2}}, "falls_with_temperature": True}
    filtering = {"before": 10, "after": 2}
    verdicts = {f["key"]: f["reproduced"] for f in report.findings(s, sweep, filtering)}
    assert verdicts["temperature"] is True and verdicts["filtering"] is False  # 2 of 10 left: not 90% removed


def test_regime_conditions_are_the_issues_thresholds():
    models = {"base_teacher": {"val_ppl": 100.0}, "base_student": {"val_ppl": 120.0},
              "teacher": {"memorized": 90, "memorization_rate": 0.9, "val_ppl": 150.0},
              "baseline": {"memorized": 60, "memorization_rate": 0.6, "val_ppl": 250.0},
              "student_soft": {"memorized": 30, "memorization_rate": 0.3, "val_ppl": 200.0}}
    met = {r["condition"]: r["met"] for r in report.regime({"models": models, "n_examples": 100})}
    assert all(v for k, v in met.items() if "perplexity" not in k)
    assert not met["the teacher's, the baselines' and the soft student's validation perplexity stays below 2x their base's"]  # 250 > 2 x 120
    models["teacher"].update(memorized=91, memorization_rate=0.91)
    models["student_soft"].update(memorized=29)
    met = {r["condition"]: r["met"] for r in report.regime({"models": models, "n_examples": 100})}
    assert not met["the teacher memorizes at most 90% of D"] and not met["the soft student's classifier has at least 30 positives"]


def test_each_regime_condition_can_fail_alone():
    def models():
        return {"base_teacher": {"val_ppl": 100.0}, "base_student": {"val_ppl": 120.0},
                "teacher": {"memorized": 50, "memorization_rate": 0.5, "val_ppl": 150.0},
                "baseline": {"memorized": 40, "memorization_rate": 0.4, "val_ppl": 200.0},
                "baseline_seed2": {"memorized": 45, "memorization_rate": 0.45, "val_ppl": 200.0},
                "student_soft": {"memorized": 30, "memorization_rate": 0.3, "val_ppl": 200.0}}

    def failing(m):
        return [r["condition"] for r in report.regime({"models": m, "n_examples": 100}) if not r["met"]]

    assert failing(models()) == []
    cases = {"the teacher memorizes at most 90% of D": {"teacher": {"memorization_rate": 0.95, "memorized": 95}},
             "every baseline seed memorizes at most 60% of D": {"baseline_seed2": {"memorization_rate": 0.61}},
             "the teacher memorizes more than the baseline": {"baseline": {"memorized": 50}},
             "the soft student's classifier has at least 30 positives": {"student_soft": {"memorized": 29}},
             "the teacher does not reproduce all of D, so the hard student's data differs from D":
                 {"teacher": {"memorized": 100}},
             "the teacher's, the baselines' and the soft student's validation perplexity stays below 2x their base's": {"teacher": {"val_ppl": 200.0}}}
    for condition, change in cases.items():
        m = models()
        for name, values in change.items():
            m[name].update(values)
        assert failing(m) == [condition], condition
    # The hard student is judged by its use on held-out text, not by perplexity (the paper: downstream tasks).
    hard = models()
    hard["student_hard"] = {"memorized": 30, "memorization_rate": 0.3, "val_ppl": 400.0}
    assert failing(hard) == []


def test_every_preset_file_parses_with_its_scripts_settings():
    from config import parse_config
    from distill import DistillConfig
    from extract import ExtractConfig
    from memorize import MemorizeConfig
    from prepare import PrepareConfig
    from train import TrainConfig
    kinds = {"prepare": PrepareConfig, "teacher": TrainConfig, "baseline": TrainConfig,
             "student": DistillConfig, "memorize": MemorizeConfig, "extract": ExtractConfig}
    presets = [os.path.join(ROOT, "configs", p) for p in os.listdir(os.path.join(ROOT, "configs"))]
    assert len(presets) >= 3
    for preset in presets:
        for kind, cls in kinds.items():
            parse_config(cls, ["--config", os.path.join(preset, f"{kind}.toml")])
        for extra in ("base_teacher", "base_student"):
            if os.path.isfile(os.path.join(preset, f"{extra}.toml")):
                parse_config(TrainConfig, ["--config", os.path.join(preset, f"{extra}.toml")])
        if os.path.isfile(os.path.join(preset, "prepare_base.toml")):
            parse_config(PrepareConfig, ["--config", os.path.join(preset, "prepare.toml"),
                                         "--config", os.path.join(preset, "prepare_base.toml")])
