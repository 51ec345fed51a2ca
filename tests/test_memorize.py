"""memorize.py: discoverable memorization, per-example features, family comparisons, the
classifier and filter, the command line and its errors (the trained family: conftest.py)."""

import json
import math
import os
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import classifier
import memorize as mem
import quantize
from config import UserError, parse_config
from checkpoint import save_model
from data import open_split, read_info, write_dataset
from test_distributed import free_port

from conftest import BASELINE_ROWS, CHANGED_AT, L, N_TRAIN, NEAR_COPY, P, S, TEACHER_ROWS, models_arg, tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("one_thread")


# --- discoverable memorization -------------------------------------------------------------------

def test_trained_model_is_found_memorizing_exactly_its_training_rows(world):
    flags = mem.memorized_flags(world["models"]["teacher"], open_split(world["data"], "train"), P, S)
    assert np.flatnonzero(flags).tolist() == TEACHER_ROWS


@pytest.mark.parametrize("generated, matches, first", [
    ([5, 6, 7, 8, 9], 5, 5),  # all match
    ([0, 6, 7, 8, 9], 4, 0),  # only the first differs
    ([5, 6, 7, 8, 0], 4, 4),  # only the last differs
    ([0, 0, 0, 0, 0], 0, 0),
    ([5, 6, 0, 8, 0], 3, 2),  # matches after a mismatch still count (Pythia's score)
])
def test_match_score_counts_matching_positions(generated, matches, first):
    truth = torch.tensor([[5, 6, 7, 8, 9]])
    m, f = mem.match_stats(torch.tensor([generated]), truth)
    assert (m.item(), f.item()) == (matches, first)


def test_teacher_forced_flag_equals_greedy_generation(world):
    cols = mem.measure_examples({"teacher": world["models"]["teacher"]}, world["rows"], P, S, batch_size=5,
                                generate=True, progress=False)
    generated_flag = cols["teacher.match_count"] == S
    assert generated_flag.sum() == len(TEACHER_ROWS)  # the comparison covers both outcomes
    assert (cols["teacher.memorized"] == generated_flag).all()
    assert (cols["teacher.first_mismatch"] == cols["teacher.generated_first_mismatch"]).all()
    # The near copy of a memorized row: greedy decoding misses exactly one token, at CHANGED_AT.
    assert cols["teacher.match_count"][NEAR_COPY] == S - 1
    assert cols["teacher.first_mismatch"][NEAR_COPY] == CHANGED_AT


def test_batched_results_equal_one_at_a_time(world):
    models = {n: world["models"][n] for n in ("teacher", "baseline")}
    kw = dict(generate=True, tokenizer=world["tok"], progress=False)
    batched = mem.measure_examples(models, world["rows"], P, S, batch_size=7, **kw)
    single = mem.measure_examples(models, world["rows"], P, S, batch_size=1, **kw)
    assert batched.keys() == single.keys()
    for c in batched:
        np.testing.assert_allclose(batched[c], single[c], rtol=1e-5, atol=1e-5, err_msg=c)


def test_shards_over_ranks_concatenate_to_the_whole(world):
    models = {"teacher": world["models"]["teacher"]}
    whole = mem.measure_examples(models, world["rows"], P, S, batch_size=4, progress=False)
    parts = [mem.measure_examples(models, world["rows"], P, S, batch_size=4, rank=r, world=3, progress=False)
             for r in range(3)]
    for c in whole:
        np.testing.assert_allclose(np.concatenate([p[c] for p in parts]), whole[c], rtol=1e-5, err_msg=c)


def test_under_torchrun_the_report_equals_one_process(world, tmp_path):
    # Two processes split the examples and the val rows; rank 0 writes. Every random draw is seeded
    # by its batch, so the sampled columns come out the same.
    args = [f"--data={world['data']}", models_arg(world), f"--prefix_len={P}", f"--suffix_len={S}", "--batch_size=5",
            "--generate=true", "--sample_tries=2", "--classifier_min_positives=2", "--classifier_trials=5",
            "--figures=false"]
    one = mem.main(args + [f"--out={tmp_path / 'one'}"])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "memorize.py", *args, f"--out={tmp_path / 'two'}"]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=240)
    for name in ("per_example.jsonl", "at_risk.json"):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    for n, m in one["models"].items():
        assert two["models"][n]["memorized"] == m["memorized"] and two["models"][n]["sampled_memorized"] == m["sampled_memorized"]
        assert two["models"][n]["val_ppl"] == pytest.approx(m["val_ppl"], rel=1e-9)
    assert two["classifier"] == one["classifier"]


