"""
Knowledge distillation into a student, on train.py's training loop.

- soft (logit-level): the student matches the frozen teacher's next-token distribution softened at
  temperature T, minimizing T^2 * KL(teacher || student) per token (Hinton et al. 2015; Borkar et al.
  2026 use forward KL at T = 2 and no cross-entropy term). Options: reverse KL, the generalized
  Jensen-Shannon divergence JSD(beta), and a mix with cross-entropy on the data (alpha).
- The divergence is computed in fp32 over chunks of tokens, and each chunk's gradient is formed at
  once, so no full (tokens, vocab) fp32 tensor exists at any time (Llama 3's vocabulary is 128k).
- The logged `kl` is the true divergence (teacher entropy included), not a cross-entropy that
  differs from it by a constant.
- hard (sequence-level, Kim & Rush 2016): the teacher greedily continues each training example
  from BOS and its first P tokens (memorize.py's prompt) to the example's full length (or samples
  the continuation: --gen_temperature); the student trains on these generations with cross-entropy.
  The generations are a dataset folder (data.py's format), reused on rerun while the teacher's
  weights, the data's content and the prompt stay the same; under torchrun every rank generates a
  share of them.
- Everything else (schedule, epochs, resume, DDP / FSDP2, logging, checkpoints) is train.py's.

    python distill.py --teacher=out/teacher --data=data/mem --out_dir=out/student --model=small
"""

import hashlib
import json
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from checkpoint import check_fits_data, load_model
from config import (UserError, above, between, check_output_folder, file_sha256, one_of, parse_config, positive,
                    progress_bar, run_main, setting, write_atomic)
from data import distinct_examples, open_split, read_info, write_dataset
from distributed import batch_generator, batch_share, gather, pick_device, prepare_frozen_model, unwrap
from memorize import prompt_len
from train import ChunkedOutputLoss, TrainConfig, train


@dataclass
class DistillConfig(TrainConfig):
    teacher: str = setting("", "the teacher's checkpoint folder (any format from_pretrained reads)")
    kind: str = setting("soft", "soft: match the teacher's distributions; hard: train on its generations",
                        one_of("soft", "hard"))
    divergence: str = setting("forward_kl", "soft: forward_kl is KL(teacher||student), reverse_kl KL(student||teacher)",
                              one_of("forward_kl", "reverse_kl", "jsd"))
    temperature: float = setting(2.0, "soft: softens both distributions; the loss is scaled by T^2", above(0))
    beta: float = setting(0.5, "jsd: mixture weight of the teacher", between(0, 1, low_open=True, high_open=True))
    alpha: float = setting(1.0, "soft: weight of the distillation term; 1 - alpha goes to cross-entropy on the data",
                           between(0, 1))
    # 512 tokens: with a vocabulary up to 16k a chunk's fp32 (tokens, vocab) tensors stay under 32 MiB,
    # blocks glibc keeps for reuse; it returns larger ones to the system at every free, and a CPU
    # step paid ~15% for faulting them back in (bench.py, chunks of 1024 x 8192).
    kd_chunk: int = setting(512, "soft: tokens per chunk of the divergence (bounds its memory)", positive)
    slice_vocab: bool = setting(False, "accept a teacher whose vocabulary is larger (padded) and use the shared ids")
    prefix_len: int = setting(50, "hard: the teacher continues each example from BOS and its first prefix_len "
                                   "tokens (memorize.py's P)", positive)
    hard_data: str = setting("", "hard: folder for the teacher's generations (default: <out_dir>/teacher_data)")
    gen_batch_size: int = setting(64, "hard: examples per generation batch", positive)
    gen_temperature: float = setting(0.0, "hard: 0 decodes greedily (sequence-level KD); above 0 samples the "
                                          "teacher's continuations at this temperature (seeded by --seed)",
                                     between(0, 10))


# ----------------------------------------------------------------------------------------------
# Divergences between the teacher's distribution p and the student's q, per token, in fp32.


def divergence(student_logits, teacher_logits, kind="forward_kl", temperature=1.0, beta=0.5):
    """Per-token divergence (N,) between p = softmax(teacher / T) and q = softmax(student / T).

    forward_kl: KL(p || q), mass-covering; the paper's choice.
    reverse_kl: KL(q || p), mode-seeking.
    jsd: beta KL(p || m) + (1 - beta) KL(q || m) with m = beta p + (1 - beta) q (Agarwal et al.
         2024). JSD / beta tends to KL(p || q) as beta -> 0 and JSD / (1 - beta) to KL(q || p) as
         beta -> 1."""
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if kind == "forward_kl":
        return (log_p.exp() * (log_p - log_q)).sum(-1)
    if kind == "reverse_kl":
        return (log_q.exp() * (log_q - log_p)).sum(-1)
    if kind == "jsd":
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
        return beta * (log_p.exp() * (log_p - log_m)).sum(-1) + (1 - beta) * (log_q.exp() * (log_q - log_m)).sum(-1)
    raise ValueError(f"unknown divergence {kind!r}")


