"""distill.py: the divergences, the chunked loss and its gradient, hard-distillation data, and runs."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import distill
from config import UserError
from distill import distillation_loss, divergence
from test_distributed import free_port
from checkpoint import load_model
from data import open_split, write_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def direct_kl(p_logits, q_logits, T):
    """KL(p || q) of softmax(p_logits / T) and softmax(q_logits / T), in float64, from the definition."""
    p = torch.softmax(p_logits.double() / T, -1)
    q = torch.softmax(q_logits.double() / T, -1)
    return (p * (p.log() - q.log())).sum(-1)


def chunked_loss(hidden, weight, t_hidden, t_weight, targets, chunk, **kw):
    opts = dict(chunk=chunk, divergence="forward_kl", temperature=2.0, beta=0.5, alpha=1.0)
    opts.update(kw)
    return distillation_loss(hidden, weight, t_hidden, t_weight, targets, opts)


@pytest.mark.parametrize("T", [0.5, 1.0, 2.0, 4.0])
def test_forward_kl_equals_the_definition_at_each_temperature(T):
    s, t = torch.randn(6, 11), torch.randn(6, 11) * 3
    assert torch.allclose(divergence(s, t, "forward_kl", T).double(), direct_kl(t, s, T), atol=1e-5)
    assert torch.allclose(divergence(s, t, "reverse_kl", T).double(), direct_kl(s, t, T), atol=1e-5)


@pytest.mark.parametrize("T", [1.0, 2.0, 3.0])
def test_chunked_loss_is_T_squared_times_mean_kl(T):
    torch.manual_seed(0)
    h, w = torch.randn(10, 8), torch.randn(20, 8)
    th, tw = torch.randn(10, 5), torch.randn(20, 5)
    loss, stats = chunked_loss(h, w, th, tw, torch.zeros(10, dtype=torch.long), 4, temperature=T)
    kl = direct_kl(th @ tw.T, h @ w.T, T).mean()
    assert torch.allclose(loss.double(), T * T * kl, rtol=1e-5)
    assert torch.allclose(stats[0].double(), kl, rtol=1e-5)  # the logged value is the KL itself


def test_a_student_equal_to_the_teacher_has_zero_loss_and_zero_gradient():
    h, w = torch.randn(7, 8, requires_grad=True), torch.randn(30, 8, requires_grad=True)
    loss, _ = chunked_loss(h, w, h.detach(), w.detach(), torch.zeros(7, dtype=torch.long), 3)
    loss.backward()
    assert abs(loss.item()) < 1e-6
    assert h.grad.abs().max() < 1e-6 and w.grad.abs().max() < 1e-6


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_chunked_loss_and_gradients_equal_plain_autograd_on_full_logits(kind):
    torch.manual_seed(1)
    h, w = torch.randn(13, 8, requires_grad=True), torch.randn(25, 8, requires_grad=True)
    th, tw = torch.randn(13, 6), torch.randn(25, 6)
    targets = torch.randint(0, 25, (13,))
    alpha, T = 0.7, 2.0
    loss, _ = chunked_loss(h, w, th, tw, targets, 4, divergence=kind, alpha=alpha, temperature=T)
    loss.backward()
    got = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    logits = h @ w.T
    ref = (alpha * T * T * divergence(logits, th @ tw.T, kind, T, 0.5)
           + (1 - alpha) * F.cross_entropy(logits, targets, reduction="none")).mean()
    ref.backward()
    assert torch.allclose(loss, ref, atol=1e-6)
    assert torch.allclose(got[0], h.grad, atol=1e-5) and torch.allclose(got[1], w.grad, atol=1e-5)


def test_chunk_size_does_not_change_the_loss():
    torch.manual_seed(2)
    args = torch.randn(17, 8), torch.randn(40, 8), torch.randn(17, 8), torch.randn(40, 8)
    targets = torch.randint(0, 40, (17,))
    whole, _ = chunked_loss(*args, targets, 17)
    for chunk in (1, 5, 16):
        assert torch.allclose(chunked_loss(*args, targets, chunk)[0], whole, atol=1e-6)


def test_jsd_tends_to_forward_and_reverse_kl_at_its_limits():
    s, t = torch.randn(5, 9), torch.randn(5, 9)
    small, large = 1e-4, 1 - 1e-4
    assert torch.allclose(divergence(s, t, "jsd", beta=small) / small, divergence(s, t, "forward_kl"), rtol=1e-2)
    assert torch.allclose(divergence(s, t, "jsd", beta=large) / (1 - large), divergence(s, t, "reverse_kl"), rtol=1e-2)


# --- runs on tiny data --------------------------------------------------------------------------

def make_dataset(tmp_path, n=48, length=24, vocab=600, seed=0):
    """A dataset folder of fixed-length examples with a trained tokenizer, via prepare.py."""
    from data import write_dataset
    from tokenizer import train_bpe
    text = " ".join(f"word{i % 97} thing{i % 13}" for i in range(4000))
    os.makedirs(tmp_path, exist_ok=True)
    tok_path = str(tmp_path / "tok.model")
    train_bpe([text], vocab, tok_path, progress=False)
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, 300, size=(n + 8, length))
    rows[:, 0] = vocab - 256  # BOS: the first special token, right after the BPE ranks
    data = tmp_path / "data"
    write_dataset(str(data), tok_path, {"train": rows[:n], "val": rows[n:]}, "examples")
    return data


def tiny_run(data, out, **kw):
    args = {"data": data, "out_dir": out, "dim": 32, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2,
            "batch_size": 8, "epochs": 2, "lr": 3e-3, "warmup_steps": 2, "eval_interval": 0,
            "dtype": "fp32", "log_interval": 1, "seed": 3, **kw}
    return [f"--{k}={v}" for k, v in args.items()]


def read_losses(out):
    rows = [json.loads(l) for l in open(os.path.join(out, "log.jsonl"))]
    return [r["loss"] for r in rows if r.get("kind") == "train"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A dataset and a slightly wider teacher trained on it, shared by the tests below."""
    import train
    tmp = tmp_path_factory.mktemp("teacher")
    data = make_dataset(tmp)
    train.main(tiny_run(data, tmp / "teacher", epochs=3, dim=48))
    return data, tmp / "teacher"


