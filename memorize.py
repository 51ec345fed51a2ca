"""
Measuring memorization in one model or a family of models (Borkar et al. 2026, arXiv 2601.15394).

- Discoverable memorization: prompt with BOS and an example's first P tokens, greedy-decode S
  tokens, compare with the true next S (paper: P = S = 50; `prompt_len`). The exact-match flag and the first
  mismatch come from one teacher-forced forward pass: greedy decoding reproduces the suffix if and
  only if the argmax is the true token at every suffix position. `--generate` also decodes with the
  KV cache for Pythia's per-token match score (Biderman et al. 2023), which needs real generation.
- Per-example features in fp32, one batch at a time (never [N, T, V]): zlib entropy, perplexity,
  suffix entropy and log-probability, Min-K% probability, KL(teacher || baseline).
- A family (teacher, baseline seeds, students): rates, overlaps, the "easy" set, teacher-specific
  examples and how many each student inherits, the hard/soft inheritance ratio.
- A logistic regression on pre-distillation features predicting which examples the student
  memorizes (the paper's protocol: 1:3 negatives, 30% held out, 100 trials), and a filtered dataset
  without the examples it flags, to re-run distillation on.
- Optional sampling-based extraction (n top-k samples per prefix, keep the most likely) and Carlini
  et al. 2021's attack: samples from <|begin_of_text|>, ranked three ways, checked against an S-gram
  hash index of the training split.
- Streams the memory-mapped split (flat memory at a million examples); shards it over ranks under
  torchrun. Writes per_example.jsonl, summary.json, report.md and PNG figures, atomically.

The schema of summary.json and per_example.jsonl is in the README ("out/reproduce/summary.json").
"""

import json
import math
import os
import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from classifier import at_risk_probability, classifier_trials
from config import (UserError, at_least, between, check_output_folder, config_dict, one_of, parse_config, positive,
                    progress_bar, run_main, seed_range, setting)
from model import Transformer, checkpoint_format, read_checkpoint_meta
from prepare import distinct_examples, open_split, read_meta, write_dataset
from quantize import KINDS, is_quantized, quantized_copy
from tokenizer import Tokenizer
from train import DEVICES, exit_with_launcher, pick_device

# Logits are computed for at most this many (row, position, vocabulary) entries at a time.
CHUNK_ELEMENTS = 1 << 23
FEATURES = ("zlib_entropy", "teacher_log_ppl", "baseline_log_ppl", "kl_teacher_baseline")


@dataclass
class MemorizeConfig:
    data: str = setting("", "dataset folder (layout examples) the models were trained on")
    models: str = setting("", "comma-separated name:path; names teacher, baseline*, student_* carry roles")
    out: str = setting("out/memorize", "report folder")
    split: str = setting("train", "which split's examples to test")
    prefix_len: int = setting(50, "P, prompt tokens after BOS (the paper's P = 50: BOS + 50 tokens)", positive)
    suffix_len: int = setting(50, "S, tokens to reproduce", positive)
    max_examples: int | None = setting(None, "test only the first N examples", positive)
    batch_size: int = setting(32, "examples per forward pass (memory: models x B x L x dim)", positive)
    generate: bool = setting(False, "also greedy-decode every suffix for Pythia's match score "
                                    "(about one more pass per model)")
    sample_tries: int = setting(0, "sampling-based extraction: samples per prefix (0: off)", at_least(0))
    sample_top_k: int = setting(40, "top-k of the sampling-based extraction", positive)
    min_k_percent: float = setting(20.0, "k of Min-K% probability", between(0, 100, low_open=True))
    val_examples: int | None = setting(None, "cap on val examples for val_ppl", positive)
    classifier_student: str = setting("", "student the classifier predicts (default: first)")
    classifier_trials: int = setting(100, "resampled train/test splits (paper: 100)", positive)
    classifier_neg_ratio: int = setting(3, "negatives per positive (paper: 3)", positive)
    classifier_test_fraction: float = setting(0.3, "held out per trial (paper: 0.3)",
                                              between(0, 1, low_open=True, high_open=True))
    classifier_min_positives: int = setting(10, "fewer memorized examples: no classifier", positive)
    filter: bool = setting(True, "write a dataset without the examples predicted at risk")
    filter_threshold: float = setting(0.5, "predicted probability that counts as at risk", between(0, 1))
    filter_out: str = setting("", "filtered dataset folder (default: <out>/filtered_data)")
    extract_samples: int = setting(0, "Carlini et al. 2021 attack: samples (0: off)", at_least(0))
    extract_len: int = setting(0, "tokens per sample (0: example_len - 1)", at_least(0))
    extract_top_k: int = setting(40, "top-k sampling of the attack (Carlini et al.: 40)", positive)
    extract_model: str = setting("", "attacked model (default: teacher, else the first)")
    extract_reference: str = setting("", "model name for the ratio score (default: first baseline; 'none' to skip)")
    extract_window: int = setting(0, "training window that counts as extracted (0: S)", at_least(0))
    extract_quantize: str = setting("none", "int8: the attack samples from an int8 copy of its model, for speed; "
                                            "every score and flag stays fp32", one_of(*KINDS))
    figures: bool = setting(True, "PNG figures (needs matplotlib)")
    device: str = setting("auto", "auto: cuda > mps > cpu", one_of(*DEVICES))
    seed: int = setting(1337, "seeds the classifier's resampling and all sampling", seed_range)


# ----------------------------------------------------------------------------------------------
# Roles: names say what a model is


def role_of(name):
    if name == "teacher":
        return "teacher"
    for role in ("baseline", "student"):
        if name.startswith(role):
            return role
    return "other"


def student_key(name):
    """student_soft -> soft: the suffix of summary keys such as inherited_soft."""
    return name.removeprefix("student_") or name


def family_roles(names):
    """(teacher or None, [baselines], [students]) in the order given."""
    return ("teacher" if "teacher" in names else None,
            [n for n in names if role_of(n) == "baseline"], [n for n in names if role_of(n) == "student"])


# ----------------------------------------------------------------------------------------------
# Per-example measurements on one batch


