"""
Training: pretraining from scratch or fine-tuning, on one device or many, with exact resume.

- One loop for CPU, CUDA and MPS, and under `torchrun` for DDP or FSDP2 (`fully_shard` per block,
  then the root; on CUDA bf16 parameters with fp32 gradient reductions).
- Data from a `prepare.py` folder: fixed-length examples visited epoch by epoch in a seeded shuffle,
  or a packed stream sampled in windows with document masking (Llama 3 paper, section 3.2).
- The global batch is a setting; micro-batches and gradient accumulation follow from the number of
  processes, so one process, DDP and FSDP follow the same loss curve.
- AdamW with weight decay on matrices only, linear warm-up then cosine decay to a floor (paper,
  section 3.4.1), gradient clipping, bf16 autocast where the hardware is fast at it, optional
  `torch.compile` and activation checkpointing.
- A checkpoint enters the run folder only once complete, and `--resume` continues exactly
  (bitwise in fp32 on a CPU): the data order is a function of (seed, step).
- `train(cfg, loss_fn, setup_hook)` runs the whole job with another loss: distill.py plugs in its
  distillation loss and a frozen teacher (`prepare_frozen_model`) without copying the loop.

    python train.py --data=data/shakespeare --model=small --max_steps=2000
    torchrun --nproc_per_node=8 train.py --parallel=fsdp --data=... --model=gpu-100m
"""

import contextlib
import functools
import json
import math
import os
import shutil
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

from config import (UserError, above, at_least, between, check_output_folder, config_dict, one_of, parse_config,
                    positive, progress_bar, run_main, seed_range, setting)
from model import CONFIGS, ModelArgs, Transformer, doc_ids_from_bos, load_tensor_file, read_checkpoint_meta
from prepare import distinct_examples, file_sha256, open_split, read_meta


DEVICES = ("auto", "cpu", "cuda", "mps")  # auto: cuda > mps > cpu
DTYPES = ("auto", "fp32", "bf16")  # auto: bf16 where the hardware is fast at it
PARALLEL = ("auto", "none", "ddp", "fsdp")


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
    # memorization dynamics (memorize.py's exact-match flag, one teacher-forced pass)
    mem_every: float = setting(0.0, "every this many epochs, and at the start, log which examples of --mem_data "
                                    "the model reproduces exactly from their prefix (0: off)", at_least(0))
    mem_data: str = setting("", "the examples whose memorization is tracked (default: --data)")
    mem_prefix_len: int = setting(32, "tracked memorization: P, prompt tokens after BOS (memorize.py's rule)", positive)
    mem_suffix_len: int = setting(32, "tracked memorization: tokens to reproduce", positive)


# Settings that fix the data order and the learning-rate schedule: a resumed run must keep them.
PLAN_KEYS = ("seq_len", "batch_size", "epochs", "max_steps", "tokens", "lr", "min_lr", "warmup_steps", "seed")

# ----------------------------------------------------------------------------------------------
# Processes, device and precision


@dataclass
class Context:
    """What `train` set up, handed to `setup_hook(ctx)` and `prepare_frozen_model(model, ctx)`."""
    cfg: TrainConfig
    device: torch.device
    compute_dtype: torch.dtype  # bf16 or fp32
    parallel: str = "none"  # none, ddp or fsdp
    rank: int = 0
    world_size: int = 1
    meta: dict = None  # the dataset's meta.json
    model: torch.nn.Module = None  # the model being trained (sharded in place under FSDP)

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def fsdp_bf16(self):
        """On CUDA, FSDP itself casts parameters to bf16 (and reduces gradients in fp32)."""
        return self.parallel == "fsdp" and self.device.type == "cuda" and self.compute_dtype == torch.bfloat16

    def autocast(self):
        enabled = self.compute_dtype == torch.bfloat16 and not self.fsdp_bf16
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def barrier(self):
        if self.world_size > 1:
            dist.barrier()


def check_choice(key, value, choices):
    if value not in choices:
        raise UserError(f"--{key} is one of {', '.join(choices)}, not {value!r}")