@pytest.fixture(scope="module")
def one_process_student(teacher, tmp_path_factory):
    data, t = teacher
    out = tmp_path_factory.mktemp("student") / "one"
    distill.main(tiny_run(data, out, teacher=t))
    return out


def test_soft_distillation_run_logs_kl_and_writes_a_checkpoint(teacher, tmp_path):
    data, t = teacher
    summary = distill.main(tiny_run(data, tmp_path / "s", teacher=t, kd_chunk=50))
    assert (tmp_path / "s" / "model.safetensors").exists()
    rows = [json.loads(l) for l in open(tmp_path / "s" / "log.jsonl")]
    kls = [r["kl"] for r in rows if r.get("kind") == "train"]
    assert kls[-1] < kls[0]  # the student moves towards the teacher
    assert "val_kl" in summary and summary["val_kl"] >= 0


def test_hard_distillation_data_is_identical_across_two_runs(teacher, tmp_path):
    data, t = teacher
    distill.main(tiny_run(data, tmp_path / "h1", teacher=t, kind="hard", prefix_len=5))
    distill.main(tiny_run(data, tmp_path / "h2", teacher=t, kind="hard", prefix_len=5))
    a = np.fromfile(tmp_path / "h1" / "teacher_data" / "train.bin", dtype=np.uint16)
    b = np.fromfile(tmp_path / "h2" / "teacher_data" / "train.bin", dtype=np.uint16)
    src = np.fromfile(data / "train.bin", dtype=np.uint16).reshape(48, 24)
    assert np.array_equal(a, b)
    gen = a.reshape(48, 24)
    assert np.array_equal(gen[:, :6], src[:, :6])  # the prompts (BOS + 5 tokens) are the data's
    teacher_model = load_model(str(t))
    expect = teacher_model.generate(torch.from_numpy(src[:2, :6].astype(np.int64)), 18)
    assert np.array_equal(gen[:2, 6:], expect.numpy())