def prompt_len(prefix_len):
    """Tokens of an example that prompt the model: BOS and the first prefix_len text tokens. The
    paper's P counts text tokens (Pythia has no BOS), so P = 50 prompts with 51 tokens here. One
    rule for memorization and for hard distillation's prompts (distill.py)."""
    return 1 + prefix_len


def first_false(ok):
    """Index of the first False in each row of ok (B, S), or S where the row is all True."""
    return torch.where(ok.all(1), ok.shape[1], (~ok).int().argmax(1))


def match_stats(generated, truth):
    """Pythia's memorization score: per row, the number of positions where generated equals truth,
    and the first mismatch (S when all match). Both (B, S) long tensors."""
    same = generated == truth
    return same.sum(1), first_false(same)


def position_chunks(B, T, V):
    step = max(1, CHUNK_ELEMENTS // (B * V))
    return [slice(a, min(a + step, T)) for a in range(0, T, step)]


@torch.no_grad()
def token_logprobs(model, tokens):
    """log p(tokens[:, t+1] | tokens[:, :t+1]) in fp32, (B, T-1), without all logits at once."""
    hidden = model(tokens[:, :-1], return_hidden=True)
    targets = tokens[:, 1:]
    out = torch.empty(targets.shape, device=tokens.device)
    for s in position_chunks(*targets.shape, model.args.vocab_size):
        lp = model.output(hidden[:, s]).float().log_softmax(-1)
        out[:, s] = lp.gather(-1, targets[:, s, None]).squeeze(-1)
    return out


@torch.no_grad()
def example_features(models, batch, prefix_len, suffix_len, min_k_percent=20.0, teacher=None, baselines=()):
    """One teacher-forced pass per model over batch (B, L) -> {column: numpy (B,)}.

    Per model, over the L-1 predicted tokens row[1:] unless said otherwise:
    memorized (argmax right at every suffix position), first_mismatch (in the suffix; S if none),
    log_ppl and ppl, suffix_logprob (sum over the suffix), suffix_entropy (mean Shannon entropy in
    nats of the next-token distribution at the suffix positions, the paper's entropy),
    min_k_logprob (mean of the k% lowest token log-probabilities, Shi et al. 2023).
    kl_teacher_<b>: KL(teacher || b) = sum_v p_teacher log(p_teacher / p_b), mean over positions."""
    B, L = batch.shape
    inputs, targets = batch[:, :-1], batch[:, 1:]
    start = prompt_len(prefix_len)  # the suffix's first token
    suffix = slice(start - 1, start - 1 + suffix_len)  # targets[:, t] is row[t + 1]
    order = sorted(models, key=lambda n: n != teacher)  # teacher first: the baselines' KL needs it
    hidden = {n: models[n](inputs, return_hidden=True) for n in order}  # (B, L-1, dim) each
    logp = {n: torch.empty(B, L - 1, device=batch.device) for n in order}
    entropy = {n: torch.zeros(B, L - 1, device=batch.device) for n in order}  # filled on the suffix
    correct = {n: torch.empty(B, L - 1, dtype=torch.bool, device=batch.device) for n in order}
    kl = {b: torch.empty(B, L - 1, device=batch.device) for b in baselines if teacher in models}
    vocab = max(m.args.vocab_size for m in models.values())
    for s in position_chunks(B, L - 1, vocab):
        lo, hi = max(s.start, suffix.start), min(s.stop, suffix.stop)  # this chunk's suffix positions
        for n in order:
            logits = models[n].output(hidden[n][:, s]).float()  # (B, chunk, V)
            lp = logits.log_softmax(-1)
            logp[n][:, s] = lp.gather(-1, targets[:, s, None]).squeeze(-1)
            correct[n][:, s] = logits.argmax(-1) == targets[:, s]
            if n == teacher:
                teacher_lp, teacher_p = lp, lp.exp()
            elif n in kl:
                kl[n][:, s] = (teacher_p * (teacher_lp - lp)).sum(-1)
            if lo < hi:  # the entropy is only needed on the suffix
                lp_suffix = lp[:, lo - s.start:hi - s.start]
                entropy[n][:, lo:hi] = -(lp_suffix.exp() * lp_suffix).sum(-1)
    cols = {}
    k = max(1, round((L - 1) * min_k_percent / 100))
    for n in order:
        lp = logp[n]
        cols[f"{n}.memorized"] = correct[n][:, suffix].all(1)
        cols[f"{n}.first_mismatch"] = first_false(correct[n][:, suffix])
        cols[f"{n}.log_ppl"] = -lp.mean(1)
        cols[f"{n}.suffix_logprob"] = lp[:, suffix].sum(1)
        cols[f"{n}.suffix_entropy"] = entropy[n][:, suffix].mean(1)
        cols[f"{n}.min_k_logprob"] = lp.topk(k, dim=1, largest=False).values.mean(1)
    for b in kl:
        cols[f"kl_{teacher}_{b}"] = kl[b].mean(1)
    cols = {c: v.cpu().numpy() for c, v in cols.items()}
    for n in order:  # in float64: a perplexity above 3e38 (log-perplexity 88) would overflow fp32
        cols[f"{n}.ppl"] = np.exp(cols[f"{n}.log_ppl"].astype(np.float64))
    return cols


@torch.no_grad()
def sampled_suffixes(model, prompts, suffix_len, tries, top_k, generator=None):
    """Sampling-based extraction: `tries` top-k samples of suffix_len tokens per prompt (B, P); keep
    the one the model finds most likely (highest sum of log-probabilities). Returns (B, suffix_len)."""
    B, P = prompts.shape
    repeated = prompts.repeat_interleave(tries, 0)  # (B * tries, P)
    samples = model.generate(repeated, suffix_len, temperature=1.0, top_k=top_k, generator=generator)
    score = token_logprobs(model, torch.cat([repeated, samples], 1))[:, P - 1:].sum(1).view(B, tries)
    return samples.view(B, tries, suffix_len)[torch.arange(B), score.argmax(1)]


def zlib_entropy(tokenizer, rows):
    """Bytes of zlib.compress (default level) of the UTF-8 text decoded from each row without its
    BOS: the whole example, row[1:]. Carlini et al. 2021 use it as a measure of how much a text
    really says; repetitive text compresses well and is easy to memorize."""
    return np.array([len(zlib.compress(tokenizer.decode(r[1:]).encode("utf-8"))) for r in rows], dtype=np.float64)


# ----------------------------------------------------------------------------------------------
# Streaming a split through the models


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


@torch.no_grad()
def measure_examples(models, rows, prefix_len, suffix_len, batch_size=32, generate=False, sample_tries=0,
                     sample_top_k=40, min_k_percent=20.0, tokenizer=None, seed=0, rank=0, world=1,
                     progress=True, index=None):
    """All per-example columns for rows [N, L] (a memmap is fine: read one batch at a time), or for
    the rows `index` lists (in that order).

    models: {name: Transformer} on one device; roles come from the names (family_roles). Returns
    {column: numpy array} for this rank's shard, with "index" (the row number) first."""
    teacher, baselines, _ = family_roles(list(models))
    device = next(iter(models.values())).tok_embeddings.weight.device
    index = np.arange(len(rows)) if index is None else np.asarray(index)
    lo, hi = batch_share(len(index), batch_size, rank, world)
    prompt, out = prompt_len(prefix_len), {}
    for i in progress_bar(range(lo, hi, batch_size), desc="memorization", unit="batch",
                          disable=not progress or rank != 0):
        j = min(i + batch_size, hi)
        rows_np = np.asarray(rows[index[i:j]], dtype=np.int64)
        batch = torch.from_numpy(rows_np).to(device)
        cols = {"index": index[i:j]}
        if tokenizer is not None:
            cols["zlib_entropy"] = zlib_entropy(tokenizer, rows_np)
        cols.update(example_features(models, batch, prefix_len, suffix_len, min_k_percent, teacher, baselines))
        prompts, truth = batch[:, :prompt], batch[:, prompt:prompt + suffix_len]
        for n, m in models.items():
            cols[f"{n}.match_count"] = cols[f"{n}.match_fraction"] = np.full(j - i, np.nan)  # null unless generated
            if generate:  # Pythia's score: greedy decoding with the KV cache
                matches, first = match_stats(m.generate(prompts, suffix_len), truth)
                cols[f"{n}.match_count"] = matches.cpu().numpy()
                cols[f"{n}.match_fraction"] = cols[f"{n}.match_count"] / suffix_len
                cols[f"{n}.generated_first_mismatch"] = first.cpu().numpy()
            if sample_tries > 0:
                chosen = sampled_suffixes(m, prompts, suffix_len, sample_tries, sample_top_k,
                                          batch_generator(device, seed, i, batch_size))
                cols[f"{n}.sampled_memorized"] = (chosen == truth).all(1).cpu().numpy()
        # Columns are allocated once for the whole shard: many small arrays kept alive between the
        # batches' large temporaries fragment the heap, and memory then grows with N.
        out = out or {c: np.empty(hi - lo, dtype=v.dtype) for c, v in cols.items()}
        for c, v in cols.items():
            out[c][i - lo:j - lo] = v
    return out


@torch.no_grad()
def memorized_flags(model, rows, prefix_len, suffix_len, batch_size=32):
    """The exact-match flag of every row, bool (N,): for training loops that track memorization.
    The same flag as measure_examples' with only the work it needs: one forward pass over the first
    P + S - 1 tokens, and the output layer at the S positions that predict the suffix.

    Computed in fp32 whatever autocast the caller runs under: only then is the flag greedy decoding's
    (under bf16 autocast, 22 of 256 rows that were a model's own greedy continuation came out "not
    memorized"). A model whose weights are bf16 stays bf16; a quantized one is refused."""
    check_full_precision({"model": model})
    device, prompt = model.tok_embeddings.weight.device, prompt_len(prefix_len)
    flags = np.empty(len(rows), dtype=bool)
    with torch.autocast(device.type, enabled=False):
        for i in range(0, len(rows), batch_size):
            batch = torch.from_numpy(np.asarray(rows[i:i + batch_size, :prompt + suffix_len], dtype=np.int64)).to(device)
            hidden = model(batch[:, :-1], return_hidden=True)[:, prompt - 1:]  # (B, S, dim)
            suffix = batch[:, prompt:]
            correct = torch.empty(suffix.shape, dtype=torch.bool, device=device)
            for s in position_chunks(*suffix.shape, model.args.vocab_size):
                correct[:, s] = model.output(hidden[:, s]).argmax(-1) == suffix[:, s]
            flags[i:i + batch_size] = correct.all(1).cpu().numpy()
    return flags


@torch.no_grad()
def val_nll(model, rows, batch_size, rank=0, world=1):
    """(sum of token negative log-likelihoods, token count) over this rank's share of rows."""
    device = model.tok_embeddings.weight.device
    lo, hi = shard_range(len(rows), rank, world)
    total, count = 0.0, 0
    for i in range(lo, hi, batch_size):
        batch = torch.from_numpy(np.asarray(rows[i:min(i + batch_size, hi)], dtype=np.int64)).to(device)
        lp = token_logprobs(model, batch)
        total, count = total - lp.double().sum().item(), count + lp.numel()
    return total, count


def gather(obj, world):
    """Rank 0 gets every rank's object, in rank order; the others get None. ([obj] in one process.)"""
    if world == 1:
        return [obj]
    parts = [None] * world if dist.get_rank() == 0 else None
    dist.gather_object(obj, parts, dst=0)
    return parts


def gather_columns(cols, world):
    """Concatenate the ranks' columns on rank 0 (contiguous shards: the row order is restored)."""
    parts = [p for p in gather(cols, world) or [] if p]
    return {c: np.concatenate([p[c] for p in parts]) for c in parts[0]} if parts else {}


# ----------------------------------------------------------------------------------------------
# Comparing a family: teacher, baseline seeds, students


def compare_family(memorized):
    """Set comparisons from {name: bool array (N,)}. The easy set: memorized by the teacher and at
    least one baseline seed; teacher-specific: memorized by the teacher and by no baseline seed
    (the two split the teacher's memorized set). Paper: 95.7% of the soft student's memorized
    examples are easy; it inherits 18 of 1,955 teacher-specific examples, the hard student 2.7x more."""
    names = list(memorized)
    out = {"models": {n: {"memorized": int(m.sum()), "memorization_rate": float(m.mean()) if len(m) else 0.0}
                      for n, m in memorized.items()},
           "overlap": {a: {b: int((memorized[a] & memorized[b]).sum()) for b in names} for a in names}}
    teacher, baselines, students = family_roles(names)
    if teacher is None or not baselines:
        return out
    any_baseline = np.logical_or.reduce([memorized[b] for b in baselines])
    easy = memorized[teacher] & any_baseline
    specific = memorized[teacher] & ~any_baseline
    out["easy"] = {"count": int(easy.sum()), "baselines": baselines}
    out["teacher_specific"] = {"count": int(specific.sum()), "baselines": baselines}
    for s in students:
        n_s = int(memorized[s].sum())
        out["easy"][f"share_{student_key(s)}"] = float((memorized[s] & easy).sum() / n_s) if n_s else None
        out["teacher_specific"][f"inherited_{student_key(s)}"] = int((memorized[s] & specific).sum())
    hard, soft = out["teacher_specific"].get("inherited_hard"), out["teacher_specific"].get("inherited_soft")
    out["teacher_specific"]["hard_soft_ratio"] = hard / soft if hard is not None and soft else None
    return out


# ----------------------------------------------------------------------------------------------
# Predicting memorization before distillation (the logistic regression is in classifier.py)


def classifier_features(cols, baseline):
    """The pre-distillation features, (N, 4): zlib entropy, teacher and baseline log-perplexity
    (log, not raw perplexity: perplexities are heavy-tailed), and KL(teacher || baseline)."""
    return np.stack([cols["zlib_entropy"], cols["teacher.log_ppl"], cols[f"{baseline}.log_ppl"],
                     cols[f"kl_teacher_{baseline}"]], axis=1).astype(np.float64)


# ----------------------------------------------------------------------------------------------
# Extraction attack (Carlini et al. 2021): sample, rank, look the samples up in the training data


class NgramIndex:
    """The set of 64-bit hashes of every n-token window inside the training rows (windows do not
    cross rows), as one sorted numpy array: 8 bytes per window, N * (L - n + 1) windows (1.6 GB
    for a million 256-token rows and n = 50, two to three times that while sorting). A window's
    hash is sum_j token_j * c_j mod 2^64 with fixed random odd c_j; distinct windows collide with
    negligible probability, so a hit is taken as a match."""

    def __init__(self, rows, n, chunk_rows=256):
        self.n = n
        self.coef = np.random.default_rng(20210609).integers(1, 2**63, size=n, dtype=np.uint64) | np.uint64(1)
        parts = [np.unique(self.hashes(np.asarray(rows[i:i + chunk_rows])))
                 for i in range(0, len(rows) if rows.shape[1] >= n else 0, chunk_rows)]
        self.table = np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.uint64)

    def hashes(self, rows):
        """(M, T) tokens -> (M, T - n + 1) uint64 window hashes (uint64 arithmetic wraps mod 2^64)."""
        windows = np.lib.stride_tricks.sliding_window_view(rows.astype(np.uint64), self.n, axis=1)
        return (windows * self.coef).sum(-1, dtype=np.uint64)

    def contains(self, samples):
        """bool (M,): whether each sample (M, T) holds a training window of n tokens or more."""
        samples = np.asarray(samples)
        if samples.shape[1] < self.n or len(self.table) == 0:
            return np.zeros(len(samples), dtype=bool)
        h = self.hashes(samples)
        pos = np.minimum(np.searchsorted(self.table, h), len(self.table) - 1)
        return (self.table[pos] == h).any(1)