def cpu_has_fast_bf16():
    """x86 CPUs with avx512_bf16 or AMX run bf16 matmuls about 2x faster than fp32 (measured on 2
    cores without AMX: 2.0-2.4x). With attention kept in fp32 on a CPU (model.attention), a bf16
    step of the bench shape runs 1.7x faster than fp32, and small ones 1.1x; the loss stays within 0.5%."""
    try:
        with open("/proc/cpuinfo") as f:
            return bool(set(f.read().split()) & {"avx512_bf16", "amx_bf16"})
    except OSError:
        return False


def pick_device(name, local_rank):
    check_choice("device", name, DEVICES)
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if name == "auto":
        name = "cuda" if available["cuda"] else "mps" if available["mps"] else "cpu"
    if not available[name]:
        raise UserError(f"--device={name}, but this machine has no {name} device PyTorch can use; "
                        "pass --device=auto or --device=cpu")
    return torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)


def pick_dtype(name, device):
    check_choice("dtype", name, DTYPES)
    if name == "auto":
        fast = (device.type == "cuda" and torch.cuda.is_bf16_supported()) or (device.type == "cpu" and cpu_has_fast_bf16())
        name = "bf16" if fast else "fp32"
    return torch.bfloat16 if name == "bf16" else torch.float32


@contextlib.contextmanager
def processes(cfg):
    """Join the process group when torchrun started us (gloo on CPU, nccl on CUDA); yields a Context."""
    check_choice("parallel", cfg.parallel, PARALLEL)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    parallel = cfg.parallel if cfg.parallel != "auto" else ("ddp" if world_size > 1 else "none")
    if parallel != "none" and "RANK" not in os.environ:
        raise UserError(f"--parallel={parallel} runs in several processes: start it with torchrun --nproc_per_node=N")
    if parallel == "none" and world_size > 1:
        raise UserError("--parallel=none cannot run in several processes; pass --parallel=ddp or fsdp")
    device = pick_device(cfg.device, int(os.environ.get("LOCAL_RANK", 0)))
    ctx = Context(cfg, device, pick_dtype(cfg.dtype, device), parallel)
    if parallel != "none":
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
        ctx.rank, ctx.world_size = dist.get_rank(), dist.get_world_size()
        exit_with_launcher()
    yield ctx
    # Only a rank that succeeded gets here: one that raised leaves at once with its error (torchrun
    # then stops the others), where a barrier would wait for ranks stuck in a collective with it.
    if dist.is_initialized():
        dist.barrier()  # FSDP on gloo aborts at exit unless every rank gets here first
        if dist.get_backend() == "gloo":
            # gloo's worker threads need the GIL to free the last collectives' tensors, and FSDP's
            # device mesh keeps them running until the interpreter exits: one that only gets the
            # GIL then aborts the process ("terminate called"). A pause lets them finish first.
            time.sleep(0.2)
        dist.destroy_process_group()


def exit_with_launcher():
    """End this worker when its launcher dies. torchrun starts each worker in a session of its own,
    so a `kill -9` of torchrun would leave the workers running (holding GPU memory) for good."""
    launcher = os.getppid()

    def watch():
        while os.getppid() == launcher:  # an orphan is adopted by another process
            time.sleep(1)
        print(f"error: the launcher (process {launcher}) died; rank {os.environ.get('RANK')} stops too",
              file=sys.stderr, flush=True)
        os._exit(1)

    threading.Thread(target=watch, name="exit_with_launcher", daemon=True).start()


# ----------------------------------------------------------------------------------------------
# Data: which rows make up each step's batch is a function of (seed, step), so resuming needs
# nothing but the step.