def test_sampled_generations_split_into_shares_are_what_one_process_draws(teacher):
    # Under torchrun each rank samples its share of whole batches; its draws must not depend on how
    # many ranks there are, so that a sampled hard-distillation set is one set, as the greedy one is.
    data, t = teacher
    model = load_model(str(t))
    rows = np.fromfile(data / "train.bin", dtype=np.uint16).reshape(48, 24)
    run = lambda part, start, T: distill.teacher_continuations(model, part, 6, 8, torch.device("cpu"), T, 5, start,
                                                               progress=False)
    whole = run(rows, 0, 1.0)
    shares = [run(rows[lo:hi], lo, 1.0) for lo, hi in (distill.batch_share(48, 8, r, 3) for r in range(3))]
    assert np.array_equal(np.concatenate(shares), whole)
    assert np.array_equal(whole[:, :6], rows[:, :6])  # the prompts are the data's
    assert not np.array_equal(whole, run(rows, 0, 0.0))  # and the continuations are not the greedy ones
    assert not np.array_equal(whole, distill.teacher_continuations(model, rows, 6, 8, torch.device("cpu"), 1.0, 6,
                                                                   progress=False))  # another seed, other draws


HARD = dict(kind="hard", prefix_len=5, gen_batch_size=8, max_steps=1, warmup_steps=0)


@pytest.fixture(scope="module")
def one_process_hard(teacher, tmp_path_factory):
    data, t = teacher
    out = tmp_path_factory.mktemp("hard") / "one"
    distill.main(tiny_run(data, out, teacher=t, **HARD))
    return out


def test_hard_distillation_frees_the_teacher_and_does_not_load_it_for_reused_generations(
        teacher, one_process_hard, tmp_path, monkeypatch):
    import gc
    import weakref

    import train
    data, t = teacher
    loaded, alive_at_training, load, build = [], [], distill.load_teacher, train.place

    def load_and_watch(cfg, device):
        model = load(cfg, device)
        loaded.append(weakref.ref(model))
        return model

    def build_and_look(*args):
        gc.collect()
        alive_at_training.append(any(ref() is not None for ref in loaded))
        return build(*args)

    monkeypatch.setattr(distill, "load_teacher", load_and_watch)
    monkeypatch.setattr(train, "place", build_and_look)  # the student goes onto the device to train
    distill.main(tiny_run(data, tmp_path, teacher=t, **HARD))
    assert len(loaded) == 1 and alive_at_training == [False]

    # The generations are there and current: the teacher is not loaded at all.
    monkeypatch.setattr(distill, "load_teacher", lambda cfg, device: pytest.fail("the teacher was loaded"))
    before = (tmp_path / "teacher_data" / "train.bin").read_bytes()
    distill.main(tiny_run(data, tmp_path, teacher=t, overwrite=True, **HARD))
    assert (tmp_path / "teacher_data" / "train.bin").read_bytes() == before
    assert before == (one_process_hard / "teacher_data" / "train.bin").read_bytes()


def test_a_damaged_generation_stamp_makes_the_generations_again(teacher, one_process_hard, tmp_path, monkeypatch):
    data, t = teacher
    distill.main(tiny_run(data, tmp_path, teacher=t, **HARD))
    (tmp_path / "teacher_data" / "teacher_stamp.json").write_text('{"teacher": ')  # cut short
    (tmp_path / "teacher_data" / "train.bin").write_bytes(b"")  # would fail if reused
    loads, load = [], distill.load_teacher
    monkeypatch.setattr(distill, "load_teacher", lambda cfg, device: loads.append(1) or load(cfg, device))
    distill.main(tiny_run(data, tmp_path, teacher=t, overwrite=True, **HARD))
    assert loads == [1]
    assert (tmp_path / "teacher_data" / "train.bin").read_bytes() == (one_process_hard / "teacher_data" / "train.bin").read_bytes()


def generations(out):
    return np.fromfile(out / "teacher_data" / "train.bin", dtype=np.uint16).reshape(48, 24)