def distillation_loss(hidden, weight, teacher_hidden, teacher_weight, targets, opts):
    """(loss, [divergence, cross-entropy]): the mean over N tokens of alpha T^2 D(p_t || q_t) +
    (1 - alpha) CE(q_t at T = 1, target_t), where the student's logits are hidden @ weight.T and the
    teacher's teacher_hidden @ teacher_weight.T. Both are formed chunk by chunk in fp32, with the
    student's gradient, by train.py's ChunkedOutputLoss: no full (tokens, vocab) tensor is ever alive."""

    device = hidden.device.type
    if torch.is_autocast_enabled(device):  # the teacher's output layer cast once, not once per chunk
        teacher_weight = teacher_weight.to(torch.get_autocast_dtype(device))

    def chunk_loss(logits, rows):
        with torch.no_grad():
            teacher_logits = F.linear(teacher_hidden[rows], teacher_weight).float()
        div = divergence(logits, teacher_logits, opts["divergence"], opts["temperature"], opts["beta"])
        ce = F.cross_entropy(logits, targets[rows], reduction="none")
        loss = (opts["alpha"] * opts["temperature"] ** 2 * div + (1 - opts["alpha"]) * ce).sum()
        return loss, torch.stack([div.detach().sum(), ce.detach().sum()])

    return ChunkedOutputLoss.apply(hidden, weight, chunk_loss, opts["chunk"])


def make_soft_loss(teacher, cfg):
    """A train.py loss_fn(model, batch) -> (loss, metrics) that distills `teacher` into the model."""
    opts = dict(chunk=cfg.kd_chunk, divergence=cfg.divergence, temperature=cfg.temperature,
                beta=cfg.beta, alpha=cfg.alpha)

    def loss_fn(model, batch):
        inputs, doc_ids = batch["inputs"], batch.get("doc_ids")
        hidden = model(inputs, doc_ids=doc_ids, return_hidden=True)  # through DDP's wrapper if any
        with torch.no_grad():
            teacher_hidden = teacher(inputs, doc_ids=doc_ids, return_hidden=True)
        weight = unwrap(model).output.weight
        vocab = weight.shape[0]  # a larger (padded) teacher vocabulary is cut to the student's ids
        loss, stats = distillation_loss(
            hidden.flatten(0, 1), weight, teacher_hidden.flatten(0, 1), teacher.output.weight[:vocab],
            batch["targets"].flatten(), opts)
        return loss, {"kl" if cfg.divergence.endswith("kl") else cfg.divergence: stats[0], "ce": stats[1]}

    return loss_fn


# ----------------------------------------------------------------------------------------------
# The teacher


def check_config(cfg, info):
    """The teacher must exist and fit the data (tokenizer, vocabulary), before any weights are read."""
    if not cfg.teacher:
        raise UserError("no teacher given; pass --teacher=path/to/teacher_checkpoint")
    if not os.path.isdir(cfg.teacher):
        raise UserError(f"teacher checkpoint {cfg.teacher!r} does not exist; train it first or fix --teacher")
    check_output_folder(cfg.hard_data or cfg.out_dir, "hard_data" if cfg.hard_data else "out_dir")
    check_fits_data(cfg.teacher, info, cfg.data, who="the teacher", accept_larger=cfg.slice_vocab,
                    larger_hint="--slice_vocab to use the shared ids of a larger, padded teacher vocabulary")


def weights_bytes(path):
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
               if f.endswith((".safetensors", ".pth")))


def check_memory(path, device):
    """A teacher larger than the memory that is free for it is refused, saying how much it needs."""
    need = weights_bytes(path)
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        try:
            with open("/proc/meminfo") as f:
                free = int(next(l for l in f if l.startswith("MemAvailable")).split()[1]) * 1024
        except (OSError, StopIteration):
            return
    if need > free:
        raise UserError(f"the teacher needs about {need / 2**30:.1f} GiB for its weights but only "
                        f"{free / 2**30:.1f} GiB is free on {device.type}; use a machine with more memory or FSDP")


def load_teacher(cfg, device):
    check_memory(cfg.teacher, device)
    return load_model(cfg.teacher, device="cpu")


# ----------------------------------------------------------------------------------------------
# Hard distillation: the teacher's generations as a dataset


@torch.no_grad()
def teacher_continuations(teacher, rows, prompt, batch_size, device, temperature=0.0, seed=0, start=0,
                          progress=True):
    """Each row's first `prompt` tokens, then the teacher's continuation to the row's full length:
    (N, L) like rows. Greedy (temperature 0) is deterministic; sampling draws from a stream seeded by
    the batch's number (rows[0] is row `start` of all, a whole number of batches in), so that a
    rank's share is what one process would draw."""
    teacher = teacher.to(device).float().eval()
    out = np.empty(rows.shape, dtype=rows.dtype)
    for s in progress_bar(range(0, len(rows), batch_size), desc="teacher generations", unit="batch",
                          disable=not progress):
        prompts = torch.from_numpy(rows[s:s + batch_size, :prompt].astype(np.int64)).to(device)
        generator = batch_generator(device, seed, start + s, batch_size) if temperature else None
        new = teacher.generate(prompts, rows.shape[1] - prompt, temperature=temperature, generator=generator)
        out[s:s + batch_size] = torch.cat([prompts, new], dim=1).cpu().numpy()
    return out


