"""Specification of train.py under torchrun on 2 CPU processes (gloo): DDP and FSDP2 follow the
one-process loss curve for the same global batch and seed, checkpoints move between FSDP and one
process, and a frozen model joins the loss under both (the way distill.py uses a teacher)."""

import contextlib
import json
import os
import runpy
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from distributed import batch_share
from test_train import TINY, examples_dataset, log_rows, losses, packed_dataset, run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--batch_size=4", "--seq_len=32", "--max_steps=8", "--eval_interval=4"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(script, *args):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
            script, *TINY, *args]


def torchrun(script, *args, check=True, timeout=300):
    result = subprocess.run(torchrun_command(script, *args), cwd=REPO, capture_output=True, text=True,
                            timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


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
    # One process -> FSDP on 2 ranks -> FSDP again -> one process, on the curve of one whole run.
    run(data, tmp_path, *ARGS, "--stop_after=3")
    fsdp = ["--parallel=fsdp", "--resume", "--activation_checkpointing"]
    torchrun("train.py", f"--data={data}", f"--out_dir={tmp_path}", *ARGS, *fsdp, "--stop_after=5")
    assert json.loads((tmp_path / "config.json").read_text())["step"] == 5
    # FSDP saved each rank's shard of the optimizer state, as safetensors: nothing there is pickled.
    shards = sorted(os.listdir(tmp_path / "optimizer"))
    assert len(shards) == 2 and all(name.endswith(".safetensors") for name in shards)
    torchrun("train.py", f"--data={data}", f"--out_dir={tmp_path}", *ARGS, *fsdp, "--stop_after=7")
    run(data, tmp_path, *ARGS, "--resume")
    assert_same_curve(losses(tmp_path), losses(reference), range(1, 9))
    assert not (tmp_path / "optimizer").exists()  # one process saved the whole state in train_state.pt

    # What each rank read of the optimizer state when it resumed: the whole state from one file
    # (step 3) or from the two shards into one process (step 7), half of it per rank from shards.
    read = {row["step"]: row["optimizer_bytes_read_per_rank"] for row in log_rows(tmp_path, "start")}
    assert read[0] is None and read[3] == read[7] > 0
    assert 0.45 < read[5] / read[7] < 0.55, read


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_epochs_with_a_partial_last_batch_and_the_memorization_tracker_match_one_process(tmp_path, parallel):
    # 9 examples x 11 epochs = 99 rows in batches of 4: 24 full steps, then 3 rows, split 1 / 2 over
    # the two ranks. Each epoch must show every example once, in the same order, whatever the process
    # count, and the tracker (its shares gathered; under FSDP on a gathered copy) the same flags.
    data = examples_dataset(tmp_path / "examples", n_train=9)
    args = ["--batch_size=4", "--epochs=11", "--eval_interval=0", "--mem_every=2", "--mem_prefix_len=4",
            "--mem_suffix_len=4"]
    run(data, tmp_path / "one", *args)
    torchrun("train.py", f"--data={data}", f"--out_dir={tmp_path / parallel}", *args, f"--parallel={parallel}")
    one, many = losses(tmp_path / "one"), losses(tmp_path / parallel)
    assert max(one) == 25 and list(many) == list(one)
    assert_same_curve(many, one, one)
    tracked = {d: [(r["epoch"], r["indices"]) for r in log_rows(tmp_path / d, "memorization")] for d in ("one", parallel)}
    # At the start, at the first step past every second epoch (18 rows: steps 5, 9, 14, 18, 23), and at the end.
    assert [e for e, _ in tracked["one"]] == pytest.approx([0, 20 / 9, 4, 56 / 9, 8, 92 / 9, 11], abs=1e-4)
    assert tracked[parallel] == tracked["one"]
    assert tracked["one"][0][1] != tracked["one"][-1][1]  # the flags changed as it learned: a real comparison


# A distillation-like driver: its own config subclass, a frozen teacher and a KL loss that applies
# the student's output layer itself (as a chunked loss would).
KD_DRIVER = textwrap.dedent('''
    import dataclasses, sys
    sys.path.insert(0, {repo!r})
    import torch
    from config import parse_config, run_main
    from checkpoint import load_model
    from distributed import prepare_frozen_model, unwrap
    from train import TrainConfig, train

    @dataclasses.dataclass
    class KDConfig(TrainConfig):
        teacher: str = ""

    def main(argv):
        cfg = parse_config(KDConfig, argv)
        frozen = {{}}

        def setup_hook(ctx):
            frozen["teacher"] = prepare_frozen_model(load_model(cfg.teacher), ctx)

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


# --- a failing rank or a dead launcher ends the job -----------------------------------------------

FAILING_DRIVER = textwrap.dedent('''
    import os, sys
    sys.path.insert(0, {repo!r})
    from config import UserError, parse_config, run_main
    from train import TrainConfig, cross_entropy_loss, train

    calls = []

    def loss_fn(model, batch):
        calls.append(1)
        if os.environ["RANK"] == "1" and len(calls) == 3:
            raise UserError("rank 1 fails on purpose")
        return cross_entropy_loss(model, batch)

    if __name__ == "__main__":
        run_main(lambda argv: train(parse_config(TrainConfig, argv), loss_fn=loss_fn))
''')


def test_one_failing_rank_ends_the_job_with_its_error(data, tmp_path):
    # Rank 0 waits in a collective for rank 1, which raised: the job must end now (the 120 s limit
    # is far below the 30-minute collective timeout that a barrier on the way out would wait for).
    driver = tmp_path / "fails.py"
    driver.write_text(FAILING_DRIVER.format(repo=REPO))
    result = torchrun(str(driver), f"--data={data}", f"--out_dir={tmp_path / 'out'}", *ARGS, "--parallel=fsdp",
                      check=False, timeout=120)
    assert result.returncode != 0
    assert "error: rank 1 fails on purpose" in result.stderr


def alive(pid):
    """Whether process pid exists and is not a zombie (a dead child nobody has reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def children(pid):
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (FileNotFoundError, ProcessLookupError):
                pass
    return found


@contextlib.contextmanager
def launched(cmd, log):
    """torchrun in a session of its own (as a terminal would start it); every process it left
    behind is killed at the end, whatever the test found."""
    launcher = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    workers = []
    try:
        yield launcher, workers
    finally:
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        if launcher.poll() is None:
            launcher.kill()


def kill_and_wait(launcher, workers, seconds):
    """SIGKILL the launcher; True when every worker is gone within `seconds`."""
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait()
    deadline = time.time() + seconds
    while any(map(alive, workers)) and time.time() < deadline:
        time.sleep(0.2)
    return not any(map(alive, workers))


def test_workers_exit_when_their_launcher_is_killed(data, tmp_path):
    out, log = tmp_path / "out", open(tmp_path / "torchrun.log", "w")
    cmd = torchrun_command("train.py", f"--data={data}", f"--out_dir={out}", "--batch_size=4", "--seq_len=32",
                           "--max_steps=1000000", "--parallel=ddp")
    with launched(cmd, log) as (launcher, workers):
        deadline = time.time() + 120
        while not (out / "log.jsonl").exists() or "train" not in (out / "log.jsonl").read_text():
            assert launcher.poll() is None and time.time() < deadline, open(tmp_path / "torchrun.log").read()
            time.sleep(0.2)
        workers += children(launcher.pid)
        assert len(workers) == 2
        assert kill_and_wait(launcher, workers, 60)
        assert "the launcher" in open(tmp_path / "torchrun.log").read()


@pytest.mark.parametrize("after", [0.3, 1.5, 4.0])
def test_workers_exit_within_10_s_when_their_launcher_is_killed_during_start_up(data, tmp_path, after):
    # torchrun killed `after` seconds after its workers appear: while they import torch, join the
    # process group, or load the data. A worker left behind would wait in rendezvous for good.
    cmd = torchrun_command("train.py", f"--data={data}", f"--out_dir={tmp_path / 'out'}", "--batch_size=4",
                           "--seq_len=32", "--max_steps=1000000", "--parallel=ddp")
    with launched(cmd, subprocess.DEVNULL) as (launcher, workers):
        deadline = time.time() + 120
        while len(workers) < 2:
            assert launcher.poll() is None and time.time() < deadline
            workers[:] = children(launcher.pid)
            time.sleep(0.05)
        time.sleep(after)
        assert kill_and_wait(launcher, workers, 10)


def test_batch_shares_are_whole_batches_that_cover_every_item_once():
    for n, batch_size, world in [(48, 8, 2), (50, 8, 3), (5, 8, 2), (64, 4, 8)]:
        shares = [batch_share(n, batch_size, rank, world) for rank in range(world)]
        assert [lo for lo, _ in shares[1:]] == [hi for _, hi in shares[:-1]]  # contiguous, in rank order
        assert shares[0][0] == 0 and shares[-1][1] == n
        assert all(lo % batch_size == 0 for lo, _ in shares)  # one process's batches, never cut
