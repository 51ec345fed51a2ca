"""
Devices, precision and processes: where a script runs, and how several processes share its work.

- `pick_device` and `pick_dtype`: `auto` picks cuda > mps > cpu, and bf16 where the hardware is fast
  at it (a CUDA GPU with bf16, an x86 CPU with avx512_bf16 or AMX).
- `processes(...)`: a context that joins the process group when torchrun started this process (gloo
  on a CPU, nccl on CUDA) and leaves it at the end; it yields a `Context` (device, precision, rank).
  Under torchrun a watchdog ends the process within seconds of its launcher's death, wherever that
  happens, start-up included.
- Sharing work: each rank takes whole batches of one process's batching (`batch_share`) and draws
  its randomness from the batch's number (`batch_generator`), so any number of processes computes
  what one would; rank 0 gathers the results (`gather`, `gather_columns`).
- Training: DDP, or FSDP2 (`fully_shard` per block, then the root; on CUDA bf16 parameters with
  fp32 gradient reductions), and a frozen model (distill.py's teacher) placed the same way.
- Known GPUs' nominal bf16 peak and memory bandwidth, by exact device name, for MFU and bounds.
"""

import contextlib
import math
import os
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

from config import UserError

DEVICES = ("auto", "cpu", "cuda", "mps")  # auto: cuda > mps > cpu
DTYPES = ("auto", "fp32", "bf16")  # auto: bf16 where the hardware is fast at it
PARALLEL = ("auto", "none", "ddp", "fsdp")  # auto: ddp when torchrun starts several processes


@dataclass
class Context:
    """The processes a script runs in, and on what: what `processes()` yields."""
    device: torch.device
    compute_dtype: torch.dtype  # bf16 or fp32
    parallel: str = "none"  # none, ddp or fsdp
    rank: int = 0
    world_size: int = 1

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


# ----------------------------------------------------------------------------------------------
# Device and precision


def check_choice(key, value, choices):
    if value not in choices:
        raise UserError(f"--{key} is one of {', '.join(choices)}, not {value!r}")


def cpu_has_fast_bf16():
    """x86 CPUs with avx512_bf16 or AMX multiply bf16 matrices faster than fp32 ones: 2.0-2.4x on an
    AMD Zen 4 (avx512_bf16), about 6.8x on an Intel Sapphire Rapids (AMX), for large products on one
    thread. Where the time of a small model's step goes is another matter (bench.py)."""
    try:
        with open("/proc/cpuinfo") as f:
            return bool(set(f.read().split()) & {"avx512_bf16", "amx_bf16"})
    except OSError:
        return False


def pick_device(name, local_rank=0):
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


# Nominal dense bf16 FLOP/s and memory bandwidth (bytes/s) of known GPUs, by the exact name
# torch.cuda.get_device_name gives (vendors' data sheets). Other devices are measured instead.
GPUS = {
    "NVIDIA B200": (2250e12, 8.0e12),
    "NVIDIA H200": (989e12, 4.8e12),
    "NVIDIA H100 80GB HBM3": (989e12, 3.35e12),  # SXM
    "NVIDIA H100 NVL": (835e12, 3.9e12),
    "NVIDIA H100 PCIe": (756e12, 2.0e12),
    "NVIDIA A100-SXM4-80GB": (312e12, 2.04e12),
    "NVIDIA A100-SXM4-40GB": (312e12, 1.56e12),
    "NVIDIA A100 80GB PCIe": (312e12, 1.94e12),
    "NVIDIA A100-PCIE-40GB": (312e12, 1.56e12),
    "NVIDIA L40S": (362e12, 0.864e12),
    "NVIDIA L4": (121e12, 0.3e12),
    "NVIDIA A10": (125e12, 0.6e12),
    "NVIDIA GeForce RTX 4090": (165e12, 1.008e12),
    "NVIDIA GeForce RTX 3090": (71e12, 0.936e12),
}


def known_gpu(device):
    """(name, (bf16 FLOP/s, bytes/s)) of a CUDA device in GPUS, else (name or None, None)."""
    if device.type != "cuda":
        return None, None
    name = torch.cuda.get_device_name(device)
    return name, GPUS.get(name)


def peak_flops(device, dtype):
    """(FLOP/s, how it was found) of one device for MFU: a known GPU's nominal bf16 peak, else
    measured with 1024 x 1024 matmuls in dtype (so a CPU's MFU is against its own matmuls)."""
    name, known = known_gpu(device)
    if known:
        return known[0], f"nominal bf16 peak of {name}"
    a = torch.full((1024, 1024), 0.5, dtype=dtype, device=device)
    (a @ a)[0, 0].item()  # warm-up; .item() waits for the device
    t0 = time.perf_counter()
    for _ in range(4):
        b = a @ a
    b[0, 0].item()
    return 4 * 2 * 1024**3 / (time.perf_counter() - t0), f"measured {str(dtype)[6:]} matmul on {device.type}"


# ----------------------------------------------------------------------------------------------
# Joining and leaving the process group


@contextlib.contextmanager
def processes(parallel="auto", device="auto", dtype="auto"):
    """Join the process group when torchrun started this process (gloo on a CPU, nccl on CUDA);
    yields a Context. parallel: none, ddp or fsdp (auto: ddp under torchrun with several processes)."""
    exit_with_launcher()
    check_choice("parallel", parallel, PARALLEL)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    parallel = parallel if parallel != "auto" else ("ddp" if world_size > 1 else "none")
    if parallel != "none" and "RANK" not in os.environ:
        raise UserError(f"--parallel={parallel} runs in several processes: start it with torchrun --nproc_per_node=N")
    if parallel == "none" and world_size > 1:
        raise UserError("--parallel=none cannot run in several processes; pass --parallel=ddp or fsdp")
    device = pick_device(device, int(os.environ.get("LOCAL_RANK", 0)))
    ctx = Context(device, pick_dtype(dtype, device), parallel)
    if parallel != "none":
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
        ctx.rank, ctx.world_size = dist.get_rank(), dist.get_world_size()
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