@pytest.mark.parametrize("change", ["teacher", "prefix_len", "data"])
def test_cached_generations_are_made_again_when_teacher_prompt_or_data_change(teacher, one_process_hard, tmp_path,
                                                                              monkeypatch, change):
    # The cache in out_dir/teacher_data holds one teacher's continuations of one dataset from one
    # prompt length; reused for another, it would silently train the student on the wrong text.
    data, t = teacher
    out = tmp_path / "run"
    shutil.copytree(one_process_hard, out)  # its generations: the fixture teacher's, prefix_len 5, the data
    settings = dict(HARD)
    if change == "teacher":  # same shape, other weights
        import train
        t = tmp_path / "other_teacher"
        train.main(tiny_run(data, t, epochs=3, dim=48, seed=9))
    elif change == "prefix_len":
        settings["prefix_len"] = 7
    else:  # same token counts, other tokens
        rows = open_split(str(data), "train").copy()
        rows[:, 1:] = (rows[:, 1:] + 1) % 300
        data = tmp_path / "data"
        write_dataset(str(data), str(teacher[0].parent / "tok.model"), {"train": rows, "val": open_split(str(teacher[0]), "val")},
                      "examples")
    loads, load = [], distill.load_teacher
    monkeypatch.setattr(distill, "load_teacher", lambda cfg, device: loads.append(1) or load(cfg, device))
    distill.main(tiny_run(data, out, teacher=t, overwrite=True, **settings))
    assert loads == [1]  # made again
    got, prompt = generations(out), 1 + settings["prefix_len"]
    rows = open_split(str(data), "train")
    expected = load_model(str(t)).generate(torch.from_numpy(rows[:4, :prompt].astype(np.int64)), 24 - prompt)
    assert np.array_equal(got[:4, prompt:], expected.numpy()) and np.array_equal(got[:, :prompt], rows[:, :prompt])


def test_a_repeated_example_is_continued_once_and_its_copies_get_the_same_text(teacher, tmp_path, monkeypatch):
    data, t = teacher
    rows = open_split(str(data), "train").copy()
    rows[[10, 20, 30]] = rows[5]  # one example four times, others once: 45 distinct in 48 rows
    planted = tmp_path / "data"
    write_dataset(str(planted), str(data.parent / "tok.model"), {"train": rows, "val": open_split(str(data), "val")},
                  "examples")
    continued, continuations = [], distill.teacher_continuations
    monkeypatch.setattr(distill, "teacher_continuations",
                        lambda teacher, rows, *a, **k: continued.append(len(rows)) or continuations(teacher, rows, *a, **k))
    distill.main(tiny_run(planted, tmp_path / "run", teacher=t, **HARD))
    got = generations(tmp_path / "run")
    assert continued == [45]
    assert all(np.array_equal(got[i], got[5]) for i in (10, 20, 30))
    prompt = 1 + HARD["prefix_len"]
    expected = load_model(str(t)).generate(torch.from_numpy(rows[[5, 6], :prompt].astype(np.int64)), 24 - prompt)
    assert np.array_equal(got[[5, 6], prompt:], expected.numpy())


def test_hard_distillation_generates_in_shares_under_torchrun_and_matches_one_process(
        teacher, one_process_hard, tmp_path):
    data, t = teacher
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "distill.py", *tiny_run(data, tmp_path, teacher=t, parallel="ddp", **HARD)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=240)
    got, expected = tmp_path / "teacher_data", one_process_hard / "teacher_data"
    assert (got / "train.bin").read_bytes() == (expected / "train.bin").read_bytes()
    assert (got / "val.bin").read_bytes() == (expected / "val.bin").read_bytes()
    assert json.loads((got / "meta.json").read_text())["hard_distillation"]["ranks"] == 2


@pytest.mark.parametrize("kind", ["soft", "hard"])
def test_a_stopped_distillation_resumes_exactly(teacher, tmp_path, kind):
    data, t = teacher
    settings = dict(teacher=t, kind=kind, prefix_len=5, epochs=3, eval_interval=4)
    distill.main(tiny_run(data, tmp_path / "whole", **settings))
    distill.main(tiny_run(data, tmp_path / "parts", stop_after=7, **settings))
    distill.main(tiny_run(data, tmp_path / "parts", resume=True, **settings))
    assert read_losses(tmp_path / "parts") == read_losses(tmp_path / "whole") and len(read_losses(tmp_path / "whole")) == 18
    whole = load_model(str(tmp_path / "whole")).state_dict()
    assert all(torch.equal(v, whole[k]) for k, v in load_model(str(tmp_path / "parts")).state_dict().items())