class TrainData:
    """The training rows of every step. Examples are visited as one stream of epochs, each a fresh
    seeded permutation, and step k takes the next batch_size rows of it: every example is seen
    exactly once per epoch (a batch may span two epochs), and a run of E epochs ends with a partial
    batch when E * N is not a multiple of the batch. Packed data is sampled in random windows."""

    def __init__(self, cfg, meta):
        self.split = open_split(cfg.data, "train")
        self.packed = meta["layout"] == "packed"
        self.seq_len = cfg.seq_len if self.packed else meta["example_len"] - 1
        self.batch_size, self.seed = cfg.batch_size, cfg.seed
        self.rows = (len(self.split) - 1) // self.seq_len if self.packed else len(self.split)
        if self.rows < cfg.batch_size:
            what = f"{self.rows} windows of {self.seq_len} tokens" if self.packed else f"{self.rows} examples"
            raise UserError(f"--batch_size={cfg.batch_size} is larger than the training split ({what}); lower it")
        # A run measured in epochs ends where the stream does; one of max_steps or tokens runs on.
        by_epochs = not (cfg.max_steps or cfg.tokens) and not self.packed
        self.end = cfg.epochs * self.rows if by_epochs else math.inf
        self._order = (None, None)  # (epoch, its permutation of the examples)

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


def validation_rows(cfg, meta, seq_len, world_size):
    """The fixed validation sequences: the first examples, or consecutive windows of the stream,
    cut to a multiple of the process count so that every rank runs the same forwards."""
    split = open_split(cfg.data, "val")
    if meta["layout"] == "packed":
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


def micro_batches(rows, ctx, micro_batch_size):
    """This process's share of the rows (B, T+1), cut into micro-batches on the device: pairs of a
    dict (inputs and targets (b, T), doc_ids (b, T) for packed data: document masking) and its
    weight, the micro-batch's share of the B rows times the number of processes (gradients are
    averaged over processes), so that weighted mean losses add up to the batch's mean. A process left
    without rows (a partial last batch smaller than the process count) runs one row at weight 0, so
    that it still joins the gradient reduction."""
    lo, hi = len(rows) * ctx.rank // ctx.world_size, len(rows) * (ctx.rank + 1) // ctx.world_size
    mine, weight = (rows[lo:hi], 1.0) if hi > lo else (rows[:1], 0.0)
    batches = []
    for chunk in torch.from_numpy(mine).split(micro_batch_size):
        chunk = chunk.to(ctx.device)
        batch = {"inputs": chunk[:, :-1], "targets": chunk[:, 1:]}
        if ctx.meta["layout"] == "packed":
            batch["doc_ids"] = doc_ids_from_bos(batch["inputs"], ctx.meta["bos_id"])
        batches.append((batch, weight * len(chunk) * ctx.world_size / len(rows)))
    return batches


# ----------------------------------------------------------------------------------------------
# Model: built, parallelized, and what a loss function needs


def check_tokenizer(path, vocab_size, meta, data):
    """The checkpoint at `path` must use the data's tokenizer (same vocabulary, same file when known)."""
    if vocab_size != meta["vocab_size"]:
        raise UserError(f"{path} has a vocabulary of {vocab_size} tokens but {data} has {meta['vocab_size']}; "
                        "prepare the data with the checkpoint's tokenizer (prepare.py --tokenizer=...)")
    files = [os.path.join(path, "tokenizer.model"), os.path.join(path, "original", "tokenizer.model")]
    sha = next((file_sha256(f) for f in files if os.path.isfile(f)), None)
    if sha is None and os.path.isfile(os.path.join(path, "config.json")):
        sha = read_checkpoint_meta(path).get("tokenizer_sha256")
    if sha is not None and sha != meta["tokenizer_sha256"]:
        raise UserError(f"the tokenizer of {path} differs from the one of {data}; prepare the data with "
                        "prepare.py --tokenizer=<the checkpoint's tokenizer.model>")


def build_model(cfg, meta, seq_len):
    """The model to train, fp32 on the CPU: the run's own checkpoint (--resume), a pretrained one
    (--init_from), or a fresh one of the named shape with the data's vocabulary. Every rank builds
    the whole model (simple; for models too large for that, torchtitan builds on the meta device)."""
    path = cfg.out_dir if cfg.resume else cfg.init_from
    if path:
        try:
            model = Transformer.from_pretrained(path)
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"cannot load the checkpoint {path} ({e}); pass a checkpoint folder") from None
        check_tokenizer(path, model.args.vocab_size, meta, cfg.data)
    else:
        check_choice("model", cfg.model, tuple(CONFIGS))
        shape = {**CONFIGS[cfg.model], "vocab_size": meta["vocab_size"]}
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


