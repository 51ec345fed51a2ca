"""
Checks and measures the GPU paths in one run, written before any GPU was lent to this project.

    python gpu_check.py              # on a CUDA machine: results.json and a table in out/gpu_check/
    python gpu_check.py --dry_run    # anywhere: every part with tiny shapes, no figure judged

- bench: the llama3.2-1b shape (random weights) in bf16: the training step's MFU against the
  device's nominal dense bf16 peak, without and with --compile (goal: 45%), and greedy decoding at
  batch 1 and 8 as a share of the memory-bandwidth bound (goal at batch 1: 60%), eagerly and with a
  static KV cache under CUDA graphs (torch.compile(mode="reduce-overhead")), which removes the
  per-token kernel launches that eager decoding pays.
- train: train.py on the configs/gpu shapes (gpu-20m, gpu-100m) for a hundred steps each, one
  process, bf16: tokens/s, MFU, peak memory; a soft-distillation step with the gpu-100m teacher
  against a cross-entropy step plus one teacher forward; on 2 or more GPUs, DDP and FSDP2 loss
  curves against one process's.
- memorize: memorize.py on 100,000 examples of 257 tokens with a gpu-20m model: examples/s and peak
  memory; and on 1,000 examples, half of them the model's own greedy continuations, its flags
  against greedy generation (every one must agree).
- llama32: the Llama 3.2 preset's shapes (3B teacher, 1B student, random weights, bf16): one soft
  distillation step and one hard-distillation generation batch fit; their peak memory.
- fp8: row-wise FP8 feed-forward layers (quantize.py, the Llama 3 paper's choice) against bf16 on a
  small model trained here on a synthetic grammar: validation perplexity, greedy agreement, and
  decoding speed on the 1B shape; where the device has no FP8 matrix units, the part says so.

Each part runs in its own try, so one failure keeps the others' figures; results.json is rewritten
after every part, with the device, torch's version, each part's commands and wall time. Nothing is
downloaded: every dataset is made on the spot.
"""

import base64
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

import bench
import distill
import memorize
import quantize
import train
from checkpoint import load_model, save_model
from config import UserError, file_sha256, one_of, parse_config, run_main, setting, write_atomic
from data import write_dataset
from distributed import DEVICES, Context, known_gpu, peak_flops, pick_device
from model import CONFIGS, ModelArgs, Transformer, apply_rope
from tokenizer import train_bpe

PARTS = ("bench", "train", "memorize", "llama32", "fp8")


@dataclass
class GpuCheckConfig:
    dry_run: bool = setting(False, "tiny shapes on any device: every part runs, no figure is judged (the CPU test)")
    out: str = setting("out/gpu_check", "folder for results.json, results.md and the runs' files")
    parts: str = setting(",".join(PARTS), "which parts, comma-separated")
    device: str = setting("auto", "auto: cuda > mps > cpu", one_of(*DEVICES))


# ----------------------------------------------------------------------------------------------
# Sizes: the real check, and the dry run's tiny stand-ins


def sizes(dry):
    if dry:
        return dict(model="tiny", teacher="tiny", student="tiny", vocab=512, batch=2, seq=32, micro=2, steps=4,
                    examples=200, example_len=33, prefix=8, suffix=8, agree=16, new_tokens=8, repeats=1, warmup=0,
                    llama_teacher="tiny", llama_student="tiny")
    return dict(model="llama3.2-1b", teacher="gpu-100m", student="gpu-20m", vocab=32768, batch=4, seq=2048, micro=None,
                steps=100, examples=100_000, example_len=257, prefix=50, suffix=50, agree=1000, new_tokens=128,
                repeats=5, warmup=2, llama_teacher="llama3.2-3b", llama_student="llama3.2-1b")


def figure(value, unit, goal=None, met=None):
    return {"value": value, "unit": unit, "goal": goal, "met": met}


def median_rate(seconds, amount):
    return statistics.median(amount / s for s in seconds)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak(device):
    return train.peak_memory(device)


