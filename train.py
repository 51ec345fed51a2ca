"""
Training: pretraining from scratch or fine-tuning, on one device or many, with exact resume.

- Data from a prepared dataset folder (data.py): fixed-length examples visited epoch by epoch in a
  seeded shuffle, or a packed stream sampled in windows with document masking (Llama 3 paper,
  section 3.2). Which rows make up step k is a function of (seed, k), so resuming needs only k.
- The global batch is a setting; micro-batches and gradient accumulation follow from the number of
  processes, so one process, DDP and FSDP2 (distributed.py) follow the same loss curve.
- AdamW with weight decay on matrices only, linear warm-up then cosine decay to a floor (paper,
  section 3.4.1), gradient clipping, bf16 autocast where the hardware is fast at it, optional
  `torch.compile` and activation checkpointing.
- The loss through the output layer is computed chunk by chunk (`ChunkedOutputLoss`): no full
  (tokens, vocabulary) tensor is alive at once.
- Every setting is checked before anything is written; a checkpoint enters the run folder only once
  complete, and `--resume` continues exactly (checkpoint.py). With --mem_every, which examples the
  model has memorized is logged as it trains (memorize.py's flag).
- `train(cfg, loss_fn)` runs the whole job with another loss: distill.py plugs in its distillation
  loss and a frozen teacher without copying the loop.

    python train.py --data=data/shakespeare --model=small --max_steps=2000
    torchrun --nproc_per_node=8 train.py --parallel=fsdp --data=... --model=gpu-100m
"""

import functools
import json
import math
import os
import resource
import sys
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from checkpoint import (check_fits_data, check_run_dir, clear_run_dir, load_model, restore_train_state,
                        save_checkpoint)
from config import (UserError, above, at_least, between, check_output_folder, config_dict, one_of, parse_config,
                    positive, progress_bar, run_main, seed_range, setting, write_atomic)
from data import open_split, read_info
from distributed import (DEVICES, DTYPES, PARALLEL, mean_over_ranks, peak_flops, processes, unwrap,
                         wrap_for_training)
from memorize import MemorizationTracker
from model import CONFIGS, ModelArgs, Transformer, doc_ids_from_bos


@dataclass
class TrainConfig:
    # data and model
    data: str = setting("data/shakespeare", "dataset folder written by prepare.py")
    out_dir: str = setting("out/train", "run folder: checkpoint and log.jsonl")
    init_from: str = setting("", "fine-tune this checkpoint folder (own, Meta or Hugging Face); empty: from scratch")
    model: str = setting("small", "named shape from model.CONFIGS, when training from scratch", one_of(*CONFIGS))
    dim: Optional[int] = setting(None, "override the named shape's width", positive)
    n_layers: Optional[int] = setting(None, "override the named shape's number of blocks", positive)
    n_heads: Optional[int] = setting(None, "override the named shape's query heads", positive)
    n_kv_heads: Optional[int] = setting(None, "override the named shape's key/value heads", positive)
    seq_len: int = setting(256, "tokens per training window of packed data (examples keep their length)", positive)
    # batch and length of the run
    batch_size: int = setting(16, "global batch in sequences, over all processes", positive)
    micro_batch_size: Optional[int] = setting(None, "sequences per device per forward (default and cap: the process's share)",
                                              positive)
    epochs: int = setting(1, "passes over the training data, unless max_steps or tokens is set", positive)
    max_steps: Optional[int] = setting(None, "optimizer steps of the whole run", positive)
    tokens: Optional[int] = setting(None, "training tokens of the whole run", positive)
    stop_after: Optional[int] = setting(None, "stop and save at this step; the schedule still plans the whole run",
                                        positive)
    # optimizer and schedule
    lr: float = setting(1e-3, "peak learning rate", above(0))
    min_lr: float = setting(1e-4, "floor of the cosine decay", at_least(0))
    warmup_steps: int = setting(100, "steps of linear warm-up", at_least(0))
    weight_decay: float = setting(0.1, "AdamW weight decay, on matrices only", at_least(0))
    beta1: float = setting(0.9, "AdamW beta1", between(0, 1, high_open=True))
    beta2: float = setting(0.95, "AdamW beta2", between(0, 1, high_open=True))
    grad_clip: float = setting(1.0, "clip the gradient norm to this (0: no clipping)", at_least(0))
    # evaluation, logging, checkpoints
    eval_interval: int = setting(200, "evaluate every this many steps (0: only at the end)", at_least(0))
    eval_rows: int = setting(512, "validation sequences per evaluation (0: the whole split)", at_least(0))
    log_interval: int = setting(10, "write a training row to log.jsonl every this many steps", positive)
    save_interval: int = setting(0, "save a checkpoint every this many steps (0: only at the end)", at_least(0))
    resume: bool = setting(False, "continue the checkpoint in out_dir")
    overwrite: bool = setting(False, "start afresh in an out_dir that holds a checkpoint")
    # system
    device: str = setting("auto", "auto: cuda > mps > cpu", one_of(*DEVICES))
    dtype: str = setting("auto", "auto: bf16 where the hardware is fast at it", one_of(*DTYPES))
    parallel: str = setting("auto", "auto: ddp when torchrun starts several processes", one_of(*PARALLEL))
    compile: bool = setting(False, "torch.compile each block")
    activation_checkpointing: bool = setting(False, "recompute block activations in the backward pass")
    seed: int = setting(1337, "drives initialization and data order", seed_range)
    # memorization dynamics (memorize.py's exact-match flag, one teacher-forced pass, in fp32)
    mem_every: float = setting(0.0, "every this many epochs, and at the start, log which examples of --mem_data "
                                    "the model reproduces exactly from their prefix (0: off)", at_least(0))
    mem_data: str = setting("", "the examples whose memorization is tracked (default: --data)")
    mem_prefix_len: int = setting(32, "tracked memorization: P, prompt tokens after BOS (memorize.py's rule)", positive)
    mem_suffix_len: int = setting(32, "tracked memorization: tokens to reproduce", positive)