@torch.no_grad()
def extraction_samples(target, reference, n, length, bos_id, top_k, batch_size, tokenizer, seed,
                       rank=0, world=1, progress=True, sampler=None):
    """This rank's share of n samples of `length` tokens from <|begin_of_text|> (top-k sampling), with
    the attack's scores: log-perplexity under target and reference, zlib entropy of the text.
    sampler: a faster copy of target to draw the samples from (int8), else target itself."""
    device = target.tok_embeddings.weight.device
    lo, hi = batch_share(n, batch_size, rank, world)
    parts = []
    for i in progress_bar(range(lo, hi, batch_size), desc="extraction", unit="batch",
                          disable=not progress or rank != 0):
        prompt = torch.full((min(batch_size, hi - i), 1), bos_id, dtype=torch.long, device=device)
        tokens = torch.cat([prompt, (sampler or target).generate(prompt, length, temperature=1.0, top_k=top_k,
                                                                generator=batch_generator(device, seed, i, batch_size))], 1)
        samples = tokens[:, 1:].cpu().numpy()
        cols = {"tokens": samples, "log_ppl": -token_logprobs(target, tokens).mean(1).cpu().numpy(),
                "zlib_entropy": zlib_entropy(tokenizer, tokens.cpu().numpy())}
        if reference is not None:
            cols["reference_log_ppl"] = -token_logprobs(reference, tokens).mean(1).cpu().numpy()
        parts.append(cols)
    return {c: np.concatenate([p[c] for p in parts]) for c in parts[0]} if parts else {}