def launched_by_torchrun(pid):
    """Whether process pid is a torchrun launcher (Linux: by its command line; elsewhere any living
    parent but init counts)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().replace(b"\0", b" ")
    except FileNotFoundError:  # gone, or no /proc on this system
        return pid != 1 and not os.path.isdir("/proc")
    except OSError:
        return True
    return any(name in cmdline for name in (b"torchrun", b"torch.distributed.run", b"torch.distributed.launch"))


WATCH_SECONDS = 1.0  # how often the watchdog looks at its launcher


def exit_with_launcher():
    """End this worker when the torchrun that started it dies. torchrun starts each worker in a
    session of its own, so a `kill -9` of torchrun would leave the workers running for good: holding
    GPU memory, or blocked in the rendezvous of a process group that never forms. The watchdog starts
    before the process group is joined; a launcher that died even earlier (while this process was
    importing torch) has left it an orphan, adopted by another process, which is noticed at once."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or any(t.name == "exit_with_launcher" for t in threading.enumerate()):
        return  # not started by torchrun, or already watching
    launcher = os.getppid()

    def stop():
        print(f"error: the launcher (process {launcher}) died; rank {os.environ.get('RANK')} stops too",
              file=sys.stderr, flush=True)
        os._exit(1)

    if not launched_by_torchrun(launcher):
        stop()

    def watch():
        while os.getppid() == launcher:  # an orphan is adopted by another process
            time.sleep(WATCH_SECONDS)
        stop()

    threading.Thread(target=watch, name="exit_with_launcher", daemon=True).start()


# ----------------------------------------------------------------------------------------------
# Sharing work across ranks


def shard_range(n, rank, world):
    """The contiguous slice [lo, hi) of n items that rank takes; concatenating ranks restores order."""
    return n * rank // world, n * (rank + 1) // world


def batch_share(n, batch_size, rank, world):
    """The items [lo, hi) that rank takes: whole batches of one process's batching, so that every item
    is computed in the same batch as in one process, and a batch's random draws (seeded by its
    number, lo // batch_size onwards) are the same whatever the number of processes."""
    lo, hi = shard_range(-(-n // batch_size), rank, world)
    return lo * batch_size, min(hi * batch_size, n)


def batch_generator(device, seed, batch_start, batch_size):
    """The random stream of the batch that starts at item batch_start."""
    return torch.Generator(device=device).manual_seed(seed + batch_start // batch_size)


def gather(obj, world):
    """Rank 0 gets every rank's object, in rank order; the others get None. ([obj] in one process.)"""
    if world == 1:
        return [obj]
    parts = [None] * world if dist.get_rank() == 0 else None
    dist.gather_object(obj, parts, dst=0)
    return parts


def gather_columns(cols, world):
    """Concatenate the ranks' {column: numpy array} on rank 0 (contiguous shares: the order is restored)."""
    parts = [p for p in gather(cols, world) or [] if p]
    return {c: np.concatenate([p[c] for p in parts]) for c in parts[0]} if parts else {}


def all_gather_flags(flags, n, ctx):
    """Every rank's bool flags (equal shares, the last padded), concatenated on every rank, cut to n."""
    flags = torch.from_numpy(np.asarray(flags, dtype=np.uint8))
    if ctx.world_size > 1:
        parts = [torch.empty_like(flags) for _ in range(ctx.world_size)]
        dist.all_gather(parts, flags)
        flags = torch.cat(parts)
    return flags[:n].numpy().astype(bool)


def equal_share(n, ctx):
    """Indices of this rank's share of n items in equal shares of ceil(n / world) (the last padded
    by repeating item n - 1), so that every rank runs as many forwards: FSDP's forward is collective."""
    share = math.ceil(n / ctx.world_size)
    return np.minimum(np.arange(ctx.rank * share, (ctx.rank + 1) * share), n - 1)


def mean_over_ranks(values, ctx):
    """Average a dict of numbers (floats or 0-d tensors) over all processes, in one all-reduce."""
    t = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=ctx.device) for v in values.values()])
    if ctx.world_size > 1:
        dist.all_reduce(t)  # gloo has no AVG: SUM, then divide
        t /= ctx.world_size
    return dict(zip(values, t.tolist()))


# ----------------------------------------------------------------------------------------------
# Models over several processes: DDP, FSDP2


def shard(model, ctx):
    """FSDP2: each block is one unit of all-gather and reduce-scatter; the root holds the rest."""
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if ctx.fsdp_bf16 else MixedPrecisionPolicy()
    for block in model.layers:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)


def wrap_for_training(model, ctx):
    """Shard (FSDP) or wrap (DDP) a model on ctx.device for training. Returns (model, train_model):
    the loss calls train_model (DDP synchronizes gradients through its forward); the rest uses model."""
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


def full_weights(model):
    """{name: tensor} of a model's whole weights on every rank (an FSDP model's shards gathered, in
    their stored precision, fp32), for a computation that must not see FSDP's bf16 casts."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=False)
    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in get_model_state_dict(model, options=options).items()}