# Settings that fix the data order and the learning-rate schedule: a resumed run must keep them.
PLAN_KEYS = ("seq_len", "batch_size", "epochs", "max_steps", "tokens", "lr", "min_lr", "warmup_steps", "seed")

# ----------------------------------------------------------------------------------------------
# Data: which rows make up each step's batch is a function of (seed, step), so resuming needs
# nothing but the step.


class TrainData:
    """The training rows of every step. Examples are visited as one stream of epochs, each a fresh
    seeded permutation, and step k takes the next batch_size rows of it: every example is seen
    exactly once per epoch (a batch may span two epochs), and a run of E epochs ends with a partial
    batch when E * N is not a multiple of the batch. Packed data is sampled in random windows."""

    def __init__(self, cfg, info):
        self.split = open_split(cfg.data, "train")
        self.packed = info["layout"] == "packed"
        self.seq_len = cfg.seq_len if self.packed else info["example_len"] - 1
        self.batch_size, self.seed = cfg.batch_size, cfg.seed
        self.rows = (len(self.split) - 1) // self.seq_len if self.packed else len(self.split)
        if self.rows < cfg.batch_size:
            what = f"{self.rows} windows of {self.seq_len} tokens" if self.packed else f"{self.rows} examples"
            raise UserError(f"--batch_size={cfg.batch_size} is larger than the training split ({what}); lower it")
        # A run measured in epochs ends where the stream does; one of max_steps or tokens runs on.
        by_epochs = not (cfg.max_steps or cfg.tokens) and not self.packed
        self.end = cfg.epochs * self.rows if by_epochs else math.inf
        self._order = (None, None)  # (epoch, its permutation of the examples)

    def tracking_due(self, step, last_step, every_rows):
        """Whether memorization is measured after `step` steps: at the start, after every
        every_rows training rows (--mem_every epochs), and at the end."""
        seen = lambda s: min(s * self.batch_size, self.end)  # noqa: E731
        return step == 0 or step == last_step or seen(step) // every_rows > seen(step - 1) // every_rows

    def steps_for_epochs(self, epochs):
        return math.ceil(epochs * self.rows / self.batch_size)

    def epoch_at(self, step):
        """Epochs done after `step` steps: a float."""
        return min(step * self.batch_size, self.end) / self.rows

    def order(self, epoch):
        if self._order[0] != epoch:  # drawn from (seed, epoch): resuming needs nothing but the step
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.rows))
        return self._order[1]

    def global_batch(self, step):
        """(rows, seq_len + 1) int64 token rows of optimizer step `step` (0-based); rows is
        batch_size except for the partial last batch of a run measured in epochs."""
        if self.packed:  # windows at random offsets, drawn from (seed, step)
            starts = np.random.default_rng([self.seed, step]).integers(0, len(self.split) - self.seq_len, self.batch_size)
            return np.stack([self.split[s:s + self.seq_len + 1] for s in starts]).astype(np.int64)
        lo, hi = step * self.batch_size, min((step + 1) * self.batch_size, self.end)
        picked = []
        for epoch in range(lo // self.rows, (hi - 1) // self.rows + 1):
            start = epoch * self.rows
            picked.append(self.order(epoch)[max(lo, start) - start:min(hi, start + self.rows) - start])
        return self.split[np.concatenate(picked)].astype(np.int64)


def validation_rows(cfg, info, seq_len, world_size):
    """The fixed validation sequences: the first examples, or consecutive windows of the stream,
    cut to a multiple of the process count so that every rank runs the same forwards."""
    split = open_split(cfg.data, "val")
    if info["layout"] == "packed":
        split = np.lib.stride_tricks.sliding_window_view(split, seq_len + 1)[::seq_len]
    rows = split[:cfg.eval_rows or len(split)]
    rows = rows[:len(rows) // world_size * world_size]
    if len(rows) == 0:
        raise UserError(f"the validation split of {cfg.data} holds fewer sequences than processes; prepare more data")
    return np.array(rows, dtype=np.int64)


def batch_plan(batch_size, micro_batch_size, world_size):
    """How a step's global batch splits: (sequences per process, micro-batch size, micro-batches per
    step). The micro-batch is capped at a process's share, so a preset written for few processes
    also runs on many (configs/gpu: 128 sequences in micro-batches of 64 become 16 on 8 GPUs)."""
    per_rank = batch_size // world_size
    micro = min(micro_batch_size or per_rank, per_rank)
    if batch_size % world_size or per_rank < 1 or micro < 1 or per_rank % micro:
        raise UserError(f"--batch_size={batch_size} must divide into {world_size} process(es) "
                        f"x micro-batches of --micro_batch_size={micro_batch_size or per_rank}")
    return per_rank, micro, per_rank // micro


def micro_batches(rows, ctx, micro_batch_size, bos_id=None):
    """This process's share of the rows (B, T+1), cut into micro-batches on the device: pairs of a
    dict (inputs and targets (b, T); with bos_id, packed data, also each position's document, doc_ids
    (b, T), for document masking) and its weight, the micro-batch's share of the B rows times the
    number of processes (gradients are averaged over processes), so that weighted mean losses add up
    to the batch's mean. A process left without rows (a partial last batch smaller than the process
    count) runs one row at weight 0, so that it still joins the gradient reduction."""
    lo, hi = len(rows) * ctx.rank // ctx.world_size, len(rows) * (ctx.rank + 1) // ctx.world_size
    mine, weight = (rows[lo:hi], 1.0) if hi > lo else (rows[:1], 0.0)
    batches = []
    for chunk in torch.from_numpy(mine).split(micro_batch_size):
        chunk = chunk.to(ctx.device)
        batch = {"inputs": chunk[:, :-1], "targets": chunk[:, 1:]}
        if bos_id is not None:
            batch["doc_ids"] = doc_ids_from_bos(batch["inputs"], bos_id)
        batches.append((batch, weight * len(chunk) * ctx.world_size / len(rows)))
    return batches


# ----------------------------------------------------------------------------------------------
# The model: built from a named shape or loaded, and the loss through its output layer


def build_model(cfg, info, seq_len):
    """The model to train, fp32 on the CPU: the run's own checkpoint (--resume), a pretrained one
    (--init_from), or a fresh one of the named shape with the data's vocabulary. Every rank builds
    the whole model (simple; for models too large for that, torchtitan builds on the meta device)."""
    path = cfg.out_dir if cfg.resume else cfg.init_from
    if path:
        model = load_model(path)
    else:
        shape = {**CONFIGS[cfg.model], "vocab_size": info["vocab_size"]}
        shape.update({k: getattr(cfg, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads") if getattr(cfg, k)})
        shape["max_seq_len"] = max(shape.get("max_seq_len", seq_len), seq_len)
        try:
            args = ModelArgs(**shape)
        except ValueError as e:
            raise UserError(f"the model shape does not work: {e}") from None
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        model = Transformer(args)
        model.init_weights()
    if seq_len > model.args.max_seq_len:
        raise UserError(f"sequences of {seq_len} tokens exceed the model's max_seq_len {model.args.max_seq_len}")
    return model


def place(model, ctx, cfg):
    """The model on ctx.device, compiled and with activation checkpointing if asked, then sharded or
    wrapped for the processes (distributed.py). Returns (model, train_model) as wrap_for_training does."""
    model.to(ctx.device)
    for block in model.layers:
        if cfg.activation_checkpointing:  # keep only block inputs; recompute the rest in backward
            block.forward = functools.partial(torch.utils.checkpoint.checkpoint, block.forward, use_reentrant=False)
        if cfg.compile:
            block.compile()  # in place, so parameter names (and checkpoints) stay the same
    return wrap_for_training(model, ctx)


def flops_per_token(model, seq_len):
    """Training FLOPs per token: 6 per matmul weight (2 forward, 4 backward) plus attention's scores
    and weighted sum, 12 * layers * dim * seq_len (PaLM paper, appendix B). Embedding lookups are free."""
    a = model.args
    matmul_params = model.num_params() - (0 if a.tie_word_embeddings else a.vocab_size * a.dim)
    return 6 * matmul_params + 12 * a.n_layers * a.dim * seq_len


class ChunkedOutputLoss(torch.autograd.Function):
    """The mean over N positions of a loss on the output layer's logits (hidden @ weight.T), chunk by
    chunk: the forward pass forms each chunk's logits in fp32, its loss, and straight away the
    gradient of that loss with respect to the chunk's hidden states and the output weight; the
    backward pass only scales them. So at most one chunk of (tokens, vocabulary) tensors is alive,
    small enough to stay in the CPU's cache, and no logits are recomputed. (On a CPU, the small
    models' training step spent most of its time on full-size logits: softmax, its backward, casts.)

    chunk_loss(logits, rows) -> (summed loss, summed statistics (k,)) for the chunk of positions
    `rows`; logits (chunk, V) fp32. Returns (mean loss, mean statistics)."""

    @staticmethod
    def forward(ctx, hidden, weight, chunk_loss, chunk):
        need_grad = hidden.requires_grad or weight.requires_grad
        n = hidden.shape[0]
        grad_hidden = torch.empty_like(hidden) if need_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_grad else None
        loss_sum, stats_sum = hidden.new_zeros((), dtype=torch.float32), 0.0
        # Under autocast every matrix product below runs in its dtype (bf16): the weight is cast once
        # here, not once per chunk and product (8 MiB of copying per chunk at a 4k x 512 output layer).
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        w = weight.detach().to(dtype)
        for s in range(0, n, chunk):
            rows, h = slice(s, s + chunk), hidden[s:s + chunk].detach().to(dtype)
            with torch.enable_grad():
                logits = F.linear(h, w).float().requires_grad_(need_grad)
                loss, stats = chunk_loss(logits, rows)
                if need_grad:
                    (g,) = torch.autograd.grad(loss, logits)  # (chunk, V) fp32
            if need_grad:
                g = g.to(dtype)
                grad_hidden[rows] = g @ w
                grad_weight += (g.t() @ h).float()
            loss_sum += loss.detach()
            stats_sum = stats_sum + stats.detach()
        if need_grad:
            ctx.save_for_backward(grad_hidden / n, (grad_weight / n).to(weight.dtype))
        stats = stats_sum / n
        ctx.mark_non_differentiable(stats)
        return loss_sum / n, stats

    @staticmethod
    def backward(ctx, grad_loss, grad_stats):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, grad_weight * grad_loss, None, None


# Positions per chunk of the output layer's loss: (256, 4096) fp32 logits are 4 MiB, which fits a
# CPU core's L2 cache with room to spare; on the `small` model a bf16 step ran 1.3x faster than
# with all 2,048 positions at once (under load), and chunks of 128 or 512 were no faster.
LOSS_CHUNK = 256


def cross_entropy_loss(model, batch):
    """The default loss_fn(model, batch) -> (loss, metrics): next-token cross-entropy, mean over
    tokens, from the final hidden states through the output layer in chunks (ChunkedOutputLoss)."""
    hidden = model(batch["inputs"], doc_ids=batch.get("doc_ids"), return_hidden=True)  # (B, T, dim)
    targets = batch["targets"].flatten()

    def chunk_loss(logits, rows):
        return F.cross_entropy(logits, targets[rows], reduction="sum"), logits.new_zeros(0)

    loss, _ = ChunkedOutputLoss.apply(hidden.flatten(0, 1), unwrap(model).output.weight, chunk_loss, LOSS_CHUNK)
    return loss, {}


# ----------------------------------------------------------------------------------------------
# Optimization


def make_optimizer(model, cfg, device):
    """AdamW; weight decay only on matrices (embeddings, projections), not on the norms' gains.
    Fused on CUDA. On a CPU the fused kernel is also 4-5x faster per step, but it rounds differently,
    and that alone changes the default reproduction's outcome (README, "How much one run says")."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")


def check_schedule(cfg, total_steps):
    """The learning-rate plan must fit the run: the warm-up within it, and a decay that goes down."""
    if cfg.warmup_steps > total_steps:
        raise UserError(f"--warmup_steps={cfg.warmup_steps} goes beyond the end of the run (step {total_steps}); "
                        f"lower it (a tenth of the run is usual: --warmup_steps={total_steps // 10})")
    if cfg.min_lr > cfg.lr:
        raise UserError(f"--min_lr={cfg.min_lr} is above --lr={cfg.lr}, but the cosine decays from lr down to "
                        "min_lr; lower --min_lr")


def lr_at(step, cfg, total_steps):
    """Learning rate of optimizer step `step` (0-based): linear warm-up to cfg.lr over warmup_steps,
    then cosine decay reaching min_lr at the last step (Llama 3 paper, section 3.4.1)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total_steps - 1 - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def accumulate_gradients(train_model, batches, loss_fn, ctx):
    """Forward and backward over this process's micro-batches of one step. Returns the loss and
    loss_fn's metrics averaged over the global batch, as if it were one big batch."""
    sums = {}
    for i, (batch, weight) in enumerate(batches):
        sync = i == len(batches) - 1  # reduce gradients across processes once per step
        if ctx.parallel == "ddp":
            train_model.require_backward_grad_sync = sync
        elif ctx.parallel == "fsdp":
            train_model.set_requires_gradient_sync(sync)
        with ctx.autocast():
            loss, metrics = loss_fn(train_model, batch)
        (loss * weight).backward()
        for k, v in {"loss": loss, **metrics}.items():
            sums[k] = sums.get(k, 0.0) + torch.as_tensor(v).detach().float() * weight
    return mean_over_ranks(sums, ctx)


def clip_gradients(model, max_norm):
    """Clip the global gradient norm to max_norm (0: no clipping); returns the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm or float("inf"))
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)  # FSDP: a sharded norm


# ----------------------------------------------------------------------------------------------
# Validation and the log


@torch.no_grad()
def evaluate(model, rows, ctx, micro_batch_size, bos_id=None, loss_fn=None):
    """Validation cross-entropy per token and perplexity, in fp32 (no autocast; under FSDP on CUDA
    the weights are gathered in bf16). With a loss_fn, one forward per batch gives both: its "ce"
    metric is the cross-entropy, and its other metrics are reported as val_<name>."""
    model.eval()
    sums = {"val_loss": 0.0}
    for batch, weight in micro_batches(rows, ctx, micro_batch_size, bos_id):
        metrics = loss_fn(model, batch)[1] if loss_fn else {"ce": cross_entropy_loss(model, batch)[0]}
        for k, v in metrics.items():
            key = "val_loss" if k == "ce" else f"val_{k}"
            sums[key] = sums.get(key, 0.0) + torch.as_tensor(v).float() * weight
    model.train()
    val = mean_over_ranks(sums, ctx)
    return {"val_loss": val["val_loss"], "val_ppl": math.exp(min(val["val_loss"], 700)), **val}


def start_log(cfg, ctx, step):
    """Open log.jsonl on rank 0. A new run starts the folder afresh (its old checkpoint and log go,
    --overwrite having allowed it); a resumed run drops the rows written after its checkpoint, so
    the log reads as if the run had never stopped."""
    if not ctx.is_main:
        return None
    os.makedirs(cfg.out_dir, exist_ok=True)
    path = os.path.join(cfg.out_dir, "log.jsonl")
    if not cfg.resume:
        clear_run_dir(cfg.out_dir)
    elif os.path.isfile(path):
        with open(path) as f:  # a run killed mid-write leaves a partial last line: dropped with the rest
            rows = [line for line in f if line.endswith("\n") and json.loads(line)["step"] <= step
                    and json.loads(line)["kind"] != "end"]  # the stopped run's end is not this run's
        write_atomic(path, rows)
    return open(path, "a")


def write_row(log, row):
    if log is not None:
        log.write(json.dumps(row) + "\n")
        log.flush()


def peak_memory(device):
    """The most memory this process has held: on CUDA what PyTorch allocated on the device, elsewhere
    the process's peak resident memory (Linux and macOS report it in different units)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def run_name(out_dir):
    """The run folder and its parent (out/reproduce/teacher -> reproduce/teacher): which run a
    progress line is about, when make runs several side by side."""
    parts = os.path.normpath(os.path.abspath(out_dir)).split(os.sep)
    return "/".join(parts[-2:])


# ----------------------------------------------------------------------------------------------
# The training job


def train(cfg, loss_fn=None, setup_hook=None, data_hook=None):
    """Run the job cfg describes; returns a summary dict. loss_fn(model, batch) -> (loss, metrics)
    replaces cross-entropy; its metrics must include "ce", the cross-entropy on the batch's targets,
    which validation reports as val_loss. setup_hook(ctx) runs once the model is in place;
    data_hook(ctx) runs once every setting has been checked and may point cfg.data at data it makes
    with the same shape (distill.py's teacher generations)."""
    with processes(cfg.parallel, cfg.device, cfg.dtype) as ctx:
        # ---- every setting checked, and the model read, before anything is written or removed ----
        check_output_folder(cfg.out_dir, "out_dir")
        info = read_info(cfg.data)
        data = TrainData(cfg, info)
        validation_rows(cfg, info, data.seq_len, ctx.world_size)
        total_steps = cfg.max_steps or (math.ceil(cfg.tokens / (cfg.batch_size * data.seq_len)) if cfg.tokens
                                        else data.steps_for_epochs(cfg.epochs))
        check_schedule(cfg, total_steps)
        stop_step = min(total_steps, cfg.stop_after or total_steps)
        _, micro_batch_size, _ = batch_plan(cfg.batch_size, cfg.micro_batch_size, ctx.world_size)
        tracker = MemorizationTracker(cfg.mem_data or cfg.data, cfg.mem_prefix_len, cfg.mem_suffix_len,
                                      info["tokenizer_sha256"]) if cfg.mem_every else None
        check_run_dir(cfg.out_dir, cfg.resume, cfg.overwrite, {k: getattr(cfg, k) for k in PLAN_KEYS}, ctx)
        if cfg.resume or cfg.init_from:
            check_fits_data(cfg.out_dir if cfg.resume else cfg.init_from, info, cfg.data)
        model = build_model(cfg, info, data.seq_len)
        if data_hook is not None:
            data_hook(ctx)
            info, data = read_info(cfg.data), TrainData(cfg, info)
        val_rows = validation_rows(cfg, info, data.seq_len, ctx.world_size)
        bos_id = info["bos_id"] if info["layout"] == "packed" else None

        # ---- model, optimizer, run folder ----------------------------------------------------
        flops_per_step = flops_per_token(model, data.seq_len) * cfg.batch_size * data.seq_len
        model, train_model = place(model, ctx, cfg)
        optimizer = make_optimizer(model, cfg, ctx.device)
        if setup_hook is not None:
            setup_hook(ctx)
        step, optimizer_bytes_read = restore_train_state(model, optimizer, ctx, cfg.out_dir) if cfg.resume else (0, None)
        saved_step = step if cfg.resume else None
        log = start_log(cfg, ctx, step)
        peak, peak_source = peak_flops(ctx.device, ctx.compute_dtype)
        write_row(log, {"kind": "start", "step": step, "total_steps": total_steps, "params": model.num_params(),
                        "world_size": ctx.world_size, "peak_flops": peak, "peak_flops_source": peak_source,
                        "optimizer_bytes_read_per_rank": optimizer_bytes_read})
        if ctx.is_main:
            print(f"{model.num_params() / 1e6:.2f}M parameters on {ctx.world_size} x {ctx.device.type} "
                  f"({ctx.parallel}, {str(ctx.compute_dtype)[6:]}); batch {cfg.batch_size} x {data.seq_len} "
                  f"tokens in micro-batches of {micro_batch_size}; steps {step} -> {stop_step} of {total_steps}")

        def track_memorization(step):
            if tracker is not None and data.tracking_due(step, total_steps, max(1, round(cfg.mem_every * data.rows))):
                memorized = tracker.measure(model, ctx)
                write_row(log, {"kind": "memorization", "step": step, "epoch": round(data.epoch_at(step), 4),
                                "examples": len(tracker.index), "memorized": len(memorized),
                                "indices": memorized.tolist()})

        # ---- the loop ------------------------------------------------------------------------
        if step == 0:
            track_memorization(0)
        bar = progress_bar(total=total_steps, initial=step, disable=not ctx.is_main,
                           desc=f"train {run_name(cfg.out_dir)}", unit="step")
        start_step, stats, val, train_time = step, {}, None, 0.0
        window_steps, window_time = 0, 0.0  # since the last training row of the log
        while step < stop_step:
            t0 = time.perf_counter()
            lr = lr_at(step, cfg, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batches = micro_batches(data.global_batch(step), ctx, micro_batch_size, bos_id)
            stats = accumulate_gradients(train_model, batches, loss_fn or cross_entropy_loss, ctx)
            stats["grad_norm"] = clip_gradients(model, cfg.grad_clip)
            if not all(map(math.isfinite, stats.values())):  # stop before the update spoils the weights
                kept = f"the checkpoint of step {saved_step} in {cfg.out_dir} is kept" if saved_step else "nothing was saved"
                raise UserError(f"the loss became {stats['loss']} at step {step + 1}, so training stopped ({kept}); "
                                "lower --lr or check the data")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            dt = time.perf_counter() - t0
            train_time, window_steps, window_time = train_time + dt, window_steps + 1, window_time + dt
            bar.set_postfix(loss=f"{stats['loss']:.4f}", lr=f"{lr:.2e}")
            bar.update()
            track_memorization(step)

            epoch = round(data.epoch_at(step), 4)
            if step % cfg.log_interval == 0 or step == stop_step:
                write_row(log, {"kind": "train", "step": step, "epoch": epoch, **stats, "lr": lr,
                                "tokens_per_s": window_steps * cfg.batch_size * data.seq_len / window_time,
                                "mfu": window_steps * flops_per_step / window_time / (peak * ctx.world_size)})
                window_steps, window_time = 0, 0.0
            if (cfg.eval_interval and step % cfg.eval_interval == 0) or step == stop_step:
                val = evaluate(model, val_rows, ctx, micro_batch_size, bos_id, loss_fn)
                write_row(log, {"kind": "val", "step": step, "epoch": epoch, **val})
                if ctx.is_main:
                    bar.write(f"step {step}: val loss {val['val_loss']:.4f}, perplexity {val['val_ppl']:.2f}")
            if (cfg.save_interval and step % cfg.save_interval == 0) or step == stop_step:
                save_checkpoint(model, optimizer, ctx, cfg.out_dir, step, epoch,
                                {"tokenizer_sha256": info["tokenizer_sha256"], **(val or {}),
                                 "train_config": config_dict(cfg)}, os.path.join(cfg.data, "tokenizer.model"))
                saved_step = step
        bar.close()

        # ---- summary -------------------------------------------------------------------------
        tokens = (step - start_step) * cfg.batch_size * data.seq_len
        summary = {"step": step, "total_steps": total_steps, "train_loss": stats.get("loss"), **(val or {}),
                   "tokens_per_s": tokens / train_time if tokens else None, "out_dir": cfg.out_dir,
                   "peak_memory_bytes": peak_memory(ctx.device)}
        write_row(log, {"kind": "end", **summary})
        if ctx.is_main and tokens:
            print(f"steps {start_step} -> {step} of {total_steps}: {tokens:,} tokens in {train_time:.1f} s "
                  f"({summary['tokens_per_s']:,.0f} tokens/s); train loss {stats['loss']:.4f}, val loss "
                  f"{val['val_loss']:.4f}, perplexity {val['val_ppl']:.2f}; checkpoint in {cfg.out_dir}")
        if log is not None:
            log.close()
        # DDP's reducer holds the process group. Were it the last to let go, at the return, gloo's
        # threads would be joined while this thread holds the GIL they may need: a hang at exit.
        del train_model
        return summary


def main(argv):
    return train(parse_config(TrainConfig, argv, prog="train.py"))


if __name__ == "__main__":
    run_main(main)