def test_bad_teacher_settings_are_refused_in_one_sentence(teacher, tmp_path):
    data, t = teacher
    with pytest.raises(UserError, match="does not exist"):
        distill.main(tiny_run(data, tmp_path / "x", teacher=tmp_path / "nope"))
    with pytest.raises(UserError, match="temperature must be above 0"):
        distill.main(tiny_run(data, tmp_path / "x", teacher=t, temperature=0))
    other = make_dataset(tmp_path / "other", vocab=560)
    with pytest.raises(UserError, match="has a vocabulary of 600 tokens but .* has 560; .* or pass --slice_vocab"):
        distill.main(tiny_run(other, tmp_path / "x", teacher=t))
    distill.weights_bytes, saved = (lambda path: 1 << 50), distill.weights_bytes
    try:
        with pytest.raises(UserError, match="needs about"):
            distill.main(tiny_run(data, tmp_path / "x", teacher=t))
    finally:
        distill.weights_bytes = saved
    assert not (tmp_path / "x" / "model.safetensors").exists()


def test_a_distilled_student_is_closer_to_the_teacher_than_a_baseline(teacher, one_process_student, tmp_path):
    import train
    data, t = teacher
    train.main(tiny_run(data, tmp_path / "base"))
    tm = load_model(str(t))
    val = torch.from_numpy(np.fromfile(data / "val.bin", dtype=np.uint16).reshape(-1, 24).astype(np.int64))

    def kl_to_teacher(path):
        m = load_model(str(path))
        with torch.no_grad():
            return divergence(m(val), tm(val), "forward_kl").mean().item()

    assert kl_to_teacher(one_process_student) < kl_to_teacher(tmp_path / "base")


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_distillation_under_torchrun_matches_one_process(teacher, one_process_student, tmp_path, parallel):
    data, t = teacher
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "distill.py", *tiny_run(data, tmp_path / parallel, teacher=t, parallel=parallel)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=240)
    np.testing.assert_allclose(read_losses(tmp_path / parallel), read_losses(one_process_student), rtol=1e-4)


def test_memorization_and_hard_distillation_split_an_example_at_the_same_place(teacher, tmp_path):
    # prefix_len counts the tokens after BOS in both scripts. Rows 0-7 are the teacher's own greedy
    # continuation of BOS + P random tokens, rows 8-15 random: for the same P, memorize.py must call
    # exactly rows 0-7 memorized, and the teacher's generations must reproduce exactly those rows.
    from memorize import memorized_flags
    from data import open_split, write_dataset
    data, t = teacher
    model = load_model(str(t))
    P, L = 5, 24
    rows = np.random.default_rng(7).integers(0, 300, (16, L))
    rows[:, 0] = 600 - 256  # BOS
    rows[:8, 1 + P:] = model.generate(torch.from_numpy(rows[:8, :1 + P]), L - 1 - P).numpy()
    planted = str(tmp_path / "planted")
    write_dataset(planted, os.path.join(data, "tokenizer.model"), {"train": rows, "val": open_split(data, "val")},
                  "examples")
    distill.main(tiny_run(planted, tmp_path / "hard", teacher=t, kind="hard", prefix_len=P, max_steps=1, warmup_steps=0))
    reproduced = (open_split(tmp_path / "hard" / "teacher_data", "train") == rows).all(1)
    memorized = memorized_flags(model, rows, P, L - 1 - P)
    assert reproduced.tolist() == memorized.tolist() == [True] * 8 + [False] * 8


def test_an_out_dir_in_use_is_refused_before_the_teacher_generates(teacher, one_process_hard, monkeypatch):
    data, t = teacher
    monkeypatch.setattr(distill, "load_teacher", lambda cfg, device: pytest.fail("the teacher was loaded"))
    with pytest.raises(UserError, match="already holds a checkpoint"):
        distill.main(tiny_run(data, one_process_hard, teacher=t, **{**HARD, "prefix_len": 4}))
