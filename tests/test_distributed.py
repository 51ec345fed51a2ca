"""Specification of train.py under torchrun on 2 CPU processes (gloo): DDP and FSDP2 follow the
one-process loss curve for the same global batch and seed, checkpoints move between FSDP and one
process, and a frozen model joins the loss under both (the way distill.py uses a teacher)."""

import json
import os
import runpy
import socket
import subprocess
import sys
import textwrap

import pytest

from test_train import TINY, log_rows, losses, packed_dataset, run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--batch_size=4", "--seq_len=32", "--max_steps=8", "--eval_interval=4"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script, *args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           script, *TINY, *args]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


def assert_same_curve(got, expected, steps):
    for step in steps:
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), f"step {step}"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return packed_dataset(tmp_path_factory.mktemp("data") / "packed")


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("one_process")
    run(data, out, *ARGS)
    return out


def test_ddp_with_gradient_accumulation_follows_the_one_process_curve(data, reference, tmp_path):
    # Each of 2 processes takes 2 of the 4 sequences, in 2 micro-batches of 1.
    torchrun("train.py", f"--data={data}", f"--out_dir={tmp_path}", *ARGS, "--parallel=ddp", "--micro_batch_size=1")
    assert_same_curve(losses(tmp_path), losses(reference), range(1, 9))
    assert log_rows(tmp_path, "val")[-1]["val_loss"] == pytest.approx(log_rows(reference, "val")[-1]["val_loss"], rel=1e-5)


def test_fsdp_continues_a_one_process_checkpoint_and_one_process_continues_it(data, reference, tmp_path):
    run(data, tmp_path, *ARGS, "--stop_after=3")
    torchrun("train.py", f"--data={data}", f"--out_dir={tmp_path}", *ARGS, "--parallel=fsdp", "--resume",
             "--stop_after=6", "--activation_checkpointing")
    assert json.loads((tmp_path / "config.json").read_text())["step"] == 6
    run(data, tmp_path, *ARGS, "--resume")
    assert_same_curve(losses(tmp_path), losses(reference), range(1, 9))


# A distillation-like driver: its own config subclass, a frozen teacher and a KL loss that applies
# the student's output layer itself (as a chunked loss would).
KD_DRIVER = textwrap.dedent('''
    import dataclasses, sys
    sys.path.insert(0, {repo!r})
    import torch
    from config import parse_config, run_main
    from model import Transformer
    from train import TrainConfig, prepare_frozen_model, train, unwrap

    @dataclasses.dataclass
    class KDConfig(TrainConfig):
        teacher: str = ""

    def main(argv):
        cfg = parse_config(KDConfig, argv)
        frozen = {{}}

        def setup_hook(ctx):
            frozen["teacher"] = prepare_frozen_model(Transformer.from_pretrained(cfg.teacher), ctx)

        def loss_fn(model, batch):
            with torch.no_grad():
                t = frozen["teacher"](batch["inputs"], doc_ids=batch["doc_ids"]).float().log_softmax(-1)
            h = model(batch["inputs"], doc_ids=batch["doc_ids"], return_hidden=True)
            s = unwrap(model).output(h).float().log_softmax(-1)
            kl = (t.exp() * (t - s)).sum(-1).mean()
            return kl, {{"kl": kl}}

        return train(cfg, loss_fn=loss_fn, setup_hook=setup_hook)

    if __name__ == "__main__":
        run_main(main)
''')


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_a_frozen_teacher_joins_the_loss_under_ddp_and_fsdp(data, reference, tmp_path, parallel):
    driver = tmp_path / "kd.py"
    driver.write_text(KD_DRIVER.format(repo=REPO))
    args = [f"--data={data}", f"--teacher={reference}", *ARGS]
    runpy.run_path(str(driver))["main"]([*TINY, *args, f"--out_dir={tmp_path / 'one'}"])
    torchrun(str(driver), *args, f"--out_dir={tmp_path / parallel}", f"--parallel={parallel}")
    one, many = log_rows(tmp_path / "one", "train"), log_rows(tmp_path / parallel, "train")
    assert_same_curve({r["step"]: r["kl"] for r in many}, {r["step"]: r["kl"] for r in one}, range(1, 9))
    assert one[0]["kl"] > one[-1]["kl"]
    val_one, val_many = log_rows(tmp_path / "one", "val")[-1], log_rows(tmp_path / parallel, "val")[-1]
    assert val_many["val_kl"] == pytest.approx(val_one["val_kl"], rel=1e-5)
    assert val_many["val_loss"] == pytest.approx(val_one["val_loss"], rel=1e-5)
