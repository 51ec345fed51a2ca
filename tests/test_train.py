"""Specification of train.py: learning, the schedule, exact resume, safe checkpoints, the plug-in
API distill.py uses, and clear errors. Tiny models on a byte-level vocabulary of 512 tokens."""

import base64
import dataclasses
import glob
import hashlib
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import train as train_module
from config import UserError, parse_config
from memorize import memorized_flags
from model import ModelArgs, Transformer
from checkpoint import export_hf, load_model
from data import open_split, write_dataset
from distributed import prepare_frozen_model
from train import TrainConfig, batch_plan, cross_entropy_loss, lr_at, main, train

BOS = 256  # the byte-level tokenizer below has 256 ranks, so its first special token is 256
TINY = ["--model=tiny", "--dim=32", "--n_layers=1", "--n_heads=2", "--n_kv_heads=1", "--dtype=fp32",
        "--device=cpu", "--log_interval=1", "--eval_rows=4", "--lr=1e-2", "--warmup_steps=2"]


def write_tokenizer(path, n_ranks=256, shift=0):
    """A tiktoken file whose BPE ranks are single bytes (rotated by `shift`, so a different file
    with the same vocabulary), plus ranks of two-byte tokens beyond 256."""
    pieces = [bytes([(i + shift) % 256]) for i in range(256)] + [bytes([i % 256, 97]) for i in range(n_ranks - 256)]
    with open(path, "w") as f:
        f.writelines(f"{base64.b64encode(p).decode()} {rank}\n" for rank, p in enumerate(pieces))
    return str(path)