def flops_per_token(model, seq_len):
    """Training FLOPs per token: 6 per matmul weight (2 forward, 4 backward) plus attention's scores
    and weighted sum, 12 * layers * dim * seq_len (PaLM paper, appendix B). Embedding lookups are free."""
    a = model.args
    matmul_params = model.num_params() - (0 if a.tie_word_embeddings else a.vocab_size * a.dim)
    return 6 * matmul_params + 12 * a.n_layers * a.dim * seq_len


def shard(model, ctx):
    """FSDP2: each block is one unit of all-gather and reduce-scatter; the root holds the rest."""
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if ctx.fsdp_bf16 else MixedPrecisionPolicy()
    for block in model.layers:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)


def parallelize(model, ctx, cfg):
    """Move the model to the device and wrap it for training. Returns (model, train_model): the
    loss calls train_model (DDP syncs gradients through its forward); the rest uses model."""
    model.to(ctx.device)
    for block in model.layers:
        if cfg.activation_checkpointing:  # keep only block inputs; recompute the rest in backward
            block.forward = functools.partial(torch.utils.checkpoint.checkpoint, block.forward, use_reentrant=False)
        if cfg.compile:
            block.compile()  # in place, so parameter names (and checkpoints) stay the same
    if ctx.parallel == "fsdp":
        shard(model, ctx)
    if ctx.parallel == "ddp":  # the rotary tables are constants: no need to sync them every step
        return model, DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                          forward_sync_buffers=False)
    return model, model


def prepare_frozen_model(model, ctx):
    """A model that takes part in the loss without training (distill.py's teacher): on the device,
    in eval mode, without gradients; sharded like the trained model under FSDP, and left unwrapped
    under DDP (it has no gradients to synchronize). Its precision follows ctx.autocast()."""
    model.eval().requires_grad_(False)
    model.to(ctx.device)
    if ctx.parallel == "fsdp":
        shard(model, ctx)
    return model


def unwrap(model):
    """The Transformer inside a DDP wrapper (e.g. to reach model.output in a loss)."""
    return model.module if isinstance(model, DDP) else model


class MemorizationTracker:
    """Which examples of cfg.mem_data the model reproduces exactly (greedy decoding from BOS and the
    first mem_prefix_len tokens gives the next mem_suffix_len), measured in fp32 at the start and every
    cfg.mem_every epochs: when each example is learned by heart. Each distinct example is tested
    once (planted repeats are one example). The examples are split over ranks in equal shares, so
    that every rank runs as many forwards (FSDP's forward is collective)."""

    def __init__(self, cfg, ctx, data):
        path = cfg.mem_data or cfg.data
        meta = read_meta(path)
        if meta["layout"] != "examples" or meta["tokenizer_sha256"] != ctx.meta["tokenizer_sha256"]:
            raise UserError(f"--mem_data={path} must hold examples (layout examples) made with the training "
                            "data's tokenizer; prepare it so or drop --mem_every")
        if 1 + cfg.mem_prefix_len + cfg.mem_suffix_len > meta["example_len"]:
            raise UserError(f"BOS + --mem_prefix_len + --mem_suffix_len must fit the {meta['example_len']}-token examples "
                            f"of {path}; lower them")
        self.cfg, self.ctx, self.data = cfg, ctx, data
        self.rows = open_split(path, "train")
        self.index = distinct_examples(self.rows)[0]
        self.every = max(1, round(cfg.mem_every * data.rows))  # in training rows

    def due(self, step, last_step):
        """At the start, after every mem_every epochs, and at the end."""
        seen = lambda s: min(s * self.data.batch_size, self.data.end)  # noqa: E731
        return step == 0 or step == last_step or seen(step) // self.every > seen(step - 1) // self.every

    @torch.no_grad()
    def measure(self, model):
        """The row indices (into mem_data's train split) of the examples memorized now."""
        from memorize import memorized_flags  # memorize.py imports this file: import at use

        ctx, n = self.ctx, len(self.index)
        share = math.ceil(n / ctx.world_size)
        mine = self.index[np.minimum(np.arange(ctx.rank * share, (ctx.rank + 1) * share), n - 1)]
        model.eval()
        flags = memorized_flags(model, self.rows[mine], self.cfg.mem_prefix_len, self.cfg.mem_suffix_len)  # in fp32
        model.train()
        flags = torch.from_numpy(flags.astype(np.uint8))
        if ctx.world_size > 1:
            parts = [torch.empty_like(flags) for _ in range(ctx.world_size)]
            dist.all_gather(parts, flags)
            flags = torch.cat(parts)
        return self.index[flags[:n].numpy().astype(bool)]


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
        for s in range(0, n, chunk):
            rows, h = slice(s, s + chunk), hidden[s:s + chunk]
            with torch.enable_grad():
                logits = F.linear(h.detach(), weight.detach()).float().requires_grad_(need_grad)
                loss, stats = chunk_loss(logits, rows)
                if need_grad:
                    (g,) = torch.autograd.grad(loss, logits)  # (chunk, V) fp32
            if need_grad:
                g = g.to(h.dtype)
                grad_hidden[rows] = g @ weight.to(h.dtype)
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