def extraction_report(cols, hits, ks=(10, 100, 1000)):
    """Precision among the top-k samples ranked by each of Carlini et al.'s scores (lower = more
    suspicious): perplexity, zlib ratio (log-perplexity / zlib entropy), reference ratio
    (log-perplexity target / log-perplexity reference)."""
    scores = {"perplexity": cols["log_ppl"], "zlib_ratio": cols["log_ppl"] / cols["zlib_entropy"]}
    if "reference_log_ppl" in cols:
        scores["reference_ratio"] = cols["log_ppl"] / cols["reference_log_ppl"]
    ks = sorted({k for k in ks if k < len(hits)} | {len(hits)})
    return {name: {str(k): float(hits[np.argsort(s, kind="stable")[:k]].mean()) for k in ks}
            for name, s in scores.items()}


# ----------------------------------------------------------------------------------------------
# Loading and checking inputs


def parse_models(spec):
    """'name:path,name:path' (or a bare path, named after its folder) -> {name: path}, in order."""
    models = {}
    for item in [s.strip() for s in spec.split(",") if s.strip()]:
        name, sep, path = item.partition(":")
        if not sep:
            name, path = os.path.basename(os.path.normpath(item)), item
        if not name or "." in name:
            raise UserError(f"model name {name!r} must be non-empty and without dots; write --models=name:path")
        if name in models:
            raise UserError(f"model name {name!r} appears twice in --models; give each model its own name")
        models[name] = path
    if not models:
        raise UserError("no models given; pass --models=teacher:out/teacher,student_soft:out/soft (or one path)")
    return models


