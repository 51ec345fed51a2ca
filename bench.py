"""
How fast this project trains, generates and measures memorization, next to Hugging Face
transformers running the same model, the same weights and the same batch in the same process.

- Training step as train.py takes it (forward, cross-entropy, backward, gradient clipping, AdamW):
  tokens/s and MFU, in the training precision (`--dtype`, auto = train.py's choice) and in fp32.
  MFU uses train.py's FLOP count and peak: measured matmuls on a CPU, nominal bf16 peak on known GPUs.
- Greedy generation with the KV cache: new tokens/s (prefill included) at batch 1 and 8, and how
  close that comes to the memory-bandwidth bound (every step reads all weights and the cache), in
  fp32, with bf16 weights and with row-wise int8 weights (quantize.py: every linear layer, and the
  Llama 3 paper's choice of the feed-forward layers outside the first and last blocks).
- Discoverable memorization at P = S = 50: examples/s of memorize.py's teacher-forced flags, of our
  generate, and of a loop calling transformers' generate per batch; the flags must agree.
- With --sections=quality, --ckpt and --data: what int8 weights cost a trained model, against fp32:
  validation perplexity and greedy agreement over --quality_tokens new tokens from val prompts.
- A soft-distillation step (distill.py's loss, a teacher twice as wide) next to a cross-entropy step
  and a teacher forward: time and peak memory (in a fresh process on a CPU, from its peak RSS).
- Every figure is the median over --repeats timed runs after --warmup untimed ones, with the range
  [min - max]. The two implementations are timed in turn, repeat by repeat, so a slowdown of the
  machine hits both. Timings are only meaningful on an otherwise idle machine.

    python bench.py                                   # the "bench" shape, batch 8 x 256
    python bench.py --model=small --repeats=10 --skip_hf
    python bench.py --model=llama3.2-1b --batch_size=4 --seq_len=2048 --compile --skip_hf \
        --sections=training,generation                                  # the check on one GPU
    python bench.py --sections=quality --ckpt=out/small --data=data/shakespeare --seq_len=128
"""

import dataclasses
import multiprocessing
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

import memorize
from checkpoint import empty_model, export_hf, load_model, load_weights
from config import UserError, at_least, one_of, parse_config, positive, run_main, seed_range, setting
from data import read_info
from distill import DistillConfig, make_soft_loss
from distributed import DEVICES, DTYPES, Context, known_gpu, peak_flops, pick_device, pick_dtype
from model import CONFIGS, ModelArgs, Transformer
from quantize import quantized_copy
from train import (TrainConfig, accumulate_gradients, clip_gradients, cross_entropy_loss, evaluate, flops_per_token,
                   make_optimizer, place, validation_rows)


@dataclass
class BenchConfig:
    model: str = setting("bench", "named shape from model.CONFIGS (vocab_size 8192 unless it has one)",
                         one_of(*CONFIGS))
    batch_size: int = setting(8, "training batch in sequences", positive)
    seq_len: int = setting(256, "training tokens per sequence", positive)
    device: str = setting("auto", "auto: cuda > mps > cpu", one_of(*DEVICES))
    dtype: str = setting("auto", "training precision (auto: train.py's choice)", one_of(*DTYPES))
    repeats: int = setting(7, "timed runs of each figure", positive)
    warmup: int = setting(2, "untimed runs before them", at_least(0))
    prompt_len: int = setting(32, "generation: prompt tokens", positive)
    new_tokens: int = setting(96, "generation: new tokens per row", positive)
    prefix_len: int = setting(50, "memorization: P, prompt tokens after BOS (memorize.prompt_len)", positive)
    suffix_len: int = setting(50, "memorization: S, the suffix that must come out exactly", positive)
    mem_examples: int = setting(64, "memorization: examples per timed run (half of them memorized by construction)",
                                at_least(2))
    mem_batch_size: int = setting(32, "memorization: examples per batch", positive)
    teacher_scale: int = setting(2, "distillation: the teacher is this many times wider (dim, heads, FFN)",
                                 positive)
    teacher_model: str = setting("", "distillation: the teacher's named shape instead (its vocabulary must be the "
                                     "student's)", one_of("", *CONFIGS))
    sections: str = setting("training,generation,memorization,distillation", "which figures, comma-separated")
    compile: bool = setting(False, "training step: torch.compile each block, as train.py --compile does")
    skip_hf: bool = setting(False, "do not run transformers next to this project")
    skip_memory: bool = setting(False, "do not measure peak memory")
    seed: int = setting(0, "weights and tokens", seed_range)
    ckpt: str = setting("", "quality: a trained checkpoint folder")
    data: str = setting("", "quality: its dataset folder (the val split is read)")
    quality_tokens: int = setting(256, "quality: greedy tokens per prompt (--batch_size prompts of --prompt_len)",
                                  positive)