def mean_over_ranks(values, ctx):
    """Average a dict of numbers (floats or 0-d tensors) over all processes, in one all-reduce."""
    t = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=ctx.device) for v in values.values()])
    if ctx.world_size > 1:
        dist.all_reduce(t)  # gloo has no AVG: SUM, then divide
        t /= ctx.world_size
    return dict(zip(values, t.tolist()))


def run_name(out_dir):
    """The run folder and its parent (out/reproduce/teacher -> reproduce/teacher): which run a
    progress line is about, when make runs several side by side."""
    parts = os.path.normpath(os.path.abspath(out_dir)).split(os.sep)
    return "/".join(parts[-2:])


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


@torch.no_grad()
def evaluate(model, rows, ctx, micro_batch_size, loss_fn=None):
    """Validation cross-entropy per token and perplexity, in fp32 (no autocast; under FSDP on CUDA
    the weights are gathered in bf16), plus the mean of loss_fn's metrics when one is given."""
    model.eval()
    batches = micro_batches(rows, ctx, micro_batch_size)
    sums = {"val_loss": 0.0}
    for batch, weight in batches:
        sums["val_loss"] += cross_entropy_loss(model, batch)[0] * weight
        for k, v in (loss_fn(model, batch)[1] if loss_fn else {}).items():
            sums[f"val_{k}"] = sums.get(f"val_{k}", 0.0) + torch.as_tensor(v).float() * weight
    model.train()
    val = mean_over_ranks(sums, ctx)
    return {"val_loss": val["val_loss"], "val_ppl": math.exp(min(val["val_loss"], 700)), **val}


# ----------------------------------------------------------------------------------------------
# Checkpoints: the files are written into .tmp-ckpt/, renamed to .ckpt-ready/ once complete (one
# atomic rename), then moved one by one into the run folder. A run killed while writing leaves
# .tmp-ckpt/, discarded at the next start; one killed while moving leaves .ckpt-ready/, whose
# remaining files the next start moves in. So a resume only ever reads a complete checkpoint.
#
# The weights are always gathered into one model.safetensors. The optimizer state (twice the
# weights in fp32) goes into train_state.pt from one process or DDP; under FSDP each rank writes
# only its shard, into optimizer/ (torch.distributed.checkpoint), and reads back only what it
# holds, so no rank ever holds the whole state. Either kind resumes on any number of processes.

OPTIMIZER_DIR = "optimizer"
CKPT_FILES = ("model.safetensors", "config.json", "tokenizer.model", "train_state.pt", OPTIMIZER_DIR)
TMP_DIR, READY_DIR = ".tmp-ckpt", ".ckpt-ready"


def remove_entry(path):
    """Delete a file or a folder (optimizer/) if it is there."""
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)


def finish_interrupted_save(out_dir):
    shutil.rmtree(os.path.join(out_dir, TMP_DIR), ignore_errors=True)
    ready = os.path.join(out_dir, READY_DIR)
    if os.path.isdir(ready):
        for name in CKPT_FILES:
            if os.path.exists(os.path.join(ready, name)):  # the ones already moved are gone
                if os.path.isdir(os.path.join(ready, name)):  # a folder cannot replace a full one
                    remove_entry(os.path.join(out_dir, name))
                os.replace(os.path.join(ready, name), os.path.join(out_dir, name))
        shutil.rmtree(ready)