def checkpoint_tokenizer_sha(path):
    """The tokenizer a checkpoint was trained with: config.json's tokenizer_sha256 (this project's
    folders), else the sha256 of a tokenizer.model in the folder, else None (unknown)."""
    if checkpoint_format(path) == "own" and read_checkpoint_meta(path).get("tokenizer_sha256"):
        return read_checkpoint_meta(path)["tokenizer_sha256"]
    tok_path = os.path.join(path, "tokenizer.model")
    return Tokenizer(tok_path).sha256 if os.path.isfile(tok_path) else None


def load_models(paths, meta, data_dir, device, longest):
    """{name: Transformer in fp32, eval mode}, after checking each fits the dataset."""
    models = {}
    for name, path in paths.items():
        try:
            checkpoint_format(path)
        except FileNotFoundError:
            raise UserError(f"checkpoint {path!r} of model {name!r} is missing or incomplete; "
                            "pass an out/<run> folder written by train.py or distill.py") from None
        sha = checkpoint_tokenizer_sha(path)
        if sha is not None and sha != meta["tokenizer_sha256"]:
            raise UserError(f"model {name!r} ({path}) was trained with another tokenizer than {data_dir}; "
                            "measure it on a dataset prepared with its tokenizer")
        if sha is None:
            print(f"warning: {path} does not say which tokenizer it used; assuming {data_dir}'s")
        try:
            model = Transformer.from_pretrained(path, device=device, dtype=torch.float32).eval()
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load model {name!r} from {path} ({e}); pass a complete checkpoint folder") from None
        if model.args.vocab_size < meta["vocab_size"]:
            raise UserError(f"model {name!r} has {model.args.vocab_size} vocabulary entries, fewer than "
                            f"{data_dir}'s {meta['vocab_size']}; use a dataset made with its tokenizer")
        if model.args.max_seq_len < longest:
            raise UserError(f"model {name!r} handles {model.args.max_seq_len} tokens but this run needs "
                            f"{longest}; lower --extract_len or use shorter examples")
        models[name] = model
    if len({m.args.vocab_size for m in models.values()}) > 1:
        raise UserError("the models have different vocabulary sizes; compare models trained with one tokenizer")
    return models


def check_names(cfg, names):
    """Model names the settings refer to must exist (checked before any work is done)."""
    students = [n for n in names if role_of(n) == "student"]
    if cfg.classifier_student and cfg.classifier_student not in students:
        raise UserError(f"--classifier_student={cfg.classifier_student} is not one of the students {students}")
    for key in ("extract_model", "extract_reference"):
        value = getattr(cfg, key)
        if value and value != "none" and value not in names:
            raise UserError(f"--{key}={value} is not one of the models {names}; name one of them")


def check_full_precision(models):
    """Memorization flags must be exact: no model measured here may be quantized (quantize.py)."""
    quantized = [name for name, m in models.items() if is_quantized(m)]
    if quantized:
        raise UserError(f"model {quantized[0]!r} is quantized, and memorization is measured in full precision "
                        "(exact flags); pass it unquantized (--extract_quantize=int8 speeds up the attack alone)")


def check_config(cfg, meta):
    if meta.get("layout") != "examples":
        raise UserError(f"{cfg.data} has layout {meta.get('layout')!r}; prepare it with --layout=examples")
    L = meta["example_len"]
    if prompt_len(cfg.prefix_len) + cfg.suffix_len > L:
        raise UserError(f"BOS + prefix_len + suffix_len = {prompt_len(cfg.prefix_len) + cfg.suffix_len} exceeds the "
                        f"{L}-token examples of {cfg.data}; lower them or prepare examples of at least that length")


# ----------------------------------------------------------------------------------------------
# Outputs: per_example.jsonl, summary.json, report.md, figures


def write_atomic(path, chunks):
    """Write a string, or an iterable of strings (streamed), to a temporary name, then rename it into
    place: a crash never leaves a half-written file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        for chunk in [chunks] if isinstance(chunks, str) else chunks:
            f.write(chunk)
    os.replace(tmp, path)


def json_values(column):
    """A numpy column as JSON-ready Python values (NaN -> None)."""
    values = column.tolist()
    return [None if v != v else v for v in values] if column.dtype.kind == "f" else values


def per_example_lines(cols, names, block=10_000):
    """One JSON line per example: shared columns at the top, each model's under its name."""
    shared = [c for c in cols if "." not in c]
    per_model = {n: [(c[len(n) + 1:], c) for c in cols if c.startswith(n + ".")] for n in names}
    for lo in range(0, len(cols["index"]), block):
        part = {c: json_values(v[lo:lo + block]) for c, v in cols.items()}
        for i in range(len(part["index"])):
            record = {c: part[c][i] for c in shared}
            for n, keys in per_model.items():
                record[n] = {k: part[c][i] for k, c in keys}
            yield json.dumps(record) + "\n"


def fmt(x):
    if x is None:
        return "-"
    return x if isinstance(x, str) else f"{x:,}" if isinstance(x, int) else f"{x:.3g}"


def md_table(header, rows):
    lines = [header, ["---"] * len(header)] + [[fmt(v) for v in r] for r in rows]
    return "".join("| " + " | ".join(line) + " |\n" for line in lines)