def test_sampling_with_top_k_1_extracts_what_greedy_decoding_does(world):
    cols = mem.measure_examples({"teacher": world["models"]["teacher"]}, world["rows"], P, S,
                                sample_tries=2, sample_top_k=1, progress=False)
    assert (cols["teacher.sampled_memorized"] == cols["teacher.memorized"]).all()


# --- features equal direct computations ------------------------------------------------------------

def test_features_equal_a_direct_computation(monkeypatch):
    monkeypatch.setattr(mem, "CHUNK_ELEMENTS", 3 * 300 * 2)  # logits two positions at a time
    teacher, baseline = tiny_model(1, vocab_size=300), tiny_model(2, vocab_size=300)
    for p in list(teacher.parameters()) + list(baseline.parameters()):
        p.data.mul_(5)  # sharper distributions than the nearly uniform initialization
    T, prefix, suffix, k_percent = 12, 3, 5, 25.0
    rows = torch.randint(0, 300, (3, T), generator=torch.Generator().manual_seed(0))
    cols = mem.example_features({"teacher": teacher, "baseline": baseline}, rows, prefix, suffix, k_percent,
                                teacher="teacher", baselines=["baseline"])
    for b in range(3):
        with torch.no_grad():  # each next-token distribution from its own forward pass on the prefix
            lt = [teacher(rows[b:b + 1, :t + 1])[0, -1].double().log_softmax(-1) for t in range(T - 1)]
            lb = [baseline(rows[b:b + 1, :t + 1])[0, -1].double().log_softmax(-1) for t in range(T - 1)]
        logp = [lt[t][rows[b, t + 1]].item() for t in range(T - 1)]
        entropies = [-(lt[t].exp() * lt[t]).sum().item() for t in range(T - 1)]
        kls = [(lt[t].exp() * (lt[t] - lb[t])).sum().item() for t in range(T - 1)]
        in_suffix = range(prefix, prefix + suffix)  # after BOS + prefix; position t predicts token t + 1
        k = max(1, round((T - 1) * k_percent / 100))
        expected = {
            "teacher.ppl": math.exp(-sum(logp) / (T - 1)),
            "teacher.suffix_logprob": sum(logp[t] for t in in_suffix),
            "teacher.suffix_entropy": sum(entropies[t] for t in in_suffix) / suffix,
            "teacher.min_k_logprob": sum(sorted(logp)[:k]) / k,
            "kl_teacher_baseline": sum(kls) / (T - 1),
        }
        for c, v in expected.items():
            assert cols[c][b] == pytest.approx(v, rel=1e-4, abs=1e-5), c
        greedy_right = [lt[t].argmax().item() == rows[b, t + 1].item() for t in in_suffix]
        assert cols["teacher.memorized"][b] == all(greedy_right)


def test_zlib_entropy_is_the_compressed_size_of_the_example_text(world):
    tok = world["tok"]
    texts = ["the cat sat on the mat " * 6, "Quartz glyph jocks vex, dwarf nymph; big fox whelps."]
    rows = [np.array(tok.encode(t, bos=True)) for t in texts]
    got = [mem.zlib_entropy(tok, [r])[0] for r in rows]
    assert got == [len(zlib.compress(t.encode("utf-8"))) for t in texts]
    assert got[0] < len(texts[0]) / 3  # repetitive text compresses well


def test_zlib_ratio_is_compressed_over_raw_bytes_and_ranks_repetition_not_length(world):
    tok = world["tok"]
    texts = ["the cat sat on the mat " * 6, "Quartz glyph jocks vex, dwarf nymph; big fox whelps."]
    rows = [np.array(tok.encode(t, bos=True)) for t in texts]
    ratios = [mem.zlib_ratio(tok, [r])[0] for r in rows]
    assert ratios == [len(zlib.compress(t.encode())) / len(t.encode()) for t in texts]
    assert ratios[0] < 0.3 < 1 < ratios[1]  # a short varied text does not compress at all: zlib adds its header


# --- family comparison ----------------------------------------------------------------------------