# ----------------------------------------------------------------------------------------------
# Decoding at fixed shapes: one compiled step for every position


class StaticDecoder:
    """Greedy decoding with the KV cache at fixed shapes: every step attends over the whole
    preallocated cache with the positions not yet written masked out, and writes its key and value
    at a position held in a tensor. So one compiled step serves every position, and under CUDA
    graphs (torch.compile(mode="reduce-overhead")) a token costs one graph launch instead of a few
    kernel launches per layer. It runs the model's own modules; only how attention meets the cache
    differs from Attention.forward, which slices the cache to the current length."""

    def __init__(self, model, compile=False):
        self.model = model
        self.step = torch.compile(self.decode_step, mode="reduce-overhead", fullgraph=True) if compile else self.decode_step

    def decode_step(self, tokens, pos):
        """Logits (B, V) of tokens (B, 1) at position pos (a 0-d long tensor), writing the cache there."""
        m = self.model
        h = m.tok_embeddings(tokens)
        at = pos.view(1)  # a tensor index, not a Python int: one graph for every position
        rotation = torch.complex(m.rope_cos.index_select(0, at), m.rope_sin.index_select(0, at))  # (1, head_dim / 2)
        visible = (torch.arange(m.layers[0].attention.cache_k.shape[2], device=tokens.device) <= pos)[None]  # (1, S)
        for layer in m.layers:
            a, x = layer.attention, layer.attention_norm(h)
            B = x.shape[0]
            q = apply_rope(a.wq(x).view(B, 1, a.n_heads, a.head_dim), rotation).transpose(1, 2)
            k = apply_rope(a.wk(x).view(B, 1, a.n_kv_heads, a.head_dim), rotation).transpose(1, 2)
            v = a.wv(x).view(B, 1, a.n_kv_heads, a.head_dim).transpose(1, 2)
            a.cache_k.index_copy_(2, at, k)
            a.cache_v.index_copy_(2, at, v)
            y = F.scaled_dot_product_attention(q, a.cache_k, a.cache_v, attn_mask=visible, enable_gqa=True)
            h = h + a.wo(y.transpose(1, 2).reshape(B, 1, -1))
            h = h + layer.feed_forward(layer.ffn_norm(h))
        return m.output(m.norm(h))[:, -1].float()

    @torch.no_grad()
    def generate(self, prompt, n):
        """Greedy continuation of prompt (B, P) by n tokens, as model.generate(prompt, n) gives it."""
        B, P = prompt.shape
        self.model.setup_cache(B, P + n)
        try:
            logits = self.model.last_logits(prompt, 0)  # the prefill writes positions 0..P-1
            out = []
            for i in range(n):
                token = logits.argmax(-1)
                out.append(token)
                if i + 1 < n:
                    logits = self.step(token[:, None], torch.tensor(P + i, device=prompt.device))
        finally:
            self.model.clear_cache()
        return torch.stack(out, 1)


# ----------------------------------------------------------------------------------------------
# Synthetic data: a vocabulary of the presets' size, random tokens, and a small grammar