def write_report(s, path):
    """report.md: the summary's numbers as tables, then the figures."""
    out = [f"# Memorization report\n\n{s['n_examples']:,} examples of `{s['data']}` ({s['split']} split), "
           f"{s['example_len']} tokens each; prefix BOS + {s['prefix_len']} tokens, suffix {s['suffix_len']}.\n\n"
           "## Models\n\n",
           md_table(["model", "role", "params", "val ppl", "memorized", "rate", "mean log-ppl", "suffix entropy"],
                    [[n, m["role"], m["params"], m["val_ppl"], m["memorized"], m["memorization_rate"],
                      m["mean_log_ppl"], m["mean_suffix_entropy"]] for n, m in s["models"].items()])]
    names = list(s["models"])
    if len(names) > 1:
        out += ["\n## Overlaps (examples memorized by both)\n\n",
                md_table([""] + names, [[a] + [s["overlap"][a][b] for b in names] for a in names])]
    if "easy" in s:
        e, t = s["easy"], s["teacher_specific"]
        out += [f"\n## Easy and teacher-specific examples\n\nEasy (memorized by the teacher and a baseline seed): "
                f"{e['count']:,}. Teacher-specific (by the teacher and no baseline seed): {t['count']:,}. "
                f"Hard/soft inheritance ratio: {fmt(t['hard_soft_ratio'])}.\n\n",
                md_table(["student", "share of its memorized that is easy", "teacher-specific inherited"],
                         [[k[6:], e[k], t[f"inherited_{k[6:]}"]] for k in e if k.startswith("share_")])]
    c = s["classifier"]
    out.append(f"\n## Predicting the student's memorization ({c.get('student') or '-'})\n\n")
    if c["status"] != "ok":
        out.append(c["status"] + "\n")
    else:
        pm = lambda a, b: f"{a:.4f} ± {b:.4f}"  # noqa: E731
        out += [f"{c['trials']} trials, {c['n_positives']} positives and {c['n_negatives']} negatives each, "
                f"30% held out. AUC-ROC {pm(c['auc_mean'], c['auc_std'])}, recall {pm(c['recall_mean'], c['recall_std'])}, "
                f"precision {pm(c['precision_mean'], c['precision_std'])}.\n\n",
                md_table(["standardized feature", "coefficient"], [[f, pm(v["mean"], v["std"])] for f, v in c["coefficients"].items()])]
    if s.get("filter", {}).get("path"):
        f = s["filter"]
        out.append(f"\nFilter: {f['at_risk']:,} examples predicted at risk (p >= {f['threshold']}) removed, "
                   f"{f['kept']:,} kept in `{f['path']}`.\n")
    if "extraction" in s:
        x = s["extraction"]
        ks = list(next(iter(x["precision"].values())))
        out += [f"\n## Extraction attack on {x['target']} (Carlini et al. 2021)\n\n{x['samples']:,} samples from "
                f"<|begin_of_text|>, {x['hits']:,} contain a training window of {x['window']} tokens. "
                "Precision among the top k by each score (reference model: "
                f"{x['reference'] or 'none'}):\n\n",
                md_table(["score"] + [f"top {k}" for k in ks], [[n] + [p[k] for k in ks] for n, p in x["precision"].items()])]
    if s["figures"]:
        out.append("\n## Figures\n\n" + "".join(f"![{f}]({f})\n" for f in s["figures"]))
    write_atomic(path, "".join(out))