def save_sharded_optimizer(model, optimizer, path):
    """Every FSDP rank writes its shard of the optimizer's tensors as safetensors, with the offsets
    of its slices in the file's JSON header (torch.distributed.checkpoint's Hugging Face format:
    nothing in it is pickled, unlike DCP's default .metadata file). Returns the param groups
    (learning rate, betas, ...), which go into train_state.pt."""
    state = get_optimizer_state_dict(model, optimizer)  # DTensors: this rank's shards
    dcp.save({"state": state["state"]}, storage_writer=dcp.HuggingFaceStorageWriter(path, save_distributed=True))
    return state["param_groups"]


def load_sharded_optimizer(model, optimizer, path, param_groups):
    """Read the slices of the saved optimizer state that this rank holds now (any number of ranks,
    or one process), straight into the optimizer. Returns the tensors read."""
    state = get_optimizer_state_dict(model, optimizer)  # allocated for the current sharding
    with warnings.catch_warnings():  # one process reading every shard is meant, not a mistake
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        dcp.load({"state": state["state"]}, storage_reader=dcp.HuggingFaceStorageReader(path))
    set_optimizer_state_dict(model, optimizer, {"state": state["state"], "param_groups": param_groups})
    return state["state"]


def local_bytes(state):
    """Bytes of the tensors in a nested dict that this process holds (a DTensor: its own shard)."""
    if isinstance(state, dict):
        return sum(local_bytes(v) for v in state.values())
    if isinstance(state, DTensor):
        return state.to_local().nbytes
    return state.nbytes if isinstance(state, torch.Tensor) else 0