# ----------------------------------------------------------------------------------------------
# Timing and printing


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def time_in_turn(fns, cfg, device):
    """{name: [seconds of each timed call]}: --warmup untimed calls of each fn, then --repeats
    rounds in which every fn is called once in turn."""
    for fn in fns.values():
        for _ in range(cfg.warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(cfg.repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def show(label, values, unit, extra=""):
    """Print median [min - max] of values; returns the median."""
    med = statistics.median(values)
    print(f"  {label:<40} {med:>10,.1f} {unit:<9} [{min(values):,.1f} - {max(values):,.1f}]  {extra}".rstrip())
    return med


def section(title):
    print(f"\n{title}")


# ----------------------------------------------------------------------------------------------
# The models: ours, a wider teacher, and the same weights in transformers' LlamaForCausalLM


def model_args(cfg):
    shape = dict(CONFIGS[cfg.model])
    shape.setdefault("vocab_size", 8192)
    shape["max_seq_len"] = max(shape.get("max_seq_len", 0), cfg.seq_len, cfg.prompt_len + cfg.new_tokens,
                               memorize.prompt_len(cfg.prefix_len) + cfg.suffix_len)
    return ModelArgs(**shape)


def build_model(args, seed, device):
    torch.manual_seed(seed)
    model = Transformer(args)
    model.init_weights()
    return model.to(device)


def teacher_args(args, cfg):
    """The distillation teacher's shape: --teacher_model's, or the student's --teacher_scale times wider."""
    if cfg.teacher_model:
        teacher = model_args(dataclasses.replace(cfg, model=cfg.teacher_model))
        if teacher.vocab_size != args.vocab_size:
            raise UserError(f"--teacher_model={cfg.teacher_model} has {teacher.vocab_size} vocabulary entries and the "
                            f"student {args.vocab_size}; pick shapes with one vocabulary")
        return teacher
    scale = cfg.teacher_scale
    return dataclasses.replace(args, dim=args.dim * scale, n_heads=args.n_heads * scale,
                               n_kv_heads=args.n_kv_heads * scale, ffn_hidden_dim=args.hidden_dim * scale)


def bf16_copy(model):
    """Our model with bf16 weights, converted tensor by tensor as from_pretrained(dtype=bf16) loads it
    (the rotary table stays fp32)."""
    tensors = model.state_dict().items()
    return load_weights(empty_model(model.args), tensors, model.norm.weight.device, torch.bfloat16).eval()


def hf_copy(model):
    """The same weights in transformers' LlamaForCausalLM (default fp32, default attention), through
    checkpoint.export_hf and from_pretrained, as a user would load them."""
    from transformers import LlamaForCausalLM
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(model, tmp)
        hf = LlamaForCausalLM.from_pretrained(tmp)
    hf.generation_config.eos_token_id = hf.generation_config.pad_token_id = None  # never stop early
    return hf.to(model.tok_embeddings.weight.device)


def batch_of(args, cfg, device, generator):
    rows = torch.randint(0, args.vocab_size, (cfg.batch_size, cfg.seq_len + 1), generator=generator)
    return {"inputs": rows[:, :-1].to(device), "targets": rows[:, 1:].to(device)}


def hf_cross_entropy(model, batch):
    """train.py's cross_entropy_loss for a LlamaForCausalLM: the same loss on the same logits."""
    logits = model(input_ids=batch["inputs"]).logits
    return F.cross_entropy(logits.float().flatten(0, 1), batch["targets"].flatten()), {}


def train_step(model, optimizer, batch, loss_fn, ctx):
    """One optimizer step of train.py's loop (one micro-batch)."""
    accumulate_gradients(model, [(batch, 1.0)], loss_fn, ctx)  # one micro-batch, weight 1
    clip_gradients(model, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------------------------
# The figures


def bench_training(cfg, args, device, dtype, with_hf):
    section(f"training step: batch {cfg.batch_size} x {cfg.seq_len} tokens, AdamW, gradient clipping")
    batch = batch_of(args, cfg, device, torch.Generator().manual_seed(cfg.seed))
    tokens = cfg.batch_size * cfg.seq_len
    runs, peaks = {}, {}
    for dt in dict.fromkeys([dtype, torch.float32]):  # the training precision, then fp32
        ctx = Context(device, dt)
        peaks[dt] = max(peak_flops(device, dt) for _ in range(3))
        ours = build_model(args, cfg.seed, device)
        place(ours, ctx, TrainConfig(compile=cfg.compile))  # one process: only --compile acts
        runs[f"ours {name_of(dt)}"] = (ours, make_optimizer(ours, TrainConfig(), device), cross_entropy_loss, ctx)
        if with_hf:
            theirs = hf_copy(ours)
            runs[f"transformers {name_of(dt)}" + (" autocast" if dt != torch.float32 else "")] = (
                theirs, make_optimizer(theirs, TrainConfig(), device), hf_cross_entropy, ctx)
    flops = flops_per_token(runs[f"ours {name_of(dtype)}"][0], cfg.seq_len)
    for dt, (peak, source) in peaks.items():
        print(f"  peak {name_of(dt)}: {peak / 1e12:.2f} TFLOP/s ({source}); {flops / 1e6:.1f} MFLOP per token")
    times = time_in_turn({name: (lambda r=r: train_step(r[0], r[1], batch, r[2], r[3])) for name, r in runs.items()},
                         cfg, device)
    rates = {}
    for name, t in times.items():
        rate = [tokens / s for s in t]
        peak = peaks[runs[name][3].compute_dtype][0]
        rates[name] = show(name, rate, "tokens/s", f"MFU {statistics.median(rate) * flops / peak:.1%}")
    return rates


def memory_bandwidth(cfg, device):
    """(bytes/s, how it was found) for the decoding bound: a known GPU's nominal figure (distributed.GPUS), else
    measured: bytes read plus bytes written per second copying a tensor larger than any cache."""
    x = torch.ones(64 << 20 if device.type == "cpu" else 256 << 20, device=device)  # 256 MiB / 1 GiB
    y = torch.empty_like(x)
    # The fastest of 9 copies: a bound is what the memory can do, not what it did once.
    times = time_in_turn({"copy": lambda: y.copy_(x)}, dataclasses.replace(cfg, warmup=1, repeats=9), device)
    measured = 2 * x.numel() * x.element_size() / min(times["copy"])
    name, known = known_gpu(device)
    if known:
        return known[1], f"nominal for {name}; a copy measured {measured / 1e9:,.0f} GB/s"
    return measured, f"measured with a {x.numel() * x.element_size() >> 20} MiB copy on {device.type}"


def decode_bytes(model, batch, context):
    """Bytes one decoding step must read at least: every weight (int8 ones and their row scales as
    stored; the embedding table only when the output layer shares it) and the keys and values of
    `context` earlier positions per row."""
    a = model.args
    scales = [b for name, b in model.named_buffers() if name.endswith(".scale")]
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *scales])
    if not a.tie_word_embeddings:
        weights -= model.tok_embeddings.weight.numel() * model.tok_embeddings.weight.element_size()
    cache = 2 * a.n_layers * batch * a.n_kv_heads * a.head_dim * context * model.norm.weight.element_size()
    return weights + cache


def bench_generation(cfg, args, device, model, hf):
    section(f"greedy generation with the KV cache: prompt {cfg.prompt_len}, {cfg.new_tokens} new tokens, fp32 "
            "(and our model with bf16 weights, as sample.py --dtype=bf16 loads it, and with int8 weights)")
    ours = {"ours": model, "ours bf16 weights": bf16_copy(model),  # copies made tensor by tensor
            "ours int8 weights": quantized_copy(model).eval(),
            "ours int8 paper's layers": quantized_copy(model, layers="ffn", keep_ends=True).eval()}
    bandwidth, source = memory_bandwidth(cfg, device)
    context = cfg.prompt_len + cfg.new_tokens / 2  # the cache's mean length while decoding
    print(f"  memory bandwidth {bandwidth / 1e9:,.0f} GB/s ({source}); bound = batch x bandwidth / bytes "
          f"one step reads (weights, and the cache at {context:.0f} positions)")
    rates = {}
    for b in (1, 8):
        prompt = torch.randint(0, args.vocab_size, (b, cfg.prompt_len), generator=torch.Generator().manual_seed(b))
        prompt = prompt.to(device)
        fns = {f"{name}, batch {b}": (lambda m=m: m.generate(prompt, cfg.new_tokens)) for name, m in ours.items()}
        if hf is not None:
            fns[f"transformers generate, batch {b}"] = lambda: hf_generate(hf, prompt, cfg.new_tokens)
        for name, t in time_in_turn(fns, cfg, device).items():
            weights = ours.get(name.rsplit(",", 1)[0], model)  # transformers: the same fp32 weights as ours
            bound = b * bandwidth / decode_bytes(weights, b, context)
            rate = [b * cfg.new_tokens / s for s in t]
            rates[name] = show(name, rate, "tokens/s", f"{statistics.median(rate) / bound:.0%} of the bandwidth bound")
        reference = model.generate(prompt, cfg.new_tokens)
        agree = [f"{name.split(',')[0]} {(fn() == reference).float().mean().item():.0%}"
                 for name, fn in list(fns.items())[1:]]
        print(f"  tokens equal to ours (fp32) at batch {b}: " + ", ".join(agree))
    return rates


@torch.no_grad()
def generated_flags(generate, rows, prompt, suffix_len, batch_size):
    """Discoverable memorization the usual way: per batch, generate(prompts, S) decodes S tokens
    greedily from the first `prompt` tokens, which are compared with the true suffix."""
    flags = [(generate(batch[:, :prompt], suffix_len) == batch[:, prompt:prompt + suffix_len]).all(1)
             for batch in rows.split(batch_size)]
    return torch.cat(flags).cpu().numpy()


def hf_generate(hf, prompt, new_tokens):
    """transformers' greedy generate, returning only the new tokens as ours does."""
    out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, do_sample=False)
    return out[:, prompt.shape[1]:]