def write_figures(summary, cols, out_dir):
    """PNG figures, if matplotlib is installed; returns the file names written."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed, so no figures (pip install matplotlib)")
        return []
    written = []

    def save(fig, name):
        tmp = os.path.join(out_dir, f".{name}.tmp{os.getpid()}")
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
        plt.close(fig)
        os.replace(tmp, os.path.join(out_dir, name))
        written.append(name)

    names = list(summary["models"])
    fig, ax = plt.subplots(figsize=(1.5 + 1.1 * len(names), 3))
    ax.bar(names, [100 * summary["models"][n]["memorization_rate"] for n in names])
    ax.set_ylabel("memorized (%)")
    ax.set_title("Discoverable memorization")
    save(fig, "memorization_rate.png")

    # The paper's "forced memorization" view: memorized examples whose suffix the model is unsure
    # about (high entropy) yet reproduces (high log-probability).
    fig, axes = plt.subplots(1, len(names), figsize=(3 * len(names), 3), sharex=True, sharey=True, squeeze=False)
    for ax, n in zip(axes[0], names):
        m = cols[f"{n}.memorized"]
        ax.scatter(cols[f"{n}.suffix_entropy"][m], cols[f"{n}.suffix_logprob"][m], s=4, alpha=0.5)
        ax.set_title(f"{n} ({int(m.sum()):,} memorized)", fontsize=10)
        ax.set_xlabel("suffix entropy (nats)")
    axes[0][0].set_ylabel("suffix log-probability")
    save(fig, "forced_memorization.png")

    c = summary["classifier"]
    who = c["student"] or names[0]
    if c["student"]:  # the classifier's features, split by what the student memorized
        feats = ["zlib_entropy", "teacher.log_ppl", f"{c['baseline']}.log_ppl", f"kl_teacher_{c['baseline']}"]
    else:
        feats = ["zlib_entropy", f"{who}.log_ppl", f"{who}.suffix_entropy"]
    label = cols[f"{who}.memorized"]
    fig, axes = plt.subplots(1, len(feats), figsize=(3 * len(feats), 3), squeeze=False)
    for ax, f in zip(axes[0], feats):
        bins = np.histogram_bin_edges(cols[f], bins=30)
        for rows, name in ((~label, "not memorized"), (label, "memorized")):
            if rows.any():  # a density of no values is 0/0
                ax.hist(cols[f][rows], bins=bins, density=True, alpha=0.6, label=name)
        ax.set_xlabel(f, fontsize=9)
    axes[0][0].legend(fontsize=8, title=who, title_fontsize=8)
    save(fig, "features.png")

    if c.get("roc"):
        fig, ax = plt.subplots(figsize=(3.5, 3.5))
        ax.plot(c["roc"]["fpr"], c["roc"]["tpr"], label=f"AUC {c['auc_mean']:.3f}")
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"predicting {who}")
        ax.legend(loc="lower right")
        save(fig, "roc.png")
    return written


# ----------------------------------------------------------------------------------------------
# The whole measurement: run() for a pipeline, main() for the command line


def run(cfg, models=None):
    """Measure, compare, classify, filter, attack, and write the report folder cfg.out.
    models: {name: Transformer} already loaded (else cfg.models is read). Returns the summary dict
    on rank 0, None on the other ranks."""
    if not cfg.data:
        raise UserError("pass --data=data/<name>, the dataset folder the models were trained on")
    meta = read_meta(cfg.data)
    check_config(cfg, meta)
    check_output_folder(cfg.out, "out")
    if cfg.filter_out:
        check_output_folder(cfg.filter_out, "filter_out")
    rows = open_split(cfg.data, cfg.split)[:cfg.max_examples]  # a memmap: rows are read batch by batch
    if len(rows) == 0:
        raise UserError(f"the {cfg.split!r} split of {cfg.data} has no examples; prepare it with more data")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(cfg.device, int(os.environ.get("LOCAL_RANK", 0)))
    started = world > 1 and not dist.is_initialized()
    if started:  # under torchrun
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        exit_with_launcher()
    try:
        paths = parse_models(cfg.models) if models is None else {n: "(in memory)" for n in models}
        check_names(cfg, list(paths))
        extract_len = cfg.extract_len or meta["example_len"] - 1
        if models is None:
            longest = max(meta["example_len"], extract_len + 1 if cfg.extract_samples else 0)
            models = load_models(paths, meta, cfg.data, device, longest)
        check_full_precision(models)
        tokenizer = Tokenizer(os.path.join(cfg.data, "tokenizer.model"))
        return _run(cfg, models, paths, meta, rows, tokenizer, device, dist.get_rank() if world > 1 else 0, world,
                    extract_len)
    finally:
        if started:
            dist.destroy_process_group()


def _run(cfg, models, paths, meta, rows, tokenizer, device, rank, world, extract_len):
    names = list(models)
    first, copies, group = distinct_examples(rows)  # each example once, however often it was planted
    cols = measure_examples(models, rows, cfg.prefix_len, cfg.suffix_len, cfg.batch_size, cfg.generate,
                            cfg.sample_tries, cfg.sample_top_k, cfg.min_k_percent, tokenizer, cfg.seed, rank, world,
                            index=first)
    cols = gather_columns(cols, world)
    val_ppl = {n: validation_perplexity(cfg, meta, m, rank, world) for n, m in models.items()}
    extraction = run_extraction(cfg, models, meta, tokenizer, device, rank, world, extract_len)
    if rank != 0:
        return None
    cols = {"index": cols.pop("index"), "copies": copies, **cols}

    os.makedirs(cfg.out, exist_ok=True)
    family = compare_family({n: cols[f"{n}.memorized"] for n in names})
    summary = {"data": cfg.data, "split": cfg.split, "n_examples": len(cols["index"]), "n_rows": len(rows),
               "copies": {str(c): int((copies == c).sum()) for c in np.unique(copies)},
               "prefix_len": cfg.prefix_len, "suffix_len": cfg.suffix_len, "example_len": meta["example_len"],
               "models": {n: {"role": role_of(n), "path": paths[n], "params": m.num_params(), "val_ppl": val_ppl[n],
                              **family["models"][n], **model_means(n, cols, cfg.suffix_len)}
                          for n, m in models.items()}}
    summary.update({k: v for k, v in family.items() if k != "models"})
    summary.update(classify_and_filter(cfg, meta, cols, names, group))
    if (copies > 1).any():  # planted repeats: the family again on the natural (unrepeated) examples alone
        summary["natural"] = natural_family(cfg, cols, names)
        summary["by_copies"] = {str(c): {"examples": int((copies == c).sum()),
                                         **{n: int(cols[f"{n}.memorized"][copies == c].sum()) for n in names}}
                                for c in np.unique(copies)}
    if extraction:
        summary["extraction"], lines = extraction
        write_atomic(os.path.join(cfg.out, "extraction.jsonl"), lines)
    write_atomic(os.path.join(cfg.out, "per_example.jsonl"), per_example_lines(cols, names))
    summary["figures"] = write_figures(summary, cols, cfg.out) if cfg.figures else []
    summary["config"] = config_dict(cfg)
    write_atomic(os.path.join(cfg.out, "summary.json"), json.dumps(summary, indent=2) + "\n")
    write_report(summary, os.path.join(cfg.out, "report.md"))
    print_summary(summary, cfg.out)
    return summary


def model_means(n, cols, suffix_len):
    out = {f"mean_{k}": float(cols[f"{n}.{k}"].mean()) for k in ("log_ppl", "suffix_entropy", "min_k_logprob")}
    if not np.isnan(cols[f"{n}.match_count"]).all():  # --generate
        generated = cols[f"{n}.match_count"] == suffix_len
        out.update(generated_memorized=int(generated.sum()), mean_match_fraction=float(cols[f"{n}.match_fraction"].mean()),
                   flag_disagreements=int((generated != cols[f"{n}.memorized"]).sum()))
    if f"{n}.sampled_memorized" in cols:
        out["sampled_memorized"] = int(cols[f"{n}.sampled_memorized"].sum())
    return out


def validation_perplexity(cfg, meta, model, rank, world):
    """Token-level perplexity of the val split's examples (None without a val split)."""
    if not meta["splits"].get("val", {}).get("tokens"):
        return None
    rows = open_split(cfg.data, "val")[:cfg.val_examples]
    sums = gather(val_nll(model, rows, cfg.batch_size, rank, world), world)
    if sums is None:
        return None
    total, count = sum(s[0] for s in sums), sum(s[1] for s in sums)
    return math.exp(total / count) if count else None