def save_checkpoint(model, optimizer, ctx, step, epoch, extra):
    """Gather the full model (a collective under FSDP); rank 0 writes it with the optimizer state,
    or under FSDP every rank writes its shard of the optimizer state."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    cfg, tmp = ctx.cfg, os.path.join(ctx.cfg.out_dir, TMP_DIR)
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    if ctx.parallel == "fsdp":
        ctx.barrier()  # .tmp-ckpt is clean before any rank writes into it
        optim_state = {"param_groups": save_sharded_optimizer(model, optimizer, os.path.join(tmp, OPTIMIZER_DIR))}
    else:
        optim_state = {"optimizer": get_optimizer_state_dict(model, optimizer, options=options)}
    if ctx.is_main:
        with torch.device("meta"):  # an unsharded model around the gathered tensors, to save them
            full = Transformer(model.args)
        full.load_state_dict(weights, assign=True)
        full.save_pretrained(tmp, extra={"tokenizer_sha256": ctx.meta["tokenizer_sha256"], "step": step,
                                         "epoch": epoch, **extra, "train_config": config_dict(cfg)})
        shutil.copyfile(os.path.join(cfg.data, "tokenizer.model"), os.path.join(tmp, "tokenizer.model"))
        rng = {"torch": torch.get_rng_state()}
        if ctx.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(ctx.device)
        torch.save({**optim_state, "step": step, "epoch": epoch, "rng": rng},
                   os.path.join(tmp, "train_state.pt"))
        os.replace(tmp, os.path.join(cfg.out_dir, READY_DIR))
        finish_interrupted_save(cfg.out_dir)
        if "optimizer" in optim_state:  # an earlier FSDP checkpoint's shards are stale now
            remove_entry(os.path.join(cfg.out_dir, OPTIMIZER_DIR))
    ctx.barrier()


def restore_train_state(model, optimizer, ctx):
    """Load the optimizer state and RNG of the checkpoint in out_dir. Returns its step and the
    bytes of optimizer tensors this process read (the most any rank read, under torchrun)."""
    out_dir = ctx.cfg.out_dir
    path = os.path.join(out_dir, "train_state.pt")
    state = load_tensor_file(path)
    if not isinstance(state, dict) or not {"step", "rng"} <= set(state) or not {"optimizer", "param_groups"} & set(state):
        raise UserError(f"{path} is not a training state written by train.py; pass --overwrite to start afresh")
    if state["step"] != read_checkpoint_meta(out_dir).get("step"):
        raise UserError(f"the checkpoint files in {out_dir} come from different steps; delete them or pass --overwrite")
    if "optimizer" in state:  # one file, read whole by every process
        loaded = state["optimizer"]["state"]
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    else:  # FSDP's shards
        loaded = load_sharded_optimizer(model, optimizer, os.path.join(out_dir, OPTIMIZER_DIR), state["param_groups"])
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and ctx.device.type == "cuda":
        torch.cuda.set_rng_state(state["rng"]["cuda"], ctx.device)
    loaded_bytes = torch.tensor(local_bytes(loaded), dtype=torch.float64, device=ctx.device)
    if ctx.world_size > 1:
        dist.all_reduce(loaded_bytes, op=dist.ReduceOp.MAX)
    return state["step"], int(loaded_bytes)


def check_run_dir(cfg, ctx):
    """Complete or discard an interrupted save, then check that this run may use out_dir."""
    check_output_folder(cfg.out_dir, "out_dir")
    if ctx.is_main:
        finish_interrupted_save(cfg.out_dir)
    ctx.barrier()
    if cfg.resume:
        if not os.path.isfile(os.path.join(cfg.out_dir, "train_state.pt")):
            raise UserError(f"there is no checkpoint to resume in {cfg.out_dir}; drop --resume to start a new run")
        saved = read_checkpoint_meta(cfg.out_dir).get("train_config", {})
        for key in PLAN_KEYS:
            if key in saved and saved[key] != getattr(cfg, key):
                raise UserError(f"--resume needs the saved run's --{key}={saved[key]}, not {getattr(cfg, key)}")
    elif any(os.path.exists(os.path.join(cfg.out_dir, f)) for f in CKPT_FILES) and not cfg.overwrite:
        raise UserError(f"{cfg.out_dir} already holds a checkpoint; pass --resume to continue it, "
                        "--overwrite to replace it, or another --out_dir")


def start_log(cfg, ctx, step):
    """Open log.jsonl on rank 0. A fresh run starts it (and the folder) afresh; a resumed run drops
    the rows written after its checkpoint, so the log reads as if the run had never stopped."""
    if not ctx.is_main:
        return None
    os.makedirs(cfg.out_dir, exist_ok=True)
    path = os.path.join(cfg.out_dir, "log.jsonl")
    if not cfg.resume:  # reached only with --overwrite or with no checkpoint there
        for name in CKPT_FILES + ("log.jsonl",):
            remove_entry(os.path.join(cfg.out_dir, name))
    elif os.path.isfile(path):
        with open(path) as f:  # a run killed mid-write leaves a partial last line: dropped with the rest
            rows = [line for line in f if line.endswith("\n") and json.loads(line)["step"] <= step]
        with open(path + ".tmp", "w") as f:
            f.writelines(rows)
        os.replace(path + ".tmp", path)
    return open(path, "a")


def write_row(log, row):
    if log is not None:
        log.write(json.dumps(row) + "\n")
        log.flush()


# Nominal dense bf16 peak FLOP/s of known GPUs (the first name found in the device's name wins).
GPU_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "B200": 2250e12, "A100": 312e12, "L40S": 362e12,
                  "L4": 121e12, "A10": 125e12, "4090": 165e12, "3090": 71e12}


def peak_flops(ctx):
    """(FLOP/s, how it was found) of one device for MFU: a known GPU's nominal bf16 peak, else
    measured with 1024 x 1024 matmuls in the compute dtype (so a CPU's MFU is against its matmuls)."""
    if ctx.device.type == "cuda":
        name = torch.cuda.get_device_name(ctx.device)
        for key, flops in GPU_PEAK_FLOPS.items():
            if key in name:
                return flops, f"nominal bf16 peak of {name}"
    a = torch.full((1024, 1024), 0.5, dtype=ctx.compute_dtype, device=ctx.device)
    (a @ a)[0, 0].item()  # warm-up; .item() waits for the device
    t0 = time.perf_counter()
    for _ in range(4):
        b = a @ a
    b[0, 0].item()
    return 4 * 2 * 1024**3 / (time.perf_counter() - t0), f"measured {str(ctx.compute_dtype)[6:]} matmul on {ctx.device.type}"


# ----------------------------------------------------------------------------------------------
# The training job


def train(cfg, loss_fn=None, setup_hook=None, data_hook=None):
    """Run the job cfg describes; returns a summary dict. loss_fn(model, batch) -> (loss, metrics)
    replaces cross-entropy for training; setup_hook(ctx) runs once the model is in place;
    data_hook(ctx) runs first and may point cfg.data elsewhere (distill.py's teacher generations)."""
    with processes(cfg) as ctx:
        # ---- data --------------------------------------------------------------------------
        if data_hook is not None:
            data_hook(ctx)
        ctx.meta = meta = read_meta(cfg.data)
        data = TrainData(cfg, meta)
        val_rows = validation_rows(cfg, meta, data.seq_len, ctx.world_size)
        total_steps = cfg.max_steps or (math.ceil(cfg.tokens / (cfg.batch_size * data.seq_len)) if cfg.tokens
                                        else data.steps_for_epochs(cfg.epochs))
        check_schedule(cfg, total_steps)
        stop_step = min(total_steps, cfg.stop_after or total_steps)
        _, micro_batch_size, _ = batch_plan(cfg.batch_size, cfg.micro_batch_size, ctx.world_size)

        # ---- model, optimizer, run folder ----------------------------------------------------
        check_run_dir(cfg, ctx)
        model = build_model(cfg, meta, data.seq_len)
        flops_per_step = flops_per_token(model, data.seq_len) * cfg.batch_size * data.seq_len
        model, train_model = parallelize(model, ctx, cfg)
        optimizer = make_optimizer(model, cfg, ctx.device)
        ctx.model = model
        if setup_hook is not None:
            setup_hook(ctx)
        step, optimizer_bytes_read = restore_train_state(model, optimizer, ctx) if cfg.resume else (0, None)
        saved_step = step if cfg.resume else None
        log = start_log(cfg, ctx, step)
        peak, peak_source = peak_flops(ctx)
        write_row(log, {"kind": "start", "step": step, "total_steps": total_steps, "params": model.num_params(),
                        "world_size": ctx.world_size, "peak_flops": peak, "peak_flops_source": peak_source,
                        "optimizer_bytes_read_per_rank": optimizer_bytes_read})
        if ctx.is_main:
            print(f"{model.num_params() / 1e6:.2f}M parameters on {ctx.world_size} x {ctx.device.type} "
                  f"({ctx.parallel}, {str(ctx.compute_dtype)[6:]}); batch {cfg.batch_size} x {data.seq_len} "
                  f"tokens in micro-batches of {micro_batch_size}; steps {step} -> {stop_step} of {total_steps}")

        tracker = MemorizationTracker(cfg, ctx, data) if cfg.mem_every else None

        def track_memorization(step):
            if tracker is not None and tracker.due(step, total_steps):
                memorized = tracker.measure(model)
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
            batches = micro_batches(data.global_batch(step), ctx, micro_batch_size)
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
                val = evaluate(model, val_rows, ctx, micro_batch_size, loss_fn)
                write_row(log, {"kind": "val", "step": step, "epoch": epoch, **val})
                if ctx.is_main:
                    bar.write(f"step {step}: val loss {val['val_loss']:.4f}, perplexity {val['val_ppl']:.2f}")
            if (cfg.save_interval and step % cfg.save_interval == 0) or step == stop_step:
                save_checkpoint(model, optimizer, ctx, step, epoch, val or {})
                saved_step = step
        bar.close()

        # ---- summary -------------------------------------------------------------------------
        tokens = (step - start_step) * cfg.batch_size * data.seq_len
        summary = {"step": step, "total_steps": total_steps, "train_loss": stats.get("loss"), **(val or {}),
                   "tokens_per_s": tokens / train_time if tokens else None, "out_dir": cfg.out_dir}
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
