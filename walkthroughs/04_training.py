# %% [markdown]
# # 4. Training: the loss, the schedule, accumulation, and several processes
#
# Training a language model is: take a batch of token rows, predict every next token, measure the
# cross-entropy, follow its gradient with AdamW, at a learning rate that warms up and then decays.
# This chapter checks each piece against `train.py`: the loss by hand, the warm-up and cosine
# schedule (Llama 3 paper, section 3.4.1), gradient accumulation with the right weights, a short
# training run on text made on the spot with its loss curve, and the same run on two CPU processes
# under DDP and FSDP2 following the one-process curve. About 15 seconds, most of it the two-process runs.

# %%
import lesson  # first: it puts the project's files (model.py, train.py, ...) on the path

import json
import math
import os
import subprocess
import sys

import torch

import prepare
import train
from distributed import Context
from model import ModelArgs, Transformer

check = lesson.Checks("04")
torch.manual_seed(0)
cpu = Context(torch.device("cpu"), torch.float32)  # one process, fp32: what train() sets up

# %% [markdown]
# ## The loss
#
# Inputs are a row without its last token, targets the row without its first: position t predicts
# token t + 1. The loss is the mean over all positions of -log p(target). `train.py` computes it
# through the output layer in chunks of positions, so that the (positions x vocabulary) logits never
# exist all at once; the result is the same.

# %%
args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, multiple_of=32, max_seq_len=64)
llama = Transformer(args)
llama.init_weights()
rows = torch.randint(0, 300, (8, 33))
batch = {"inputs": rows[:, :-1], "targets": rows[:, 1:]}

logits = llama(batch["inputs"])  # (8, 32, 300)
by_hand = -logits.log_softmax(-1).gather(-1, batch["targets"][..., None]).mean()
loss, _ = train.cross_entropy_loss(llama, batch)
check.close("cross-entropy by hand equals train.cross_entropy_loss (chunked)", by_hand, loss)
check("an untrained model is about as unsure as a uniform guess: loss near ln(300)",
      abs(by_hand.item() - math.log(300)) < 0.1)
grad_hand = torch.autograd.grad(by_hand, llama.output.weight)[0]
grad_train = torch.autograd.grad(train.cross_entropy_loss(llama, batch)[0], llama.output.weight)[0]
check.close("... and its gradient too", grad_train, grad_hand, rtol=1e-4, atol=1e-6)

# %% [markdown]
# ## The learning-rate schedule
#
# Linear warm-up from lr / warmup_steps to lr, then a cosine from lr down to min_lr at the last step.

# %%
import matplotlib.pyplot as plt  # noqa: E402

cfg = train.TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=20)
total = 200


def lr_by_hand(step):
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / (total - 1 - cfg.warmup_steps)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress)) / 2


schedule = [train.lr_at(s, cfg, total) for s in range(total)]
check.close("warm-up then cosine, by hand, equals train.lr_at", [lr_by_hand(s) for s in range(total)], schedule)
check("the last step reaches min_lr", math.isclose(schedule[-1], cfg.min_lr))
fig, ax = plt.subplots(figsize=(5, 2.8))
ax.plot(schedule)
ax.set(xlabel="step", ylabel="learning rate", title="warm-up 20 steps, cosine to 1e-4")
lesson.save_figure(fig, "04_schedule")

# %% [markdown]
# ## Gradient accumulation, with the right weights
#
# A batch too large for memory is cut into micro-batches whose gradients add up before one optimizer
# step. Each micro-batch's mean loss must be weighted by its share of the rows: with micro-batches
# of 5 and 3 rows, averaging the two means would count a row of the small one 5/3 times as much.

# %%
uneven = rows[:8]
full = torch.autograd.grad(train.cross_entropy_loss(llama, {"inputs": uneven[:, :-1], "targets": uneven[:, 1:]})[0],
                           llama.output.weight)[0]
parts = [uneven[:5], uneven[5:]]
weighted = sum(torch.autograd.grad(train.cross_entropy_loss(llama, {"inputs": p[:, :-1], "targets": p[:, 1:]})[0]
                                   * len(p) / 8, llama.output.weight)[0] for p in parts)
naive = sum(torch.autograd.grad(train.cross_entropy_loss(llama, {"inputs": p[:, :-1], "targets": p[:, 1:]})[0] / 2,
                                llama.output.weight)[0] for p in parts)
check.close("micro-batch gradients weighted by their share of the rows add up to the batch's", weighted, full,
            rtol=1e-4, atol=1e-7)
check("a plain average of the micro-batch means does not", not torch.allclose(naive, full, rtol=1e-3, atol=1e-6))