def classifiers(cfg, cols, names):
    """The logistic regression predicting each student's memorization from pre-distillation
    features (the paper's protocol); "classifier" is the chosen student's."""
    teacher, baselines, students = family_roles(names)
    if not (teacher and baselines and students):
        return {"classifier": {"status": "skipped: needs a teacher, a baseline and a student", "student": None,
                               **dict.fromkeys(["auc_mean", "auc_std", "recall_mean", "recall_std", "precision_mean",
                                                "precision_std", "coefficients"])}}
    X = classifier_features(cols, baselines[0])
    out = {"classifiers": {s: {"student": s, "baseline": baselines[0], **classifier_trials(
        X, cols[f"{s}.memorized"], FEATURES, cfg.classifier_trials, cfg.classifier_neg_ratio,
        cfg.classifier_test_fraction, cfg.classifier_min_positives, cfg.seed)} for s in students}}
    out["classifier"] = out["classifiers"][cfg.classifier_student or students[0]]
    return out


def natural_family(cfg, cols, names):
    """The family's comparisons and classifiers on the examples that appear once in the data."""
    natural = cols["copies"] == 1
    sub = {c: v[natural] for c, v in cols.items()}
    family = compare_family({n: sub[f"{n}.memorized"] for n in names})
    return {"n_examples": int(natural.sum()), **family, **classifiers(cfg, sub, names)}


def classify_and_filter(cfg, meta, cols, names, group):
    """The classifier for each student, and the filtered dataset for the chosen one (group: each
    training row's position in cols, so that every copy of an example at risk goes)."""
    out = classifiers(cfg, cols, names)
    chosen = out["classifier"]["student"]
    if chosen is None:
        return out
    if not cfg.filter or cfg.split != "train":
        out["filter"] = {"status": "off: --filter=false or a split other than train"}
    elif out["classifier"]["status"] != "ok":
        out["filter"] = {"status": f"skipped: the classifier did not run ({out['classifier']['status']})"}
    else:
        X = classifier_features(cols, out["classifier"]["baseline"])
        cols["at_risk_probability"] = at_risk_probability(X, cols[f"{chosen}.memorized"], cfg.classifier_neg_ratio, cfg.seed)
        out["filter"] = write_filtered(cfg, meta, cols["at_risk_probability"][group], chosen)
    return out


def write_filtered(cfg, meta, risk, student):
    """A dataset folder like cfg.data without the training rows predicted at risk (risk: per row,
    every copy of an example alike), and at_risk.json listing them, so that distillation can be
    re-run on it and the drop measured."""
    at_risk = risk >= cfg.filter_threshold
    path = cfg.filter_out or os.path.join(cfg.out, "filtered_data")
    train = open_split(cfg.data, "train")
    drop = np.zeros(len(train), dtype=bool)
    drop[:len(at_risk)] = at_risk  # rows beyond --max_examples were not scored: they stay
    splits = {"train": train[~drop]}
    if meta["splits"].get("val", {}).get("tokens"):
        splits["val"] = open_split(cfg.data, "val")
    extra = {k: meta[k] for k in ("source", "dedup_removed") if k in meta}
    extra["filtered"] = {"from": cfg.data, "student": student, "threshold": cfg.filter_threshold, "removed": int(drop.sum())}
    write_dataset(path, os.path.join(cfg.data, "tokenizer.model"), splits, "examples", extra)
    write_atomic(os.path.join(cfg.out, "at_risk.json"), json.dumps(
        {"student": student, "threshold": cfg.filter_threshold, "rows": np.flatnonzero(at_risk).tolist(),
         "probabilities": risk[at_risk].tolist()}) + "\n")
    return {"status": "ok", "at_risk": int(drop.sum()), "kept": int((~drop).sum()), "threshold": cfg.filter_threshold,
            "path": path}


def run_extraction(cfg, models, meta, tokenizer, device, rank, world, extract_len):
    """Carlini et al. 2021's attack: each rank samples its share, rank 0 looks them up in the index.
    Returns (summary entry, extraction.jsonl lines) on rank 0, else None."""
    if cfg.extract_samples <= 0:
        return None
    teacher, baselines, _ = family_roles(list(models))
    target = cfg.extract_model or teacher or next(iter(models))
    # Carlini et al. compare with a smaller model trained on similar data; here, a baseline.
    reference = cfg.extract_reference or next((b for b in baselines if b != target), "none")
    sampler = quantized_copy(models[target], cfg.extract_quantize) if cfg.extract_quantize != "none" else None
    ex = extraction_samples(models[target], models.get(reference), cfg.extract_samples, extract_len, meta["bos_id"],
                            cfg.extract_top_k, cfg.batch_size, tokenizer, cfg.seed + 7919, rank, world, sampler=sampler)
    ex = gather_columns(ex, world)
    if rank != 0:
        return None
    window = cfg.extract_window or cfg.suffix_len
    hits = NgramIndex(open_split(cfg.data, "train"), window).contains(ex["tokens"])
    entry = {"samples": len(hits), "target": target, "reference": None if reference == "none" else reference,
             "window": window, "hits": int(hits.sum()), "precision": extraction_report(ex, hits)}
    lines = (json.dumps({"log_ppl": float(ex["log_ppl"][i]), "zlib_entropy": float(ex["zlib_entropy"][i]),
                         "reference_log_ppl": float(ex["reference_log_ppl"][i]) if "reference_log_ppl" in ex else None,
                         "contains_training_window": bool(hits[i]), "text": tokenizer.decode(ex["tokens"][i])}) + "\n"
             for i in range(len(hits)))
    return entry, lines


def print_summary(summary, out):
    for n, m in summary["models"].items():
        print(f"{n:>16}: memorized {m['memorized']:,} of {summary['n_examples']:,} ({100 * m['memorization_rate']:.2f}%), "
              f"val ppl {fmt(m['val_ppl'])}")
    if "easy" in summary:
        print(f"easy {summary['easy']['count']:,}, teacher-specific {summary['teacher_specific']['count']:,}")
    c = summary["classifier"]
    print(f"classifier: AUC {c['auc_mean']:.4f} ± {c['auc_std']:.4f}" if c["auc_mean"] is not None else f"classifier: {c['status']}")
    print(f"wrote {out}/report.md, summary.json, per_example.jsonl")


def main(argv):
    return run(parse_config(MemorizeConfig, argv, prog="memorize.py"))


if __name__ == "__main__":
    run_main(main)
