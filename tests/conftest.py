"""Fixtures shared by test_memorize.py and test_extract.py: a dataset of random-token examples and a
family of tiny models, each trained until it has its rows by heart."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from checkpoint import save_model
from data import write_dataset
from model import ModelArgs, Transformer
from tokenizer import train_bpe

L, P, S = 24, 7, 8  # examples of 24 tokens (BOS included), prompts of BOS + 7, suffix 8
N_TRAIN = 16
TEACHER_ROWS, BASELINE_ROWS = [0, 1, 2, 3, 4, 5], [0, 1, 2]
SOFT_ROWS, HARD_ROWS = [0, 1], [0, 3]
# Row 12 copies row 0 except the suffix's 4th token: a model that memorized row 0 continues row
# 12's prefix with row 0's suffix, which matches row 12's in every position but that one.
NEAR_COPY, CHANGED_AT = 12, 3


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices gain nothing from intra-op threads, and on a busy machine two threads that wait
    for each other made these tests ten times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model(seed, vocab_size=512):
    torch.manual_seed(seed)
    m = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab_size,
                              multiple_of=32, max_seq_len=64))
    m.init_weights()
    return m.eval()


def train_to_memorize(rows, seed, steps=40):
    """Full-batch AdamW on a few rows until the model has them by heart."""
    model = tiny_model(seed).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    x = torch.from_numpy(np.asarray(rows, dtype=np.int64))
    for _ in range(steps):
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """A dataset folder of random-token examples and a trained family saved as checkpoints."""
    root = tmp_path_factory.mktemp("mem")
    tok = train_bpe(["some text"], 512, str(root / "tok.model"), progress=False)  # bytes only: ids 0..255
    rng = np.random.default_rng(0)
    rows = np.concatenate([np.full((N_TRAIN, 1), tok.bos_id), rng.integers(0, 256, (N_TRAIN, L - 1))], 1)
    rows[NEAR_COPY] = rows[0]
    rows[NEAR_COPY, 1 + P + CHANGED_AT] = (rows[0, 1 + P + CHANGED_AT] + 1) % 256
    val = np.concatenate([np.full((4, 1), tok.bos_id), rng.integers(0, 256, (4, L - 1))], 1)
    data = str(root / "data")
    write_dataset(data, str(root / "tok.model"), {"train": rows, "val": val}, "examples")
    models, paths = {}, {}
    for i, (name, idx) in enumerate([("teacher", TEACHER_ROWS), ("baseline", BASELINE_ROWS),
                                     ("student_soft", SOFT_ROWS), ("student_hard", HARD_ROWS)]):
        models[name] = train_to_memorize(rows[idx], seed=i)
        paths[name] = str(root / name)
        save_model(models[name], paths[name], extra={"tokenizer_sha256": tok.sha256})
    return dict(root=root, data=data, rows=rows, val=val, tok=tok, models=models, paths=paths)


def models_arg(w, names=("teacher", "baseline", "student_soft", "student_hard")):
    return "--models=" + ",".join(f"{n}:{w['paths'][n]}" for n in names)