def test_family_comparison_counts_on_a_hand_made_set():
    f = lambda s: np.array([c == "x" for c in s])  # noqa: E731
    memorized = {
        "teacher":        f("xxxxxx...."),
        "baseline":       f("xxx....x.."),
        "baseline_seed2": f("x..x......"),
        "student_soft":   f("xx..x...x."),
        "student_hard":   f("x..xxx...."),
    }
    out = mem.compare_family(memorized)
    assert out["models"]["teacher"] == {"memorized": 6, "memorization_rate": 0.6}
    assert out["overlap"]["teacher"]["student_hard"] == 4
    assert out["easy"]["count"] == 4  # rows 0-3: teacher and some baseline seed
    assert out["teacher_specific"]["count"] == 2  # rows 4, 5: no baseline seed
    assert out["easy"]["share_soft"] == pytest.approx(2 / 4)  # rows 0, 1 of 0, 1, 4, 8
    assert out["easy"]["share_hard"] == pytest.approx(2 / 4)  # rows 0, 3 of 0, 3, 4, 5
    assert out["teacher_specific"]["inherited_soft"] == 1
    assert out["teacher_specific"]["inherited_hard"] == 2
    assert out["teacher_specific"]["hard_soft_ratio"] == 2.0


def test_single_model_gives_rates_without_family_sets():
    out = mem.compare_family({"mine": np.array([True, False, False, False])})
    assert out["models"]["mine"]["memorization_rate"] == 0.25 and "easy" not in out


# --- classifier ------------------------------------------------------------------------------------

def test_auc_equals_the_fraction_of_correctly_ordered_pairs():
    rng = np.random.default_rng(0)
    scores, labels = rng.integers(0, 5, 40).astype(float), rng.random(40) < 0.4  # many ties
    pairs = [(1.0 if a > b else 0.5 if a == b else 0.0) for a in scores[labels] for b in scores[~labels]]
    assert classifier.auc_roc(scores, labels) == pytest.approx(np.mean(pairs))


def test_logistic_regression_reaches_its_optimum():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(200, 3))
    y = (X @ [2.0, -1.0, 0.0] + rng.normal(size=200) > 0.5).astype(float)
    w = classifier.fit_logistic(X, y, l2=1.0)
    A = np.hstack([np.ones((200, 1)), X])
    grad = A.T @ (classifier.sigmoid(A @ w) - y) + np.r_[0.0, w[1:]]
    assert np.abs(grad).max() < 1e-6
    assert w[1] > 0 > w[2]


def test_classifier_separates_separable_data_and_not_random_labels():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(400, 4))
    separable = X[:, 0] < -0.8  # positives have a low first feature, like the paper's zlib entropy
    good = classifier.classifier_trials(X, separable, list("abcd"), trials=20, seed=0)
    assert good["status"] == "ok" and good["auc_mean"] > 0.98 and good["recall_mean"] > 0.8
    assert good["coefficients"]["a"]["mean"] < -1
    noise = classifier.classifier_trials(X, rng.random(400) < 0.2, list("abcd"), trials=20, seed=0)
    assert abs(noise["auc_mean"] - 0.5) < 0.1


def test_classifier_reports_too_few_positives_instead_of_crashing():
    X = np.random.default_rng(3).normal(size=(50, 4))
    for labels in (np.zeros(50, bool), np.arange(50) < 3):
        out = classifier.classifier_trials(X, labels, list("abcd"), min_positives=10)
        assert out["status"].startswith("skipped") and out["auc_mean"] is None


# --- command line -----------------------------------------------------------------------------------