def bench_memorization(cfg, args, device, model, hf):
    P, S, N, bs = cfg.prefix_len, cfg.suffix_len, cfg.mem_examples, cfg.mem_batch_size
    section(f"discoverable memorization: {N} examples of P = {P} + S = {S} tokens, batches of {bs}, fp32")
    prompt = memorize.prompt_len(P)  # the first token stands for BOS
    rows = torch.randint(0, args.vocab_size, (N, prompt + S), generator=torch.Generator().manual_seed(cfg.seed)).to(device)
    rows[:N // 2, prompt:] = model.generate(rows[:N // 2, :prompt], S)  # the model's own continuation: memorized
    rows_np = rows.cpu().numpy()
    fns = {"ours, teacher-forced (memorized_flags)": lambda: memorize.memorized_flags(model, rows_np, P, S, bs),
           "ours, generate per batch": lambda: generated_flags(model.generate, rows, prompt, S, bs)}
    if hf is not None:
        fns["transformers generate per batch"] = lambda: generated_flags(
            lambda tokens, n: hf_generate(hf, tokens, n), rows, prompt, S, bs)
    rates = {name: show(name, [N / s for s in t], "examples/s") for name, t in time_in_turn(fns, cfg, device).items()}
    expected = np.arange(N) < N // 2
    for name, fn in fns.items():
        flags = fn()
        print(f"  {name}: {int(flags.sum())} of the {N // 2} memorized rows found, "
              f"{int((flags == expected).sum())} of {N} rows right")
    return rates


def bench_distillation(cfg, args, device, dtype):
    targs = teacher_args(args, cfg)
    section(f"distillation step: forward KL at T = 2 (distill.py), teacher {targs.dim} wide, "
            f"batch {cfg.batch_size} x {cfg.seq_len}, {name_of(dtype)}")
    ctx = Context(device, dtype)
    student = build_model(args, cfg.seed, device)
    teacher = build_model(targs, cfg.seed + 1, device).eval().requires_grad_(False)
    optimizer = make_optimizer(student, TrainConfig(), device)
    batch = batch_of(args, cfg, device, torch.Generator().manual_seed(cfg.seed))
    kd_loss = make_soft_loss(teacher, DistillConfig())

    def teacher_forward():
        with torch.no_grad(), ctx.autocast():
            teacher(batch["inputs"])

    times = time_in_turn({"cross-entropy step": lambda: train_step(student, optimizer, batch, cross_entropy_loss, ctx),
                          "teacher forward (logits)": teacher_forward,
                          "distillation step": lambda: train_step(student, optimizer, batch, kd_loss, ctx)}, cfg, device)
    ms = {name: show(name, [1000 * s for s in t], "ms") for name, t in times.items()}
    ratio = ms["distillation step"] / (ms["cross-entropy step"] + ms["teacher forward (logits)"])
    print(f"  distillation step / (cross-entropy step + teacher forward): {ratio:.2f}")
    if not (device.type == "cuda" or device.type == "cpu" and os.path.exists("/proc/self/clear_refs")):
        print("  peak memory: measured on CUDA, or on a CPU under Linux only")
    elif not cfg.skip_memory:
        how = ("torch.cuda.max_memory_allocated" if device.type == "cuda"
               else "peak RSS, VmHWM, of a fresh process reset before the step")
        print(f"  peak memory of a step above the weights, teacher and AdamW state held before it ({how}):")
        for kind in ("cross-entropy", "distillation"):
            print(f"    {kind + ' step':<38} {step_memory(kind, cfg, device, dtype) / 2**20:>10,.0f} MiB")
    return ratio


def bench_quality(cfg, device):
    """Validation perplexity (windows of --seq_len) and greedy agreement with fp32 of the same
    trained model with bf16 weights and int8 ones (every linear layer, or the paper's choice)."""
    info = read_info(cfg.data)
    fp32 = load_model(cfg.ckpt, device=device).eval()
    models = {"fp32": fp32, "bf16 weights": bf16_copy(fp32), "int8 weights": quantized_copy(fp32),
              "int8 paper's layers": quantized_copy(fp32, layers="ffn", keep_ends=True)}
    rows = validation_rows(TrainConfig(data=cfg.data, eval_rows=0), info, cfg.seq_len, 1)
    ctx = Context(device, torch.float32)
    bos_id = info["bos_id"] if info["layout"] == "packed" else None
    prompts = torch.from_numpy(rows[:cfg.batch_size, :cfg.prompt_len]).to(device)
    section(f"quality: {cfg.ckpt} on the val split of {cfg.data} ({len(rows)} windows of {cfg.seq_len} tokens); "
            f"greedy, {cfg.batch_size} val prompts of {cfg.prompt_len} tokens, {cfg.quality_tokens} new tokens each")
    reference = fp32.generate(prompts, cfg.quality_tokens)
    ppl = {}
    for name, m in models.items():
        ppl[name] = evaluate(m, rows, ctx, cfg.batch_size, bos_id)["val_ppl"]
        same = m.generate(prompts, cfg.quality_tokens) == reference
        first = torch.where(same.all(1), cfg.quality_tokens, (~same).int().argmax(1)).float()  # first different token
        print(f"  {name:<22} val perplexity {ppl[name]:8.3f} ({ppl[name] / ppl['fp32'] - 1:+.3%}); tokens equal to "
              f"fp32's {same.float().mean():.1%}, the first difference at token {first.mean():.0f} on average")
    return ppl


# ----------------------------------------------------------------------------------------------
# Peak memory of one step: what a step holds at its peak above what is held before it (weights,
# teacher, AdamW state), after one warm-up step. A CPU has no allocator statistics, so the step runs
# in a fresh process whose peak resident set is reset before the step (/proc/self/clear_refs) and
# read after it; glibc is told to return every freed block above 64 KiB to the system, so memory
# freed by the warm-up step does not hide the second step's peak.


def step_memory(kind, cfg, device, dtype):
    if device.type == "cuda":
        return memory_of_step(kind, cfg, device, dtype)
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)  # read by the child's allocator at its start
    try:
        with multiprocessing.get_context("spawn").Pool(1) as pool:  # a fresh interpreter
            return pool.apply(memory_of_step, (kind, cfg, device, dtype))
    finally:
        del os.environ["MALLOC_MMAP_THRESHOLD_"]