def write_vocabulary(path, size):
    """A tiktoken file of size - 256 ranks (the 256 bytes, then two-byte tokens), so that models get
    the presets' vocabulary (32,768) without a corpus to learn it from."""
    pieces = [bytes([i]) for i in range(256)] + [bytes([i // 256, i % 256]) for i in range(size - 512)]
    with open(path, "w") as f:
        f.writelines(f"{base64.b64encode(p).decode()} {rank}\n" for rank, p in enumerate(pieces))
    return path


def random_dataset(folder, tokenizer, vocab, layout, rows=None, length=None, tokens=None, seed=0):
    rng = np.random.default_rng(seed)
    bos = vocab - 256
    if layout == "packed":
        stream = rng.integers(0, bos, tokens)
        stream[::512] = bos  # documents of 512 tokens
        splits = {"train": stream, "val": stream[:64 * 1024]}
    else:
        train_rows = rng.integers(0, bos, (rows, length))
        train_rows[:, 0] = bos
        splits = {"train": train_rows, "val": train_rows[:64]}
    write_dataset(folder, tokenizer, splits, layout)
    return folder


def grammar_text(n_lines, seed=0):
    rng = np.random.default_rng(seed)
    words = {"the": ["the", "a", "this"], "adj": ["old", "young", "fair", "proud", "gentle", "dark"],
             "noun": ["king", "queen", "knight", "moon", "river", "sword", "crown"],
             "verb": ["sees", "loves", "fears", "follows", "praises", "remembers"]}
    return "\n".join(" ".join(rng.choice(words[p]) for p in ("the", "adj", "noun", "verb", "the", "adj", "noun")) + "."
                     for _ in range(n_lines))


# ----------------------------------------------------------------------------------------------
# The parts: each returns ({name: figure}, [commands])


def part_bench(cfg, device, s, work):
    bcfg = parse_config(bench.BenchConfig, [f"--model={s['model']}", f"--batch_size={s['batch']}", f"--seq_len={s['seq']}",
                                            "--dtype=bf16", "--skip_hf", f"--repeats={s['repeats']}",
                                            f"--warmup={s['warmup']}", f"--new_tokens={s['new_tokens']}"])
    args = bench.model_args(bcfg)
    out, commands = {}, []
    peak_bf16 = peak_flops(device, torch.bfloat16)[0]
    for compiled in ((False,) if cfg.dry_run and device.type != "cuda" else (False, True)):
        run = dataclasses.replace(bcfg, compile=compiled)
        commands.append(f"bench.bench_training({run})")
        rates = bench.bench_training(run, args, device, torch.bfloat16, with_hf=False)
        model = bench.build_model(args, bcfg.seed, device)
        mfu = rates["ours bf16"] * train.flops_per_token(model, bcfg.seq_len) / peak_bf16
        name = "training step, bf16" + (", compiled" if compiled else "")
        out[f"{name}: tokens/s"] = figure(rates["ours bf16"], "tokens/s")
        out[f"{name}: MFU"] = figure(mfu, "share of the nominal bf16 peak", ">= 0.45", None if cfg.dry_run else mfu >= 0.45)
        del model
    model = bench.bf16_copy(bench.build_model(args, bcfg.seed, device).eval())
    bandwidth = bench.memory_bandwidth(bcfg, device)[0]
    for b in (1, 8):
        prompt = torch.randint(0, args.vocab_size, (b, bcfg.prompt_len), device=device)
        eager = StaticDecoder(model)
        reference = model.generate(prompt, bcfg.new_tokens)
        decoders = {"eager generate": lambda: model.generate(prompt, bcfg.new_tokens),
                    "static cache": lambda: eager.generate(prompt, bcfg.new_tokens)}
        if device.type == "cuda":
            graphed = StaticDecoder(model, compile=True)
            decoders["static cache, CUDA graphs"] = lambda: graphed.generate(prompt, bcfg.new_tokens)
        for name, fn in decoders.items():
            same = (fn() == reference).float().mean().item()  # also warms up (compiles) the decoder
            seconds = bench.time_in_turn({name: fn}, bcfg, device)[name]
            rate = median_rate(seconds, b * bcfg.new_tokens)
            bound = b * bandwidth / bench.decode_bytes(model, b, bcfg.prompt_len + bcfg.new_tokens / 2)
            goal = ">= 0.60" if b == 1 else None
            met = None if cfg.dry_run or b != 1 else rate / bound >= 0.6
            out[f"decoding batch {b}, {name}: tokens/s"] = figure(rate, "tokens/s")
            out[f"decoding batch {b}, {name}: bandwidth bound"] = figure(rate / bound, "share of the bound", goal, met)
            out[f"decoding batch {b}, {name}: tokens equal to eager greedy"] = figure(same, "share")
        commands.append(f"greedy decoding of {bcfg.new_tokens} tokens after {bcfg.prompt_len}, batch {b}, bf16 weights")
    return out, commands


def run_script(args, work, log_name):
    """One of the project's scripts as a user runs it; its output goes to a log file in work."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(os.path.join(work, log_name), "w") as log:
        done = subprocess.run(args, cwd=os.path.dirname(os.path.abspath(__file__)), stdout=log, stderr=subprocess.STDOUT,
                              env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed; see {os.path.join(work, log_name)}")
    return " ".join(args)


def last_rows(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r for r in rows if r["kind"] == "train"], next(r for r in rows if r["kind"] == "end")


def part_train(cfg, device, s, work):
    tok = write_vocabulary(os.path.join(work, "vocabulary.model"), s["vocab"])
    data = random_dataset(os.path.join(work, "random_packed"), tok, s["vocab"], "packed",
                          tokens=max(4 * s["steps"] * 32 * 1024, 1 << 20) if not cfg.dry_run else 1 << 16)
    out, commands = {}, []
    for shape, preset in ((s["student"], "base_student"), (s["teacher"], "base_teacher")):
        run = os.path.join(work, f"train_{preset}")
        args = [sys.executable, "train.py", f"--config=configs/gpu/{preset}.toml", f"--data={data}", f"--out_dir={run}",
                f"--max_steps={s['steps']}", "--warmup_steps=2", "--eval_interval=0", "--dtype=bf16", "--overwrite",
                f"--model={shape}", f"--device={device.type}"]
        if cfg.dry_run:
            args += ["--seq_len=32", "--batch_size=4", "--micro_batch_size=2", "--compile=false"]
        commands.append(run_script(args, work, f"train_{preset}.log"))
        rows, end = last_rows(run)
        later = rows[len(rows) // 2:]  # after compilation and warm-up
        out[f"train.py {preset} ({shape}): tokens/s"] = figure(statistics.median(r["tokens_per_s"] for r in later), "tokens/s")
        out[f"train.py {preset} ({shape}): MFU"] = figure(statistics.median(r["mfu"] for r in later), "share of the peak")
        out[f"train.py {preset} ({shape}): peak memory"] = figure(end["peak_memory_bytes"] / 2**30, "GiB")
    bcfg = parse_config(bench.BenchConfig, [f"--model={s['student']}", f"--teacher_model={s['teacher']}",
                                            f"--batch_size={s['micro'] or 32}", f"--seq_len={s['seq'] if cfg.dry_run else 1024}",
                                            f"--repeats={s['repeats']}", f"--warmup={s['warmup']}", "--skip_memory"])
    commands.append(f"bench.bench_distillation({bcfg})")
    ratio = bench.bench_distillation(bcfg, bench.model_args(bcfg), device, torch.bfloat16)
    out["soft distillation step / (cross-entropy step + teacher forward)"] = figure(
        ratio, "ratio", "<= 1.15", None if cfg.dry_run else ratio <= 1.15)
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    if gpus >= 2:
        reference = os.path.join(work, "train_base_student")
        for parallel in ("ddp", "fsdp"):
            run = os.path.join(work, f"train_{parallel}")
            args = ["torchrun", "--standalone", f"--nproc_per_node={min(gpus, 8)}", "train.py",
                    "--config=configs/gpu/base_student.toml", f"--data={data}", f"--out_dir={run}",
                    f"--max_steps={s['steps']}", "--warmup_steps=2", "--eval_interval=0", "--dtype=bf16", "--overwrite",
                    f"--parallel={parallel}"]
            commands.append(run_script(args, work, f"train_{parallel}.log"))
            one, many = [r["loss"] for r in last_rows(reference)[0]], [r["loss"] for r in last_rows(run)[0]]
            gap = max(abs(a - b) / abs(a) for a, b in zip(one, many))
            out[f"{parallel} on {min(gpus, 8)} GPUs: largest relative loss gap to one process"] = figure(
                gap, "relative", "<= 0.01 (bf16 reductions round differently)", gap <= 0.01)
    return out, commands


def part_memorize(cfg, device, s, work):
    tok = write_vocabulary(os.path.join(work, "vocabulary.model"), s["vocab"])
    args = ModelArgs(**{**CONFIGS[s["student"]], "vocab_size": s["vocab"],
                        "max_seq_len": max(CONFIGS[s["student"]].get("max_seq_len", 0), s["example_len"])})
    torch.manual_seed(0)
    model = Transformer(args)
    model.init_weights()
    path = os.path.join(work, "memorize_model")
    save_model(model, path, extra={"tokenizer_sha256": file_sha256(tok)})
    data = random_dataset(os.path.join(work, "memorize_data"), tok, s["vocab"], "examples", rows=s["examples"],
                          length=s["example_len"])
    common = [f"--prefix_len={s['prefix']}", f"--suffix_len={s['suffix']}", "--figures=false", "--filter=false",
              f"--device={device.type}", "--batch_size=256" if not cfg.dry_run else "--batch_size=32"]
    reset_peak(device)
    t0 = time.perf_counter()
    summary = memorize.main([f"--data={data}", f"--models=model:{path}", f"--out={work}/memorize_all", *common])
    seconds = time.perf_counter() - t0
    out = {"memorize.py: examples/s": figure(s["examples"] / seconds, "examples/s (loading and writing included)"),
           "memorize.py: peak memory": figure(peak(device) / 2**30, "GiB"),
           "memorize.py: examples measured": figure(summary["n_examples"], "examples")}
    # Half of these examples are the model's own greedy continuations: memorized by construction.
    model = model.to(device).eval()
    rng = np.random.default_rng(1)
    rows = rng.integers(0, s["vocab"] - 256, (s["agree"], s["example_len"]))
    rows[:, 0] = s["vocab"] - 256
    prompt = 1 + s["prefix"]
    half = torch.from_numpy(rows[:s["agree"] // 2, :prompt]).to(device)
    rows[:s["agree"] // 2, prompt:prompt + s["suffix"]] = model.generate(half, s["suffix"]).cpu().numpy()
    planted = os.path.join(work, "memorize_planted")
    write_dataset(planted, tok, {"train": rows, "val": rows[:8]}, "examples")
    summary = memorize.main([f"--data={planted}", f"--models=model:{path}", f"--out={work}/memorize_agree",
                             "--generate=true", *common])
    m = summary["models"]["model"]
    out["memorize.py --generate: flags that disagree with greedy generation"] = figure(
        m["flag_disagreements"], "examples", "0", m["flag_disagreements"] == 0)
    out["memorize.py: planted continuations found memorized"] = figure(
        m["memorized"], f"of {s['agree'] // 2}", str(s["agree"] // 2), m["memorized"] >= s["agree"] // 2)
    return out, [f"memorize.py {' '.join(common)} on {s['examples']} random examples",
                 f"memorize.py --generate=true on {s['agree']} examples, half planted"]


def part_llama32(cfg, device, s, work):
    student_args = ModelArgs(**CONFIGS[s["llama_student"]], **({"vocab_size": 512} if cfg.dry_run else {}))
    teacher_args = ModelArgs(**CONFIGS[s["llama_teacher"]], **({"vocab_size": 512} if cfg.dry_run else {}))
    ctx = Context(device, torch.bfloat16)
    tcfg = parse_config(distill.DistillConfig, ["--config=configs/llama32/student.toml"])
    micro = 2 if cfg.dry_run else tcfg.micro_batch_size
    seq = s["example_len"] - 1
    reset_peak(device)
    torch.manual_seed(0)
    with torch.device(device):
        student = Transformer(student_args)
        teacher = Transformer(teacher_args)
    student.init_weights()
    teacher.init_weights()
    teacher = teacher.to(torch.bfloat16).eval().requires_grad_(False)
    student, train_model = train.place(student, ctx, dataclasses.replace(tcfg, compile=False))
    optimizer = train.make_optimizer(student, tcfg, device)
    rows = torch.randint(0, student_args.vocab_size - 256, (micro, seq + 1), device=device)
    batch = {"inputs": rows[:, :-1], "targets": rows[:, 1:]}
    loss_fn = distill.make_soft_loss(teacher, tcfg)
    t0 = time.perf_counter()
    train.accumulate_gradients(train_model, [(batch, 1.0)], loss_fn, ctx)
    train.clip_gradients(student, tcfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync(device)
    out = {"Llama 3.2 soft distillation step (3B teacher bf16, 1B student, AdamW, activation checkpointing)":
           figure(time.perf_counter() - t0, f"s for {micro} x {seq} tokens"),
           "... its peak memory": figure(peak(device) / 2**30, "GiB")}
    del optimizer, student, train_model
    reset_peak(device)
    gen = 4 if cfg.dry_run else tcfg.gen_batch_size
    prompts = np.random.default_rng(0).integers(0, teacher_args.vocab_size - 256, (gen, s["example_len"]))
    t0 = time.perf_counter()
    distill.teacher_continuations(teacher, prompts, memorize.prompt_len(s["prefix"]), gen, device, progress=False)
    sync(device)
    out[f"Llama 3.2 hard distillation: one generation batch of {gen}"] = figure(time.perf_counter() - t0, "s")
    out["... its peak memory"] = figure(peak(device) / 2**30, "GiB")
    return out, ["one soft distillation step of configs/llama32/student.toml's micro-batch",
                 f"distill.teacher_continuations of {gen} prompts (configs/llama32's gen_batch_size)"]


def part_fp8(cfg, device, s, work):
    out, commands = {}, []
    # A small model that has learned something: a synthetic grammar, then its FP8 copy against bf16.
    text = os.path.join(work, "grammar.txt")
    os.makedirs(work, exist_ok=True)
    with open(text, "w") as f:
        f.write(grammar_text(400 if cfg.dry_run else 20000))
    run = os.path.join(work, "fp8_model")
    tok = os.path.join(work, "grammar.model")
    ids = np.array(train_bpe([open(text).read()], 600, tok, progress=False).encode(open(text).read(), bos=True, eos=True))
    write_dataset(os.path.join(work, "grammar_data"), tok, {"train": ids[len(ids) // 10:], "val": ids[:len(ids) // 10]},
                  "packed")
    args = [sys.executable, "train.py", f"--data={work}/grammar_data", f"--out_dir={run}", f"--model={s['student']}",
            "--seq_len=64", "--batch_size=32", f"--max_steps={20 if cfg.dry_run else 300}", "--warmup_steps=2",
            "--eval_interval=0", "--dtype=bf16", "--overwrite", f"--device={device.type}"]
    commands.append(run_script(args, work, "fp8_train.log"))
    bf16 = load_model(run, device=device, dtype=torch.bfloat16).eval()
    fp8 = quantize.quantized_copy(bf16, "fp8", layers="ffn", keep_ends=True).eval()
    held_out = ids[:len(ids) // 10]
    n = min(16, len(held_out) // 65)
    val = torch.from_numpy(held_out[:n * 65].reshape(n, 65).astype(np.int64)).to(device)
    with torch.no_grad():
        nll = {name: F.cross_entropy(m(val[:, :-1]).float().flatten(0, 1), val[:, 1:].flatten()).item()
               for name, m in (("bf16", bf16), ("fp8", fp8))}
        reference, other = bf16.generate(val[:, :16], 48), fp8.generate(val[:, :16], 48)
    out["FP8 / bf16 validation perplexity"] = figure(float(np.exp(nll["fp8"] - nll["bf16"])), "ratio", "<= 1.01",
                                                     None if cfg.dry_run else np.exp(nll["fp8"] - nll["bf16"]) <= 1.01)
    out["FP8 greedy tokens equal to bf16's"] = figure((reference == other).float().mean().item(), "share")
    # Speed, on the 1B shape (random weights): decoding reads the weights, FP8 reads half as many bytes.
    big = bench.bf16_copy(bench.build_model(ModelArgs(**{**CONFIGS[s["model"]], **({"vocab_size": 512} if cfg.dry_run else {})}),
                                            0, device).eval())
    big_fp8 = quantize.quantized_copy(big, "fp8", layers="ffn", keep_ends=True).eval()
    bcfg = parse_config(bench.BenchConfig, [f"--repeats={s['repeats']}", f"--warmup={s['warmup']}"])
    for b in (1, 8):
        prompt = torch.randint(0, big.args.vocab_size - 256, (b, 32), device=device)
        times = bench.time_in_turn({"bf16": lambda: big.generate(prompt, s["new_tokens"]),
                                    "fp8": lambda: big_fp8.generate(prompt, s["new_tokens"])}, bcfg, device)
        out[f"FP8 / bf16 decoding speed, batch {b}"] = figure(
            statistics.median(times["bf16"]) / statistics.median(times["fp8"]), "ratio")
    commands.append("quantize.quantized_copy(model, 'fp8', layers='ffn', keep_ends=True) against bf16")
    return out, commands


# ----------------------------------------------------------------------------------------------


def describe(device):
    if device.type == "cuda":
        name, known = known_gpu(device)
        return {"device": name, "count": torch.cuda.device_count(), "capability": torch.cuda.get_device_capability(device),
                "nominal bf16 FLOP/s and bytes/s": known}
    return {"device": f"{device.type}: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"}


def table(results):
    lines = [f"# GPU check: {results['device']['device']} (torch {results['torch']}){' DRY RUN' if results['dry_run'] else ''}",
             "", "| part | figure | value | unit | goal | met |", "|---|---|---|---|---|---|"]
    for part, r in results["parts"].items():
        if r["status"] != "ok":
            lines.append(f"| {part} | **failed** after {r['seconds']:.0f} s | {r['error'].splitlines()[-1][:100]} | | | |")
        for name, f in r.get("figures", {}).items():
            value = f"{f['value']:,.4g}" if isinstance(f["value"], (int, float)) else f["value"]
            met = {True: "yes", False: "**no**", None: "-"}[f["met"]]
            lines.append(f"| {part} | {name} | {value} | {f['unit']} | {f['goal'] or ''} | {met} |")
    return "\n".join(lines) + "\n"


def main(argv):
    cfg = parse_config(GpuCheckConfig, argv, prog="gpu_check.py")
    parts = [p.strip() for p in cfg.parts.split(",") if p.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise UserError(f"--parts: unknown {', '.join(sorted(unknown))}; pick from {', '.join(PARTS)}")
    device = pick_device(cfg.device)
    if device.type != "cuda" and not cfg.dry_run:
        raise UserError("gpu_check.py measures a CUDA GPU and there is none here; pass --dry_run to run every part "
                        "with tiny shapes")
    os.makedirs(cfg.out, exist_ok=True)
    s = sizes(cfg.dry_run)
    results = {"device": describe(device), "torch": torch.__version__, "dry_run": cfg.dry_run, "sizes": s, "parts": {}}
    functions = {"bench": part_bench, "train": part_train, "memorize": part_memorize, "llama32": part_llama32,
                 "fp8": part_fp8}
    for part in parts:
        t0 = time.perf_counter()
        work = os.path.join(cfg.out, part)
        os.makedirs(work, exist_ok=True)
        try:
            figures, commands = functions[part](cfg, device, s, work)
            results["parts"][part] = {"status": "ok", "figures": figures, "commands": commands}
        except Exception:  # one part's failure must not lose the others' figures
            results["parts"][part] = {"status": "failed", "error": traceback.format_exc()}
        results["parts"][part]["seconds"] = time.perf_counter() - t0
        print(f"gpu_check: {part} {results['parts'][part]['status']} in {results['parts'][part]['seconds']:.0f} s",
              flush=True)
        write_atomic(os.path.join(cfg.out, "results.json"), json.dumps(results, indent=2, default=str) + "\n")
    text = table(results)
    write_atomic(os.path.join(cfg.out, "results.md"), text)
    print(text)
    return results


if __name__ == "__main__":
    run_main(main)