def read_stamp(path):
    """What cached generations were made from, or None when the stamp is missing or damaged (the
    generations are then made again: they are a cache, never the only copy of anything)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def generations_stamp(cfg, info):
    """What the teacher's generations are made from: the teacher's weights, the data's content, the
    prompt and (when sampling) temperature and seed. Cached generations are reused only while it holds."""
    stamp = {"teacher": weights_digest(cfg.teacher), "data": file_sha256(os.path.join(cfg.data, "train.bin")),
             "data_tokenizer": info["tokenizer_sha256"], "prompt_tokens": prompt_len(cfg.prefix_len)}
    if cfg.gen_temperature:
        stamp.update(temperature=cfg.gen_temperature, seed=cfg.seed)
    return stamp


def teacher_generations(cfg, info, ctx):
    """The hard-distillation dataset folder: made once, then reused while its stamp holds (without
    loading the teacher at all). Under torchrun every rank generates a contiguous share of the
    examples and rank 0 writes them all; the teacher is freed after."""
    path = cfg.hard_data or os.path.join(cfg.out_dir, "teacher_data")
    stamp, stamp_file = generations_stamp(cfg, info), os.path.join(path, "teacher_stamp.json")
    if read_stamp(stamp_file) == stamp:
        return path
    rows = open_split(cfg.data, "train")
    first, _, group = distinct_examples(rows)  # a repeated example is continued once, then copied
    lo, hi = batch_share(len(first), cfg.gen_batch_size, ctx.rank, ctx.world_size)
    share = teacher_continuations(load_teacher(cfg, ctx.device), rows[first[lo:hi]], prompt_len(cfg.prefix_len),
                                  cfg.gen_batch_size, ctx.device, cfg.gen_temperature, cfg.seed, lo, progress=ctx.is_main)
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()  # the teacher is gone: return its memory before the student comes
    shares = gather(share, ctx.world_size)
    if ctx.is_main:
        decoding = f"sampled (T = {cfg.gen_temperature:g})" if cfg.gen_temperature else "greedy"
        splits = {"train": np.concatenate(shares)[group], "val": np.array(open_split(cfg.data, "val"))}
        write_dataset(path, os.path.join(cfg.data, "tokenizer.model"), splits, "examples",
                      {"source": f"the teacher's {decoding} continuations of BOS + {cfg.prefix_len}-token prefixes "
                                 f"of {os.path.abspath(cfg.data)}",
                       "hard_distillation": {"prefix_len": cfg.prefix_len, "ranks": ctx.world_size,
                                             "temperature": cfg.gen_temperature}})
        write_atomic(stamp_file, json.dumps(stamp))
    ctx.barrier()  # the other ranks train on the folder rank 0 has just written
    return path


# ----------------------------------------------------------------------------------------------
# The job


def distill(cfg):
    info = read_info(cfg.data)
    check_config(cfg, info)
    if cfg.kind == "hard":  # plain cross-entropy on the teacher's generations, made once every setting is checked
        if info["layout"] != "examples":
            raise UserError("hard distillation needs fixed-length examples; prepare the data with --layout=examples")
        if not prompt_len(cfg.prefix_len) < info["example_len"]:
            raise UserError(f"--prefix_len={cfg.prefix_len} must be between 1 and {info['example_len'] - 2}, as the "
                            f"examples hold BOS and {info['example_len'] - 1} tokens")
        cfg.mem_data = cfg.mem_data or cfg.data  # memorization is of D, not of the teacher's generations

        def use_generations(ctx):
            cfg.data = teacher_generations(cfg, info, ctx)

        return train(cfg, data_hook=use_generations)
    teacher = load_teacher(cfg, pick_device(cfg.device, int(os.environ.get("LOCAL_RANK", 0))))
    # prepare_frozen_model places the teacher (device, FSDP sharding) once train.py has set up the
    # student, so the loss can hold the teacher object from the start.
    return train(cfg, loss_fn=make_soft_loss(teacher, cfg), setup_hook=lambda ctx: prepare_frozen_model(teacher, ctx))


def weights_digest(path):
    """The sha256 of a checkpoint's weight files, with their names: which teacher made the generations."""
    files = sorted(f for f in os.listdir(path) if f.endswith((".safetensors", ".pth")))
    return hashlib.sha256("".join(f"{f}:{file_sha256(os.path.join(path, f))}\n" for f in files).encode()).hexdigest()


def main(argv):
    return distill(parse_config(DistillConfig, argv, prog="distill.py"))


if __name__ == "__main__":
    run_main(main)