def rss_bytes(field):
    """VmRSS (now) or VmHWM (the peak since the last reset) of this process, from /proc/self/status."""
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(field)).split()[1]) * 1024


def memory_of_step(kind, cfg, device, dtype):
    args = model_args(cfg)
    ctx = Context(device, dtype)
    student = build_model(args, cfg.seed, device)
    optimizer = make_optimizer(student, TrainConfig(), device)
    batch = batch_of(args, cfg, device, torch.Generator().manual_seed(cfg.seed))
    loss_fn = cross_entropy_loss
    if kind == "distillation":
        teacher = build_model(teacher_args(args, cfg), cfg.seed + 1, device).eval().requires_grad_(False)
        loss_fn = make_soft_loss(teacher, DistillConfig())
    train_step(student, optimizer, batch, loss_fn, ctx)  # creates AdamW's state, loads the kernels
    if device.type == "cuda":
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        train_step(student, optimizer, batch, loss_fn, ctx)
        return torch.cuda.max_memory_allocated(device) - before
    before = rss_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to VmRSS
    train_step(student, optimizer, batch, loss_fn, ctx)
    return rss_bytes("VmHWM") - before


# ----------------------------------------------------------------------------------------------


def name_of(dtype):
    return str(dtype).removeprefix("torch.").replace("bfloat16", "bf16").replace("float32", "fp32")