def examples_dataset(folder, n_train=8, n_val=4, length=17, seed=0, **tokenizer):
    """Rows of BOS + random bytes: layout examples."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, 256, (n_train + n_val, length))
    rows[:, 0] = BOS
    os.makedirs(folder.parent, exist_ok=True)
    write_dataset(str(folder), write_tokenizer(folder.parent / f"{folder.name}.tok", **tokenizer),
                  {"train": rows[:n_train], "val": rows[n_train:]}, "examples")
    return str(folder)


def packed_dataset(folder, n_docs=60, seed=0):
    """Documents of 5 to 30 random bytes, each after a BOS: layout packed."""
    rng = np.random.default_rng(seed)
    docs = [np.concatenate([[BOS], rng.integers(0, 256, rng.integers(5, 30))]) for _ in range(n_docs)]
    os.makedirs(folder.parent, exist_ok=True)
    write_dataset(str(folder), write_tokenizer(folder.parent / f"{folder.name}.tok"),
                  {"train": np.concatenate(docs[10:]), "val": np.concatenate(docs[:10])}, "packed")
    return str(folder)


def run(data, out, *args, **kwargs):
    cfg = parse_config(TrainConfig, [f"--data={data}", f"--out_dir={out}", *TINY, *args])
    return train(cfg, **kwargs)


def log_rows(out, kind):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [row for row in map(json.loads, f) if row["kind"] == kind]


def losses(out):
    return {row["step"]: row["loss"] for row in log_rows(out, "train")}


def file_hashes(out):
    return {name: hashlib.sha256(open(os.path.join(out, name), "rb").read()).hexdigest()
            for name in sorted(os.listdir(out)) if os.path.isfile(os.path.join(out, name))}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {"examples": examples_dataset(root / "examples"), "packed": packed_dataset(root / "packed")}


# --- learning and the schedule ---


def test_tiny_model_overfits_tiny_dataset_and_follows_the_schedule(data, tmp_path):
    out = tmp_path / "run"
    summary = run(data["examples"], out, "--batch_size=8", "--epochs=60", "--warmup_steps=5")
    rows = log_rows(out, "train")
    assert len(rows) == 60 and rows[0]["loss"] > math.log(512) - 0.5
    # Eight random rows: after BOS the first byte is a free choice among 8, every later one can be
    # learned, so the lowest mean loss over 16 targets is ln(8) / 16.
    assert summary["train_loss"] < math.log(8) / 16 + 0.15
    # The logged learning rates are the planned schedule: linear warm-up, then cosine to the floor.
    assert rows[0]["lr"] == pytest.approx(1e-2 / 5) and rows[4]["lr"] == pytest.approx(1e-2)
    assert rows[-1]["lr"] == pytest.approx(1e-4)
    assert all(a["lr"] >= b["lr"] for a, b in zip(rows[4:], rows[5:]))
    assert rows[-1]["epoch"] == 60 and all(r["tokens_per_s"] > 0 and 0 < r["mfu"] for r in rows)


def test_learning_rate_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=4)
    total = 13  # warm-up on steps 0-3, decay over steps 4-12
    assert [lr_at(s, cfg, total) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    for s in range(4, 13):
        expected = 0.1 + 0.45 * (1 + math.cos(math.pi * (s - 4) / 8))
        assert lr_at(s, cfg, total) == pytest.approx(expected)
    assert lr_at(8, cfg, total) == pytest.approx(0.55)  # half way down
    assert lr_at(12, cfg, total) == pytest.approx(0.1) and lr_at(20, cfg, total) == pytest.approx(0.1)


def test_bf16_autocast_trains_for_a_token_budget(data, tmp_path):
    # 1000 tokens at 4 x 32 per step: 8 steps (the last one partly over budget).
    run(data["packed"], tmp_path / "run", "--dtype=bf16", "--tokens=1000", "--batch_size=4", "--seq_len=32")
    loss = losses(tmp_path / "run")
    assert list(loss) == list(range(1, 9))
    assert all(math.isfinite(v) for v in loss.values()) and loss[8] < loss[1] - 0.2


def test_packed_windows_carry_document_ids_for_masking(data, tmp_path):
    batches = []

    def loss_fn(model, batch):
        batches.append(batch)
        return cross_entropy_loss(model, batch)

    run(data["packed"], tmp_path / "run", "--max_steps=2", "--batch_size=4", "--seq_len=32", loss_fn=loss_fn)
    for batch in batches:
        assert torch.equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
        assert torch.equal(batch["doc_ids"], torch.cumsum(batch["inputs"] == BOS, dim=1))
    assert any(int(b["doc_ids"][:, -1].max()) >= 2 for b in batches)  # some window spans documents


def test_every_example_is_seen_exactly_once_per_epoch_when_the_batch_does_not_divide_the_data(tmp_path):
    data = examples_dataset(tmp_path / "ten", n_train=10)
    seen = []

    def loss_fn(model, batch):
        if model.training:  # not the validation rows
            seen.extend(map(tuple, batch["inputs"].tolist()))
        return cross_entropy_loss(model, batch)

    summary = run(data, tmp_path / "run", "--batch_size=4", "--epochs=3", loss_fn=loss_fn)
    assert summary["step"] == 8  # 30 rows: seven batches of 4, then one of 2
    rows = [tuple(r[:-1]) for r in np.asarray(open_split(data, "train")).tolist()]
    epochs = [seen[10 * epoch:10 * (epoch + 1)] for epoch in range(3)]
    for epoch in epochs:  # the stream is three permutations of the ten examples, back to back
        assert sorted(epoch) == sorted(rows)
    assert len(seen) == 30
    assert epochs[0] != epochs[1] != epochs[2] != epochs[0]  # each epoch shuffled anew (1 / 10! to repeat)
    assert log_rows(tmp_path / "run", "train")[-1]["epoch"] == 3


def test_each_epochs_order_is_drawn_from_the_seed_and_the_epoch():
    cfg = TrainConfig(batch_size=4, epochs=3, seed=5)
    data = train_module.TrainData.__new__(train_module.TrainData)  # the order alone, without a dataset
    data.rows, data.seed, data._order = 1000, cfg.seed, (None, None)
    orders = [data.order(e).copy() for e in range(3)]
    assert all(sorted(o) == list(range(1000)) for o in orders)
    assert not any((a == b).all() for a, b in [(orders[0], orders[1]), (orders[1], orders[2])])
    assert (data.order(1) == orders[1]).all()  # the same (seed, epoch), the same order: resume needs nothing else
    data.seed, data._order = 6, (None, None)
    assert not (data.order(0) == orders[0]).all()


def test_memorization_is_tracked_during_training_once_per_distinct_example(tmp_path):
    rng = np.random.default_rng(1)
    rows = rng.integers(0, 256, (9, 17))
    rows[:, 0] = BOS
    rows[1] = rows[0]  # one example planted twice: 8 distinct examples
    write_dataset(str(tmp_path / "d"), write_tokenizer(tmp_path / "d.tok"), {"train": rows, "val": rows[:2]}, "examples")
    run(tmp_path / "d", tmp_path / "run", "--batch_size=3", "--epochs=60", "--mem_every=20",
        "--mem_prefix_len=4", "--mem_suffix_len=8", "--lr=3e-2")
    tracked = log_rows(tmp_path / "run", "memorization")
    assert [r["step"] for r in tracked] == [0, 60, 120, 180] and [r["epoch"] for r in tracked] == [0, 20, 40, 60]
    assert all(r["examples"] == 8 and r["memorized"] == len(r["indices"]) for r in tracked)
    assert tracked[0]["memorized"] == 0 and 1 not in tracked[-1]["indices"]  # row 1 is row 0 again
    model = load_model(str(tmp_path / "run"))
    flags = memorized_flags(model, np.delete(rows, 1, axis=0), 4, 8)
    assert tracked[-1]["indices"] == [i + (i > 0) for i in np.flatnonzero(flags).tolist()] and flags.sum() > 0


def test_chunked_cross_entropy_equals_the_loss_and_gradients_of_full_logits(monkeypatch):
    monkeypatch.setattr(train_module, "LOSS_CHUNK", 7)  # 3 x 10 positions: chunks of 7, the last of 2
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=300, multiple_of=16))
    model.init_weights()
    rows = torch.randint(0, 300, (3, 11))
    batch = {"inputs": rows[:, :-1], "targets": rows[:, 1:]}
    loss, _ = cross_entropy_loss(model, batch)
    loss.backward()
    chunked = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    full = F.cross_entropy(model(batch["inputs"]).flatten(0, 1), batch["targets"].flatten())
    full.backward()
    assert torch.allclose(loss, full, rtol=1e-6)
    for n, p in model.named_parameters():
        assert torch.allclose(chunked[n], p.grad, rtol=1e-4, atol=1e-7), n


# --- checkpoints and resume ---


@pytest.mark.parametrize("layout", ["examples", "packed"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_resume_continues_bitwise_exactly(data, tmp_path, layout, dtype):
    # 8 examples at batch 4 are 2 steps an epoch: stopping at 3 stops in the middle of an epoch. In
    # bf16 (the presets' precision where the CPU is fast at it) as in fp32: the same operations on
    # the same numbers, so the same bits.
    args = ["--batch_size=4", "--max_steps=8", "--seq_len=32", "--eval_interval=2", f"--dtype={dtype}"]
    run(data[layout], tmp_path / "whole", *args)
    run(data[layout], tmp_path / "parts", *args, "--stop_after=3")
    state = torch.load(tmp_path / "parts" / "train_state.pt", weights_only=True)
    assert state["step"] == 3 and (layout == "packed" or state["epoch"] == 1.5)  # 12 of 8 examples
    run(data[layout], tmp_path / "parts", *args, "--resume")
    assert losses(tmp_path / "parts") == losses(tmp_path / "whole")  # exact float equality
    whole = load_file(tmp_path / "whole" / "model.safetensors")
    parts = load_file(tmp_path / "parts" / "model.safetensors")
    assert all(torch.equal(whole[k], parts[k]) for k in whole)
    # The folder is self-describing and loads as a model.
    meta = json.loads((tmp_path / "parts" / "config.json").read_text())
    assert meta["step"] == 8 and meta["train_config"]["max_steps"] == 8 and meta["model_args"]["dim"] == 32
    assert meta["tokenizer_sha256"] == hashlib.sha256((tmp_path / "parts" / "tokenizer.model").read_bytes()).hexdigest()
    assert load_model(str(tmp_path / "parts")).args.vocab_size == 512


def test_a_checkpoint_interrupted_mid_write_is_never_resumed(data, tmp_path, monkeypatch):
    args = ["--batch_size=4", "--max_steps=6", "--seq_len=32", "--save_interval=2"]
    run(data["packed"], tmp_path / "whole", *args)
    reference = losses(tmp_path / "whole")

    # Killed while writing step 4's checkpoint: its weights and config.json are written, its
    # train_state.pt is not. Resuming must take step 2's checkpoint, whole.
    out, save, saves = tmp_path / "killed_writing", torch.save, []

    def save_then_die(*a, **k):
        saves.append(1)
        if len(saves) == 2:
            raise KeyboardInterrupt
        save(*a, **k)

    monkeypatch.setattr(torch, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(data["packed"], out, *args)
    monkeypatch.setattr(torch, "save", save)
    assert (out / ".tmp-ckpt" / "model.safetensors").exists()
    run(data["packed"], out, *args, "--resume")
    assert losses(out) == reference and not (out / ".tmp-ckpt").exists()

    # Killed while moving a complete checkpoint into place: model.safetensors is step 4's already,
    # the other files are still step 2's, and step 4's wait in .ckpt-ready/.
    out, step4 = tmp_path / "killed_moving", tmp_path / "step4"
    run(data["packed"], step4, *args, "--stop_after=4")
    run(data["packed"], out, *args, "--stop_after=2")
    (out / ".ckpt-ready").mkdir()
    shutil.copy(step4 / "model.safetensors", out / "model.safetensors")
    for name in ("config.json", "tokenizer.model", "train_state.pt"):
        shutil.copy(step4 / name, out / ".ckpt-ready" / name)
    run(data["packed"], out, *args, "--resume")
    got = losses(out)
    assert got[5] == reference[5] and got[6] == reference[6] and not (out / ".ckpt-ready").exists()


def test_fine_tunes_from_own_and_hugging_face_checkpoints(data, tmp_path):
    run(data["examples"], tmp_path / "base", "--batch_size=8", "--epochs=30")
    export_hf(load_model(str(tmp_path / "base")), str(tmp_path / "hf"))
    first = {}
    for name in ("base", "hf"):
        run(data["examples"], tmp_path / f"ft_{name}", "--batch_size=8", "--max_steps=1", "--warmup_steps=0",
            f"--init_from={tmp_path / name}")
        first[name] = losses(tmp_path / f"ft_{name}")[1]
    # The same weights either way, far past where a fresh model starts.
    assert first["base"] == pytest.approx(first["hf"], abs=1e-5)
    assert first["base"] < losses(tmp_path / "base")[1] - 3


# --- the API distill.py builds on ---


@dataclasses.dataclass
class KDConfig(TrainConfig):
    teacher: str = ""
    alpha: float = 0.5


def test_a_subclassed_config_loss_fn_and_frozen_model_plug_into_the_loop(data, tmp_path):
    run(data["examples"], tmp_path / "teacher", "--batch_size=8", "--epochs=20")
    cfg = parse_config(KDConfig, [f"--data={data['examples']}", f"--out_dir={tmp_path / 'student'}", *TINY,
                                  "--batch_size=4", "--max_steps=4", f"--teacher={tmp_path / 'teacher'}",
                                  "--alpha=0.25"])
    seen = {}

    def setup_hook(ctx):
        seen["teacher"] = prepare_frozen_model(load_model(cfg.teacher), ctx)

    def loss_fn(model, batch):
        assert set(batch) == {"inputs", "targets"} and batch["inputs"].shape == (4, 16)
        with torch.no_grad():
            teacher_logp = seen["teacher"](batch["inputs"]).float().log_softmax(-1)
        student_logp = model(batch["inputs"]).float().log_softmax(-1)
        ce = -student_logp.gather(-1, batch["targets"][..., None]).mean()
        kl = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1).mean()
        teacher_ce = -teacher_logp.gather(-1, batch["targets"][..., None]).mean()
        return ce + cfg.alpha * kl, {"ce": ce, "kl": kl, "teacher_ce": teacher_ce}

    summary = train(cfg, loss_fn=loss_fn, setup_hook=setup_hook)
    teacher = seen["teacher"]
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    saved_teacher = load_model(str(tmp_path / "teacher")).state_dict()  # trained beside it, never updated
    assert all(torch.equal(v, saved_teacher[k]) for k, v in teacher.state_dict().items())
    rows, val = log_rows(tmp_path / "student", "train"), log_rows(tmp_path / "student", "val")[-1]
    assert all(r["loss"] == pytest.approx(r["ce"] + 0.25 * r["kl"]) for r in rows)
    # Validation still reports the student's own cross-entropy, next to the loss's metrics.
    assert val["val_ppl"] == pytest.approx(math.exp(val["val_loss"])) and "val_kl" in val
    # The frozen teacher scores the validation rows as it did at the end of its own run.
    teacher_val = json.loads((tmp_path / "teacher" / "config.json").read_text())["val_loss"]
    assert val["val_teacher_ce"] == pytest.approx(teacher_val, rel=1e-5)
    assert summary["val_loss"] == val["val_loss"]
    saved = json.loads((tmp_path / "student" / "config.json").read_text())["train_config"]
    assert saved["alpha"] == 0.25 and saved["teacher"] == str(tmp_path / "teacher")


# --- errors: one sentence, nothing overwritten ---


def test_missing_dataset_and_unknown_key_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="run prepare.py first"):
        main([f"--data={tmp_path / 'nowhere'}", f"--out_dir={tmp_path / 'out'}"])
    with pytest.raises(UserError, match="unknown config key 'batchsize'"):
        main(["--batchsize=4"])
    assert not (tmp_path / "out").exists()


def test_batch_larger_than_the_dataset_is_a_clear_error(data, tmp_path):
    with pytest.raises(UserError, match=r"--batch_size=16 is larger than the training split \(8 examples\)"):
        run(data["examples"], tmp_path / "out", "--batch_size=16")


def test_tokenizer_or_vocabulary_that_differs_from_the_checkpoint_is_refused(data, tmp_path):
    ckpt = tmp_path / "ckpt"
    run(data["examples"], ckpt, "--batch_size=4", "--max_steps=1", "--warmup_steps=1")
    before = file_hashes(ckpt)
    other_file = examples_dataset(tmp_path / "other_file", shift=1)  # same 512 tokens, other bytes
    other_vocab = examples_dataset(tmp_path / "other_vocab", n_ranks=300)
    with pytest.raises(UserError, match="was trained with another tokenizer than the data in"):
        run(other_file, tmp_path / "ft", f"--init_from={ckpt}", "--batch_size=4")
    with pytest.raises(UserError, match="has a vocabulary of 512 tokens but .* has 556"):
        run(other_vocab, tmp_path / "ft", f"--init_from={ckpt}", "--batch_size=4")
    # Resuming on other data, even with --overwrite, stops before anything is written.
    with pytest.raises(UserError, match="another tokenizer"):
        run(other_file, ckpt, "--batch_size=4", "--max_steps=1", "--warmup_steps=1", "--resume")
    assert file_hashes(ckpt) == before and not (tmp_path / "ft").exists()


def test_existing_checkpoint_needs_resume_or_overwrite(data, tmp_path):
    out = tmp_path / "out"
    run(data["examples"], out, "--batch_size=4", "--max_steps=2")
    before = file_hashes(out)
    with pytest.raises(UserError, match="already holds a checkpoint; pass --resume"):
        run(data["examples"], out, "--batch_size=4", "--max_steps=2")
    with pytest.raises(UserError, match="--resume needs the saved run's --max_steps=2, not 5"):
        run(data["examples"], out, "--batch_size=4", "--max_steps=5", "--resume")
    assert file_hashes(out) == before
    run(data["examples"], out, "--batch_size=4", "--max_steps=3", "--overwrite")
    assert json.loads((out / "config.json").read_text())["step"] == 3 and list(losses(out)) == [1, 2, 3]


# Settings that are refused, each with what the refusal names. Every one of them comes with
# --overwrite onto a folder that holds a trained checkpoint: the refusal must leave it as it was.
REFUSED = {
    "memorization lengths longer than the examples": (["--mem_every=1", "--mem_prefix_len=10", "--mem_suffix_len=10"],
                                                       "must fit the 17-token examples"),
    "a missing --mem_data": (["--mem_every=1", "--mem_data={tmp}/nowhere"], "not a prepared dataset"),
    "a packed --mem_data": (["--mem_every=1", "--mem_data={packed}"], "must hold examples"),
    "a model shape that does not divide": (["--dim=30", "--n_heads=4"], "the model shape does not work"),
    "an --init_from that is not a checkpoint": (["--init_from={tmp}"], "is missing or incomplete"),
    "an --init_from with another tokenizer": (["--init_from={other}"], "another tokenizer"),
    "a batch larger than the data": (["--batch_size=16"], "larger than the training split"),
    "a warm-up longer than the run": (["--warmup_steps=50"], "goes beyond the end of the run"),
    "a micro-batch that does not divide the batch": (["--micro_batch_size=3"], "--micro_batch_size=3"),
}


@pytest.mark.parametrize("case", REFUSED, ids=list(REFUSED))
def test_a_refused_setting_leaves_the_run_folder_as_it_was_even_with_overwrite(data, tmp_path, case):
    out = tmp_path / "run"
    run(data["examples"], out, "--batch_size=4", "--max_steps=2")
    other = tmp_path / "other_run"
    run(examples_dataset(tmp_path / "other_data", shift=1), other, "--batch_size=4", "--max_steps=2")
    before = file_hashes(out)
    args, says = REFUSED[case]
    args = [a.format(tmp=tmp_path, packed=data["packed"], other=other) for a in args]
    with pytest.raises(UserError, match=says):
        run(data["examples"], out, "--batch_size=4", "--max_steps=4", "--overwrite", *args)
    assert file_hashes(out) == before  # every file there, byte for byte, and no other


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(data, tmp_path):
    out, calls = tmp_path / "out", []

    def loss_fn(model, batch):  # fine for two steps, then NaN
        calls.append(1)
        loss, metrics = cross_entropy_loss(model, batch)
        return (loss if len(calls) <= 2 else loss * float("nan")), metrics

    with pytest.raises(UserError, match=r"loss became nan at step 3, .*checkpoint of step 2 in .* is kept"):
        run(data["examples"], out, "--batch_size=4", "--max_steps=6", "--save_interval=2", loss_fn=loss_fn)
    assert json.loads((out / "config.json").read_text())["step"] == 2
    assert torch.load(out / "train_state.pt", weights_only=True)["step"] == 2
    weights = load_file(out / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


# --- the batch arithmetic of every preset -------------------------------------------------------

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINING_PRESETS = sorted(os.path.relpath(p, REPO) for name in ("teacher", "baseline", "student")
                          for p in glob.glob(os.path.join(REPO, "configs", "*", f"{name}.toml")))


def test_the_micro_batch_is_capped_at_each_process_share():
    assert batch_plan(128, 64, 8) == (16, 16, 1)  # configs/gpu launched on 8 GPUs
    assert batch_plan(128, 32, 2) == (64, 32, 2)
    assert batch_plan(16, None, 1) == (16, 16, 1)
    for batch_size, micro, world in [(10, None, 4), (12, 5, 1), (4, None, 8)]:
        with pytest.raises(UserError, match=f"--batch_size={batch_size} must divide into {world} process"):
            batch_plan(batch_size, micro, world)


@pytest.mark.parametrize("preset", TRAINING_PRESETS)
def test_every_training_preset_keeps_its_global_batch_at_1_2_4_and_8_processes(preset):
    from distill import DistillConfig  # its settings are a superset of train.py's
    cfg = parse_config(DistillConfig, [f"--config={os.path.join(REPO, preset)}"])
    for world in (1, 2, 4, 8):
        per_rank, micro, accumulation = batch_plan(cfg.batch_size, cfg.micro_batch_size, world)
        assert per_rank * world == cfg.batch_size
        assert micro * accumulation == per_rank and micro <= per_rank
        if cfg.micro_batch_size and cfg.micro_batch_size <= per_rank:
            assert micro == cfg.micro_batch_size  # the preset's micro-batch where it fits


def test_the_presets_of_all_three_folders_are_checked():
    assert len(TRAINING_PRESETS) >= 9, TRAINING_PRESETS  # reproduce, gpu, llama32