def test_command_line_writes_the_report(world, tmp_path):
    out = str(tmp_path / "report")
    summary = mem.main([f"--data={world['data']}", models_arg(world), f"--out={out}", f"--prefix_len={P}",
                        f"--suffix_len={S}", "--batch_size=5", "--classifier_min_positives=2",
                        "--classifier_trials=5"])
    m = summary["models"]
    assert [m[n]["memorized"] for n in m] == [6, 3, 2, 2]
    assert m["teacher"]["memorization_rate"] == pytest.approx(6 / N_TRAIN)
    assert m["teacher"]["params"] == world["models"]["teacher"].num_params()
    # val_ppl: the token-level perplexity of the val rows, computed here directly.
    with torch.no_grad():
        x = torch.from_numpy(world["val"].astype(np.int64))
        nll = F.cross_entropy(world["models"]["baseline"](x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
    assert m["baseline"]["val_ppl"] == pytest.approx(math.exp(nll.item()), rel=1e-4)
    assert summary["easy"]["count"] == 3 and summary["teacher_specific"]["count"] == 3
    assert summary["teacher_specific"]["inherited_hard"] == 1 and summary["teacher_specific"]["inherited_soft"] == 0
    assert summary["easy"]["share_soft"] == 1.0 and summary["easy"]["share_hard"] == 0.5
    assert summary["classifier"]["student"] == "student_soft" and summary["classifier"]["status"] == "ok"
    assert set(summary["classifier"]["coefficients"]) == set(mem.FEATURES)

    lines = [json.loads(line) for line in open(os.path.join(out, "per_example.jsonl"))]
    assert [r["index"] for r in lines] == list(range(N_TRAIN))
    assert lines[0]["teacher"]["memorized"] and not lines[NEAR_COPY]["teacher"]["memorized"]
    assert lines[0]["teacher"]["match_count"] is None  # needs --generate
    assert json.load(open(os.path.join(out, "summary.json")))["n_examples"] == N_TRAIN
    assert "| teacher |" in open(os.path.join(out, "report.md")).read()
    if summary["figures"]:
        assert all(os.path.getsize(os.path.join(out, f)) > 0 for f in summary["figures"])

    # The filtered dataset: the training rows without those flagged, the val split as it was.
    at_risk = json.load(open(os.path.join(out, "at_risk.json")))["rows"]
    filtered = summary["filter"]["path"]
    kept = [i for i in range(N_TRAIN) if i not in at_risk]
    np.testing.assert_array_equal(open_split(filtered, "train"), world["rows"][kept])
    np.testing.assert_array_equal(open_split(filtered, "val"), world["val"])
    assert read_info(filtered)["tokenizer_sha256"] == world["tok"].sha256


def test_repeated_examples_are_measured_once_and_the_natural_ones_also_alone(world, tmp_path):
    # Row 1 (memorized by teacher, baseline and soft student) appears 3 times, row 7 (by none) twice.
    rows = np.concatenate([world["rows"], world["rows"][[1, 7, 1]]])
    data = str(tmp_path / "data")
    write_dataset(data, str(world["root"] / "tok.model"), {"train": rows, "val": world["val"]}, "examples")
    out = str(tmp_path / "report")
    s = mem.main([f"--data={data}", models_arg(world), f"--out={out}", f"--prefix_len={P}", f"--suffix_len={S}",
                  "--classifier_min_positives=1", "--classifier_trials=3", "--filter_threshold=0.0"])
    assert s["n_examples"] == N_TRAIN and s["n_rows"] == N_TRAIN + 3 and s["copies"] == {"1": 14, "2": 1, "3": 1}
    assert [s["models"][n]["memorized"] for n in s["models"]] == [6, 3, 2, 2]  # as without the copies
    lines = [json.loads(line) for line in open(os.path.join(out, "per_example.jsonl"))]
    assert [r["copies"] for r in lines] == [1, 3] + [1] * 5 + [2] + [1] * 8
    natural = s["natural"]
    assert natural["n_examples"] == 14 and natural["models"]["teacher"]["memorized"] == 5
    assert natural["models"]["baseline"]["memorized"] == 2 and natural["easy"]["count"] == 2
    assert s["by_copies"]["3"] == {"examples": 1, "teacher": 1, "baseline": 1, "student_soft": 1, "student_hard": 0}
    # How close: row 1 memorized (all S suffix tokens) by all but the hard student, which reproduces fewer.
    assert {n: v for n, v in s["reproduced_by_copies"]["3"].items() if n != "student_hard"} == dict.fromkeys(
        ["teacher", "baseline", "student_soft"], float(S))
    assert s["reproduced_by_copies"]["3"]["student_hard"] < S
    once = [r for r in lines if r["copies"] == 1]  # a mixed stratum: each model's mean over its rows
    for n in s["models"]:
        assert s["reproduced_by_copies"]["1"][n] == pytest.approx(sum(r[n]["first_mismatch"] for r in once) / len(once))
        assert 0 < s["reproduced_by_copies"]["1"][n] < S
    assert "How close each row came" in open(os.path.join(out, "report.md")).read()
    # A threshold of 0 flags every example: the filtered data keeps none of the rows, copies included.
    assert s["filter"]["at_risk"] == N_TRAIN + 3 and s["filter"]["kept"] == 0


def test_an_example_whose_suffix_occurs_in_another_row_is_not_natural(world, tmp_path):
    # A new row: row 9's prompt and row 1's suffix (the teacher memorized row 1); row 7 appears twice.
    # Row 1 and the new row appear once each, but their suffix twice: not text seen once.
    start = mem.prompt_len(P)
    new = world["rows"][9].copy()
    new[start:start + S] = world["rows"][1][start:start + S]
    rows = np.concatenate([world["rows"], world["rows"][[7]], new[None]])
    data = str(tmp_path / "data")
    write_dataset(data, str(world["root"] / "tok.model"), {"train": rows, "val": world["val"]}, "examples")
    out = str(tmp_path / "report")
    s = mem.main([f"--data={data}", models_arg(world), f"--out={out}", f"--prefix_len={P}", f"--suffix_len={S}",
                  "--classifier_min_positives=1", "--classifier_trials=3", "--filter=false"])
    lines = [json.loads(line) for line in open(os.path.join(out, "per_example.jsonl"))]
    assert [r["suffix_in_data"] for r in lines] == [1, 2] + [1] * 5 + [2] + [1] * 8 + [2]
    assert s["natural"]["n_examples"] == N_TRAIN - 2  # row 7 has copies, rows 1 and 16 a shared suffix
    assert s["natural"]["suffix_elsewhere"]["examples"] == 2
    assert s["natural"]["suffix_elsewhere"]["teacher"] == 1 + lines[-1]["teacher"]["memorized"]
    assert s["natural"]["models"]["teacher"]["memorized"] == len(TEACHER_ROWS) - 1  # row 1 is not natural


def test_memorization_beyond_the_base_and_held_out_accuracy(world, tmp_path):
    # A "base" of the students that memorized rows 0-2 already (the baseline itself stands in for it):
    # what a student memorizes beyond it is what fine-tuning added.
    names = ("base_student", "teacher", "baseline", "student_soft", "student_hard")
    paths = {**world["paths"], "base_student": world["paths"]["baseline"]}
    s = mem.main([f"--data={world['data']}", "--models=" + ",".join(f"{n}:{paths[n]}" for n in names),
                  f"--out={tmp_path}", f"--prefix_len={P}", f"--suffix_len={S}", "--classifier_min_positives=1",
                  "--classifier_trials=3", "--figures=false"])
    m = s["models"]
    assert m["baseline"]["base"] == "base_student" and m["teacher"]["base"] is None
    assert m["baseline"]["memorized_beyond_base"] == 0 and m["student_soft"]["memorized_beyond_base"] == 0
    assert m["student_hard"]["memorized_beyond_base"] == 1  # row 3; row 0 the base has already
    assert "memorized_beyond_base" not in m["teacher"]  # its base is not in the family
    with torch.no_grad():
        x = torch.from_numpy(world["val"].astype(np.int64))
        right = (world["models"]["teacher"](x[:, :-1]).argmax(-1) == x[:, 1:]).float().mean().item()
    assert m["teacher"]["val_accuracy"] == pytest.approx(right)
    assert s["classifier_zlib_ratio"]["features"][0] == "zlib_ratio"


def test_one_model_alone_is_measured(world, tmp_path):
    summary = mem.main([f"--data={world['data']}", f"--models={world['paths']['baseline']}",
                        f"--out={tmp_path}", f"--prefix_len={P}", f"--suffix_len={S}", "--figures=false"])
    assert summary["models"]["baseline"]["memorized"] == len(BASELINE_ROWS)
    assert summary["classifier"]["status"].startswith("skipped")


def test_errors_name_the_fix(world, tmp_path):
    base = [f"--data={world['data']}", f"--out={tmp_path / 'r'}", f"--prefix_len={P}", f"--suffix_len={S}"]
    teacher = f"--models=teacher:{world['paths']['teacher']}"
    with pytest.raises(UserError, match="exceeds the 24-token examples"):
        mem.main(base + [teacher, "--suffix_len=20"])
    with pytest.raises(UserError, match="not one of the students"):
        mem.main(base + [teacher, "--classifier_student=student_x"])
    with pytest.raises(UserError, match="missing or incomplete"):
        mem.main(base + [f"--models=teacher:{tmp_path / 'nowhere'}"])
    other = tmp_path / "other"
    save_model(world["models"]["teacher"], str(other), extra={"tokenizer_sha256": "0" * 64})
    with pytest.raises(UserError, match="another tokenizer"):
        mem.main(base + [f"--models=teacher:{other}"])
    empty = str(tmp_path / "empty")
    write_dataset(empty, str(world["root"] / "tok.model"), {"train": np.zeros((0, L), np.int64)}, "examples")
    with pytest.raises(UserError, match="empty"):
        mem.main([f"--data={empty}", teacher])
    packed = str(tmp_path / "packed")
    write_dataset(packed, str(world["root"] / "tok.model"), {"train": world["rows"].ravel()}, "packed")
    with pytest.raises(UserError, match="layout=examples"):
        mem.main([f"--data={packed}", teacher])
    assert not os.path.exists(tmp_path / "r")  # nothing written by a failed run


# --- quantized models (quantize.py) are refused where flags are made -----------------------------

def test_a_quantized_model_is_refused_with_one_line_before_anything_is_written(world, tmp_path):
    q = quantize.quantized_copy(world["models"]["teacher"])
    with pytest.raises(UserError, match="quantized"):
        mem.memorized_flags(q, world["rows"], P, S)
    cfg = parse_config(mem.MemorizeConfig, [f"--data={world['data']}", f"--out={tmp_path / 'r'}",
                                            f"--prefix_len={P}", f"--suffix_len={S}"])
    with pytest.raises(UserError, match="model 'teacher' is quantized"):
        mem.run(cfg, models={"teacher": q, "baseline": world["models"]["baseline"]})
    assert not os.path.exists(tmp_path / "r")


def test_flags_under_a_callers_bf16_autocast_still_equal_fp32_greedy_decoding():
    # A training loop may call memorized_flags inside its bf16 autocast. An untrained model has
    # nearly tied logits, so bf16 rounding would miss some of its own greedy continuations.
    model = tiny_model(5)
    prompts = torch.randint(0, 256, (64, 1 + P), generator=torch.Generator().manual_seed(0))
    rows = torch.cat([prompts, model.generate(prompts, S)], 1).numpy()  # greedy, in fp32
    rows[32:, -1] = (rows[32:, -1] + 1) % 512  # the last suffix token wrong: not memorized
    with torch.autocast("cpu", dtype=torch.bfloat16):
        flags = mem.memorized_flags(model, rows, P, S, batch_size=16)
    assert flags.tolist() == [True] * 32 + [False] * 32


# --- the bf16 screen: memorized_flags' flags, decided in bf16 where bf16 cannot change them --------

def rows_sent_to_fp32(monkeypatch):
    """Record how many rows screened_memorized_flags hands to the fp32 memorized_flags."""
    sent, fp32 = [], mem.memorized_flags

    def recorded(model, rows, *args, **kwargs):
        sent.append(len(rows))
        return fp32(model, rows, *args, **kwargs)

    monkeypatch.setattr(mem, "memorized_flags", recorded)
    return sent


def test_screened_flags_equal_fp32_flags_on_the_trained_family_and_most_are_decided_in_bf16(world, monkeypatch):
    sent = rows_sent_to_fp32(monkeypatch)
    for name in ("teacher", "baseline"):
        model = world["models"][name]
        exact = mem.memorized_flags(model, world["rows"], P, S, batch_size=8)
        sent.clear()
        screened = mem.screened_memorized_flags(model, world["rows"], P, S, batch_size=8)
        assert screened.tolist() == exact.tolist()
        assert exact.any() and not exact.all()  # both outcomes are covered
        assert sum(sent) < len(world["rows"]) / 2  # most rows were decided by the bf16 pass


def test_screened_flags_recompute_near_ties_that_bf16_would_get_wrong(monkeypatch):
    # An untrained model's own greedy continuations: its logits are nearly tied, and bf16 rounding
    # changes the argmax somewhere in some of them. The screen must send those to fp32.
    model = tiny_model(5)
    prompts = torch.randint(0, 256, (64, 1 + P), generator=torch.Generator().manual_seed(0))
    rows = torch.cat([prompts, model.generate(prompts, S)], 1).numpy()  # greedy, in fp32
    rows[32:, -1] = (rows[32:, -1] + 1) % 512  # the last suffix token wrong: not memorized
    batch = torch.from_numpy(rows)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_argmax = model(batch[:, :-1])[:, P:].argmax(-1)
    assert (bf16_argmax[:32] != batch[:32, P + 1:]).any(1).sum() > 0  # plain bf16 would lose some
    sent = rows_sent_to_fp32(monkeypatch)
    assert mem.screened_memorized_flags(model, rows, P, S, batch_size=16).tolist() == [True] * 32 + [False] * 32
    assert sum(sent) > 0


def test_a_batch_whose_bf16_error_exceeds_the_bound_is_computed_in_fp32_whole(world, monkeypatch):
    sent = rows_sent_to_fp32(monkeypatch)
    model, rows = world["models"]["teacher"], world["rows"]
    flags = mem.screened_memorized_flags(model, rows, P, S, batch_size=8, error=1e-9)  # no bf16 logit is that close
    assert sum(sent) == len(rows)
    assert flags.tolist() == mem.memorized_flags(model, rows, P, S).tolist()