def describe(cfg, args, model, device, dtype):
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"bench.py: model {cfg.model!r} ({model.num_params() / 1e6:.1f}M parameters: dim {args.dim}, "
          f"{args.n_layers} layers, {args.n_heads} heads, {args.n_kv_heads} KV heads, FFN {args.hidden_dim}, "
          f"vocabulary {args.vocab_size}) on {device.type} ({where}); torch {torch.__version__}; "
          f"training precision {name_of(dtype)}")
    print(f"figures: median [min - max] over {cfg.repeats} runs after {cfg.warmup} warm-up runs")


def transformers_copy(cfg, model, args, device):
    """The same model in transformers, after checking that it gives our logits; None without it."""
    if cfg.skip_hf:
        return None
    try:
        import transformers
    except ImportError:
        print("transformers is not installed: no side-by-side figures")
        return None
    hf = hf_copy(model).eval()
    with torch.no_grad():
        x = torch.randint(0, args.vocab_size, (2, 64), device=device)
        diff = (model(x) - hf(input_ids=x).logits).abs().max().item()
    print(f"transformers {transformers.__version__}: LlamaForCausalLM, {hf.dtype}, attention "
          f"{hf.config._attn_implementation!r}; largest logit difference from ours {diff:.1e}")
    return hf


def bench(cfg):
    sections = cfg.sections.split(",")
    unknown = set(sections) - {"training", "generation", "memorization", "distillation", "quality"}
    if unknown:
        raise UserError(f"--sections: unknown {', '.join(sorted(unknown))}; pick from training, generation, "
                        "memorization, distillation, quality")
    if "quality" in sections:  # refused before any timing, not after the other sections
        if not (cfg.ckpt and cfg.data):
            raise UserError("--sections=quality needs a trained model: pass --ckpt=out/<run> and --data=data/<name>")
        if not os.path.isdir(cfg.ckpt):
            raise UserError(f"checkpoint folder {cfg.ckpt!r} does not exist; pass --ckpt=out/<run>")
        read_info(cfg.data)  # a dataset folder without a readable meta.json is refused here
    device = pick_device(cfg.device, 0)
    dtype = pick_dtype(cfg.dtype, device)
    args = model_args(cfg)
    model = build_model(args, cfg.seed, device).eval()
    describe(cfg, args, model, device, dtype)
    hf = transformers_copy(cfg, model, args, device)

    train = bench_training(cfg, args, device, dtype, hf is not None) if "training" in sections else None
    gen = bench_generation(cfg, args, device, model, hf) if "generation" in sections else None
    mem = bench_memorization(cfg, args, device, model, hf) if "memorization" in sections else None
    kd_ratio = bench_distillation(cfg, args, device, dtype) if "distillation" in sections else None
    ppl = bench_quality(cfg, device) if "quality" in sections else None

    dt, lines = name_of(dtype), []
    if hf is not None and train:
        lines += [(f"training, ours {dt} / transformers fp32", train[f"ours {dt}"] / train["transformers fp32"], ">= 3x on a CPU"),
                  ("training, ours fp32 / transformers fp32", train["ours fp32"] / train["transformers fp32"], ">= 1x")]
        if dtype != torch.float32:
            lines.append((f"training, ours {dt} / transformers {dt} autocast",
                          train[f"ours {dt}"] / train[f"transformers {dt} autocast"], "same precision"))
    if hf is not None and gen:
        for b, target in ((1, ">= 3x"), (8, ">= 1.5x")):
            theirs = gen[f"transformers generate, batch {b}"]
            lines += [(f"generation at batch {b}, ours / transformers, fp32", gen[f"ours, batch {b}"] / theirs, target),
                      (f"generation at batch {b}, ours bf16 weights / transformers fp32",
                       gen[f"ours bf16 weights, batch {b}"] / theirs, "not the same precision"),
                      (f"generation at batch {b}, ours int8 weights / transformers fp32",
                       gen[f"ours int8 weights, batch {b}"] / theirs, f"{target}, int8")]
    if gen:
        lines += [(f"generation at batch {b}, ours int8 weights / ours fp32",
                   gen[f"ours int8 weights, batch {b}"] / gen[f"ours, batch {b}"], ">= 4x on llama3.2-1b")
                  for b in (1, 8)]
    if hf is not None and mem:
        lines.append(("memorization, memorized_flags / transformers generate loop",
                      mem["ours, teacher-forced (memorized_flags)"] / mem["transformers generate per batch"], ">= 3x"))
    if kd_ratio is not None:
        lines.append(("distillation step / (cross-entropy step + teacher forward)", kd_ratio, "<= 1.15"))
    if ppl is not None:
        lines.append(("val perplexity, int8 weights / fp32", ppl["int8 weights"] / ppl["fp32"], "<= 1.01"))
    if lines:
        section("ratios (target)")
    for label, value, target in lines:
        print(f"  {label:<62} {value:>6.2f}  ({target})")


def main(argv):
    bench(parse_config(BenchConfig, argv, prog="bench.py"))


if __name__ == "__main__":
    run_main(main)