micro = train.micro_batches(uneven.numpy(), cpu, 3)  # train.py's split: sizes 3, 3, 2
check("train.micro_batches weighs each micro-batch by its share", [w for _, w in micro] == [3 / 8, 3 / 8, 2 / 8])
llama.zero_grad()
train.accumulate_gradients(llama, micro, train.cross_entropy_loss, cpu)
check.close("train.accumulate_gradients leaves the full batch's gradient", llama.output.weight.grad, full,
            rtol=1e-4, atol=1e-7)

# %% [markdown]
# ## A short run
#
# Text made on the spot: sentences from a small grammar, so there is something to learn. `prepare.py`
# turns the text files into a dataset folder (a BPE tokenizer, train and validation splits of
# packed documents), and `train.py` trains a small Llama on it. The validation loss falls below the
# uniform guess's ln(vocabulary) as the model learns which words follow which.

# %%
corpus = lesson.grammar_corpus(os.path.join(lesson.SCRATCH, "04_corpus"))
print(open(os.path.join(corpus, "doc00.txt")).read()[:160])
prepare.main([f"--input={corpus}", f"--out_dir={lesson.SCRATCH}", "--name=04_data", "--vocab_size=600",
              "--val_fraction=0.2"])
data = os.path.join(lesson.SCRATCH, "04_data")

run_args = ["--model=tiny", "--seq_len=64", "--batch_size=8", "--lr=3e-3", "--warmup_steps=10", "--dtype=fp32",
            "--device=cpu", "--eval_interval=10", "--eval_rows=32", "--log_interval=1"]
one = os.path.join(lesson.SCRATCH, "04_run")
summary = train.main([f"--data={data}", f"--out_dir={one}", "--max_steps=60", "--overwrite", *run_args])


def log(folder, kind):
    with open(os.path.join(folder, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


steps, losses = zip(*[(r["step"], r["loss"]) for r in log(one, "train")])
fig, ax = plt.subplots(figsize=(5, 3))
ax.plot(steps, losses, label="train")
ax.plot([r["step"] for r in log(one, "val")], [r["val_loss"] for r in log(one, "val")], marker="o", label="validation")
ax.axhline(math.log(600), color="grey", ls=":", label="uniform guess")
ax.set(xlabel="step", ylabel="loss (nats per token)", title="a tiny Llama learns the grammar")
ax.legend()
lesson.save_figure(fig, "04_loss_curve")
check(f"validation loss {summary['val_loss']:.2f} is far below the uniform guess's {math.log(600):.2f}",
      summary["val_loss"] < math.log(600) - 3)

# %% [markdown]
# ## The same run on two processes: DDP and FSDP2
#
# Under `torchrun`, each process takes its share of every global batch. **DDP** keeps a whole model
# on every process and averages gradients across processes in the backward pass; **FSDP2** shards
# parameters, gradients and optimizer state across processes, gathering a block's weights just
# before it is used. Either way the global batch and its weighting are the same as one process's,
# so the loss curve is the same up to rounding.
#
# With accumulation (here each process runs 4 micro-batches of 1 row), DDP would average gradients
# across processes after *every* micro-batch's backward. The sum would still come out right, since
# averaging is linear, but the whole gradient would travel over the network 4 times per step instead
# of once: `train.accumulate_gradients` turns synchronization off for all but the last micro-batch
# (`require_backward_grad_sync`, FSDP's `set_requires_gradient_sync`).

# %%
reference = log(one, "train")[:12]
for parallel in ("ddp", "fsdp"):
    out = os.path.join(lesson.SCRATCH, f"04_{parallel}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           f"--data={data}", f"--out_dir={out}", "--max_steps=60", "--stop_after=12", "--overwrite",
           f"--parallel={parallel}", "--micro_batch_size=1", *run_args]
    print(" ".join(cmd[2:]))
    done = subprocess.run(cmd, cwd=lesson.ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    check(f"torchrun {parallel} on 2 processes finished", done.returncode == 0 or print(done.stderr[-3000:]))
    got = log(out, "train")
    check.close(f"{parallel}: the first 12 steps' losses follow the one-process curve",
                [r["loss"] for r in got], [r["loss"] for r in reference], rtol=1e-4, atol=1e-5)

check.done()

# %% [markdown]
# ## Exercises
#
# 1. Train with `--batch_size=8 --micro_batch_size=2` in one process: 4 micro-batches per step.
#    Check that the first 12 losses equal those of the run above (within 1e-4).
# 2. Turn the warm-up off (`--warmup_steps=0`) with `--lr=3e-2`. What happens to the first steps'
#    loss? Check whether the loss at step 5 is above the warmed-up run's.
# 3. Train twice with the same `--seed` into two `--out_dir`s, then once with another seed. Check that
#    the first two runs' losses (`log(folder, "train")`) are equal exactly, and that the third's
#    differ. (The logs' timing columns, tokens/s and MFU, differ between any two runs.)
#
# Next: [05_distillation.py](05_distillation.py).
