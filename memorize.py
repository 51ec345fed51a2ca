"""
Which training examples a model regurgitates, and why (Borkar et al. 2026, arXiv 2601.15394).

- Discoverable memorization: prompt a model with BOS and an example's first P tokens and decode S
  tokens greedily; the example is memorized when they are its next S tokens exactly (paper: P = S =
  50, `prompt_len`). One teacher-forced forward pass decides it (`memorized_flags`): greedy decoding
  reproduces the suffix if and only if the argmax is the true token at every suffix position.
  `--generate` also decodes with the KV cache, for Pythia's per-token match score.
- Per-example features in fp32, one batch at a time (never [N, T, V]): zlib entropy, perplexity,
  suffix entropy and log-probability, Min-K% probability, KL(teacher || baseline).
- A family (teacher, baseline seeds, students): rates, overlaps, the "easy" set, teacher-specific
  examples and how many each student inherits, the hard/soft inheritance ratio; with planted copies,
  the same again on the natural examples (they appear once and their suffix occurs nowhere else in
  the data), and per copies stratum how many each model memorized and how close it came.
- Predicting before distillation which examples the student will memorize: classifier.py's logistic
  regression on pre-distillation features with the paper's protocol, and a dataset without the
  examples it flags, to distill again on.
- `MemorizationTracker`: the same flag while a model trains (train.py --mem_every); where training runs
  in bf16, `screened_memorized_flags` gives the same flags faster, deciding most examples in bf16.
- Streams the memory-mapped split (flat memory at a million examples) and shares it over ranks under
  torchrun. Writes per_example.jsonl and summary.json, and report.md and figures through report.py.
  The extraction attack, which needs no prefixes, is extract.py.

The schema of summary.json and per_example.jsonl is in docs/reproduction.md.
"""

import json
import math
import os
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from checkpoint import check_fits_data, empty_model, load_model, load_weights
from classifier import at_risk_probability, classifier_trials
from config import (UserError, at_least, between, check_output_folder, config_dict, one_of, parse_config, positive,
                    progress_bar, run_main, seed_range, setting, write_atomic)
from data import distinct_examples, open_split, read_info, window_counts, write_dataset
from distributed import (DEVICES, all_gather_flags, batch_generator, batch_share, equal_share, full_weights, gather,
                         gather_columns, processes, shard_range)
from quantize import is_quantized
from report import fmt, measurement_figures, write_measurement_report
from tokenizer import Tokenizer

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
    figures: bool = setting(True, "PNG figures (needs matplotlib)")
    device: str = setting("auto", "auto: cuda > mps > cpu", one_of(*DEVICES))
    seed: int = setting(1337, "seeds the classifier's resampling and --sample_tries", seed_range)


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


def base_of(name, names):
    """The base a model of the family was fine-tuned from, when the family includes it: base_teacher
    for the teacher, base_student for the baselines and students (make reproduce's names); else None."""
    base = "base_teacher" if name == "teacher" else "base_student" if role_of(name) in ("baseline", "student") else None
    return base if base in names else None


def family_roles(names):
    """(teacher or None, [baselines], [students]) in the order given."""
    return ("teacher" if "teacher" in names else None,
            [n for n in names if role_of(n) == "baseline"], [n for n in names if role_of(n) == "student"])


# ----------------------------------------------------------------------------------------------
# Discoverable memorization: the definition, one teacher-forced pass


def prompt_len(prefix_len):
    """Tokens of an example that prompt the model: BOS and the first prefix_len text tokens. The
    paper's P counts text tokens (Pythia has no BOS), so P = 50 prompts with 51 tokens here. One
    rule for memorization and for hard distillation's prompts (distill.py)."""
    return 1 + prefix_len


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


# The largest gap between a logit computed under bf16 autocast and the same logit in fp32 that the
# screen below trusts (two logits' order can flip only where they are closer than twice this). On the
# reproduction's fine-tuned models the largest gap over every suffix logit of D is 0.13-0.20 (Intel
# Xeon with AMX; a row's largest is 0.05-0.07 at the median).
BF16_LOGIT_ERROR = 0.5


@torch.no_grad()
def screened_memorized_flags(model, rows, prefix_len, suffix_len, batch_size=64, error=BF16_LOGIT_ERROR):
    """memorized_flags' flags (fp32 greedy decoding's), from a bf16 pass where bf16 cannot change them.

    If every logit under bf16 is within `error` of its fp32 value, a suffix position whose top bf16
    logit is the true token's and leads the runner-up by more than 2 * error is right in fp32 too,
    and one whose top logit leads the true token's by more than 2 * error is wrong in fp32 too. An
    example is decided in bf16 when every position is surely right (memorized) or one is surely
    wrong (not memorized); the others are computed again in fp32 by memorized_flags. The bound is a
    measurement, not a proof, so each batch checks it: its first row is computed in fp32 as well,
    and if any of its logits is further than error / 2 from the bf16 one, the whole batch is
    computed in fp32. Pays where bf16 matrix products are much faster than fp32 ones (AMX, GPUs)."""
    check_full_precision({"model": model})
    device, prompt = model.tok_embeddings.weight.device, prompt_len(prefix_len)
    flags, redo = np.empty(len(rows), dtype=bool), []
    for i in range(0, len(rows), batch_size):
        batch = torch.from_numpy(np.asarray(rows[i:i + batch_size, :prompt + suffix_len], dtype=np.int64)).to(device)
        suffix, n = batch[:, prompt:], len(batch)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            hidden = model(batch[:, :-1], return_hidden=True)[:, prompt - 1:]  # (B, S, dim)
            sentinel = model.output(hidden[:1]).float()
        with torch.autocast(device.type, enabled=False):
            exact = model.output(model(batch[:1, :-1], return_hidden=True)[:, prompt - 1:])
        if (sentinel - exact).abs().max() > error / 2:  # bf16 is further off than the bound allows
            redo.extend(range(i, i + n))
            continue
        right, wrong = (torch.empty(suffix.shape, dtype=torch.bool, device=device) for _ in range(2))
        for s in position_chunks(*suffix.shape, model.args.vocab_size):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                logits = model.output(hidden[:, s]).float()
            top, runner_up = logits.topk(2).values.unbind(-1)
            true = logits.gather(-1, suffix[:, s, None]).squeeze(-1)
            right[:, s] = (top == true) & (top - runner_up > 2 * error)  # the true token leads by the margin
            wrong[:, s] = top - true > 2 * error  # another token leads the true one by the margin
        right, wrong = right.all(1).cpu().numpy(), wrong.any(1).cpu().numpy()
        flags[i:i + n] = right
        redo.extend(i + np.flatnonzero(~(right | wrong)))
    if redo:
        flags[redo] = memorized_flags(model, rows[np.asarray(redo)], prefix_len, suffix_len)
    return flags


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
def token_logprobs(model, tokens, with_argmax=False):
    """log p(tokens[:, t+1] | tokens[:, :t+1]) in fp32, (B, T-1), without all logits at once; with
    with_argmax, also whether each next token is the model's most likely one (B, T-1) bool."""
    hidden = model(tokens[:, :-1], return_hidden=True)
    targets = tokens[:, 1:]
    out = torch.empty(targets.shape, device=tokens.device)
    right = torch.empty(targets.shape, dtype=torch.bool, device=tokens.device)
    for s in position_chunks(*targets.shape, model.args.vocab_size):
        lp = model.output(hidden[:, s]).float().log_softmax(-1)
        out[:, s] = lp.gather(-1, targets[:, s, None]).squeeze(-1)
        right[:, s] = lp.argmax(-1) == targets[:, s]
    return (out, right) if with_argmax else out


class MemorizationTracker:
    """Which examples of a dataset a model in training reproduces exactly (memorized_flags' flags),
    each distinct example once (planted copies are one example). train.py --mem_every measures it at
    the start and every few epochs: when each example is learned by heart."""

    def __init__(self, data_dir, prefix_len, suffix_len, tokenizer_sha256):
        info = read_info(data_dir)
        if info["layout"] != "examples" or info["tokenizer_sha256"] != tokenizer_sha256:
            raise UserError(f"--mem_data={data_dir} must hold examples (layout examples) made with the training "
                            "data's tokenizer; prepare it so or drop --mem_every")
        if prompt_len(prefix_len) + suffix_len > info["example_len"]:
            raise UserError(f"BOS + --mem_prefix_len + --mem_suffix_len must fit the {info['example_len']}-token "
                            f"examples of {data_dir}; lower them")
        self.prefix_len, self.suffix_len = prefix_len, suffix_len
        self.rows = open_split(data_dir, "train")
        self.index = distinct_examples(self.rows)[0]

    @torch.no_grad()
    def measure(self, model, ctx):
        """The row indices (into the split) of the examples memorized now; every rank gets them all.
        Each rank measures an equal share. Under FSDP it measures an unsharded copy of the fp32
        weights: FSDP's forward is collective, and on CUDA it computes in bf16, which flips flags."""
        if ctx.parallel == "fsdp":
            model = load_weights(empty_model(model.args), full_weights(model).items(), ctx.device, torch.float32)
        was_training = model.training
        model.eval()
        # Where training runs in bf16 (the hardware is fast at it), the screen decides most examples
        # in bf16 and the rest in fp32: the same flags as memorized_flags.
        flags_of = screened_memorized_flags if ctx.compute_dtype == torch.bfloat16 else memorized_flags
        flags = flags_of(model, self.rows[self.index[equal_share(len(self.index), ctx)]], self.prefix_len,
                         self.suffix_len)
        model.train(was_training)
        return self.index[all_gather_flags(flags, len(self.index), ctx)]


# ----------------------------------------------------------------------------------------------
# Per-example measurements on one batch


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


def zlib_entropy(tokenizer, rows):
    """Bytes of zlib.compress (default level) of the UTF-8 text decoded from each row without its
    BOS: the whole example, row[1:]. Carlini et al. 2021 use it as a measure of how much a text
    really says; repetitive text compresses well and is easy to memorize. The paper's feature."""
    return np.array([len(zlib.compress(tokenizer.decode(r[1:]).encode("utf-8"))) for r in rows], dtype=np.float64)


def zlib_ratio(tokenizer, rows):
    """zlib's compressed bytes over the text's own bytes, per row (without BOS). On short examples
    raw zlib bytes mostly measure how long the text is (33 tokens of verse barely compress); the
    ratio measures how repetitive it is, whatever its length."""
    texts = [tokenizer.decode(r[1:]).encode("utf-8") for r in rows]
    return np.array([len(zlib.compress(t)) / max(len(t), 1) for t in texts], dtype=np.float64)


@torch.no_grad()
def sampled_suffixes(model, prompts, suffix_len, tries, top_k, generator=None):
    """Sampling-based extraction: `tries` top-k samples of suffix_len tokens per prompt (B, P); keep
    the one the model finds most likely (highest sum of log-probabilities). Returns (B, suffix_len)."""
    B, P = prompts.shape
    repeated = prompts.repeat_interleave(tries, 0)  # (B * tries, P)
    samples = model.generate(repeated, suffix_len, temperature=1.0, top_k=top_k, generator=generator)
    score = token_logprobs(model, torch.cat([repeated, samples], 1))[:, P - 1:].sum(1).view(B, tries)
    return samples.view(B, tries, suffix_len)[torch.arange(B), score.argmax(1)]


# ----------------------------------------------------------------------------------------------
# Streaming a split through the models


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
            cols["zlib_ratio"] = zlib_ratio(tokenizer, rows_np)
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
def val_nll(model, rows, batch_size, rank=0, world=1):
    """(sum of token negative log-likelihoods, tokens predicted right by the argmax, token count) over
    this rank's share of rows."""
    device = model.tok_embeddings.weight.device
    lo, hi = shard_range(len(rows), rank, world)
    total, right, count = 0.0, 0, 0
    for i in range(lo, hi, batch_size):
        batch = torch.from_numpy(np.asarray(rows[i:min(i + batch_size, hi)], dtype=np.int64)).to(device)
        lp, correct = token_logprobs(model, batch, with_argmax=True)
        total, right, count = total - lp.double().sum().item(), right + int(correct.sum()), count + lp.numel()
    return total, right, count


def validation_scores(cfg, info, model, rank, world):
    """On the val split's examples (held-out text): token-level perplexity, and the share of tokens
    the model's most likely prediction gets right. The second is a measure of use in the spirit of
    the paper's downstream tasks (LAMBADA's last-word accuracy): it does not punish a model for being
    overconfident, which perplexity does. Both None without a val split."""
    if not info["splits"].get("val", {}).get("tokens"):
        return {"val_ppl": None, "val_accuracy": None}
    rows = open_split(cfg.data, "val")[:cfg.val_examples]
    sums = gather(val_nll(model, rows, cfg.batch_size, rank, world), world)
    if sums is None:  # not rank 0: the numbers are gathered there
        return {"val_ppl": None, "val_accuracy": None}
    total, right, count = (sum(s[i] for s in sums) for i in range(3))
    return {"val_ppl": math.exp(total / count) if count else None, "val_accuracy": right / count if count else None}


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


def beyond_base(cols, name, names):
    """Which examples a model memorizes that its own base does not (all it memorizes, without a base)."""
    base = base_of(name, names)
    return cols[f"{name}.memorized"] & ~cols[f"{base}.memorized"] if base else cols[f"{name}.memorized"]


def suffix_occurrences(rows, first, prefix_len, suffix_len):
    """For each distinct example (rows[first]), how many times its suffix occurs in the rows measured
    (all of D unless --max_examples), at any position, copies included: more than its copies when the
    same text is also part of another example (a passage a play repeats, a line that generated code
    repeats), so that text seen once is told apart from a row seen once."""
    start = prompt_len(prefix_len)
    return window_counts(rows, np.asarray(rows[first])[:, start:start + suffix_len])


def natural_family(cfg, cols, names):
    """The family's comparisons and classifiers on the natural examples: those that appear once in the
    data and whose suffix occurs nowhere else in it (text seen once, as the paper's deduplicated data),
    each fine-tuned model's memorization counted beyond its base's: what fine-tuning on D made it
    reproduce, not what pretraining already had (the bases see no example of D, but a predictable
    text can be reproduced without having been seen). The examples that appear once but whose suffix
    occurs elsewhere are counted apart."""
    once = cols["copies"] == 1
    natural = once & (cols["suffix_in_data"] == 1)
    sub = {c: v[natural] for c, v in cols.items()}
    for n in names:
        sub[f"{n}.memorized"] = beyond_base(cols, n, names)[natural]
    family = compare_family({n: sub[f"{n}.memorized"] for n in names})
    repeated = once & ~natural
    return {"n_examples": int(natural.sum()), "memorized_counts": "beyond the base", **family,
            "suffix_elsewhere": {"examples": int(repeated.sum()),
                                 **{n: int(beyond_base(cols, n, names)[repeated].sum()) for n in names}},
            **classifiers(cfg, sub, names)}


# ----------------------------------------------------------------------------------------------
# Predicting memorization before distillation (the logistic regression is classifier.py's)


def classifier_features(cols, baseline, zlib="zlib_entropy"):
    """The pre-distillation features, (N, 4): zlib entropy (the paper's raw compressed bytes, or with
    zlib="zlib_ratio" the compression ratio), teacher and baseline log-perplexity (log, not raw
    perplexity: perplexities are heavy-tailed), and KL(teacher || baseline)."""
    return np.stack([cols[zlib], cols["teacher.log_ppl"], cols[f"{baseline}.log_ppl"],
                     cols[f"kl_teacher_{baseline}"]], axis=1).astype(np.float64)


def classifiers(cfg, cols, names):
    """The logistic regression predicting each student's memorization from pre-distillation
    features (the paper's protocol); "classifier" is the chosen student's."""
    teacher, baselines, students = family_roles(names)
    if not (teacher and baselines and students):
        return {"classifier": {"status": "skipped: needs a teacher, a baseline and a student", "student": None,
                               **dict.fromkeys(["auc_mean", "auc_std", "recall_mean", "recall_std", "precision_mean",
                                                "precision_std", "coefficients"])}}
    def trials(student, zlib):
        return {"student": student, "baseline": baselines[0], **classifier_trials(
            classifier_features(cols, baselines[0], zlib), cols[f"{student}.memorized"],
            (zlib,) + FEATURES[1:], cfg.classifier_trials, cfg.classifier_neg_ratio, cfg.classifier_test_fraction,
            cfg.classifier_min_positives, cfg.seed)}
    chosen = cfg.classifier_student or students[0]
    out = {"classifiers": {s: trials(s, "zlib_entropy") for s in students}}
    out["classifier"] = out["classifiers"][chosen]
    out["classifier_zlib_ratio"] = trials(chosen, "zlib_ratio")  # the same, with the compression ratio
    return out


def classify_and_filter(cfg, info, cols, names, group):
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
        out["filter"] = write_filtered(cfg, info, cols["at_risk_probability"][group], chosen)
    return out


def write_filtered(cfg, info, risk, student):
    """A dataset folder like cfg.data without the training rows predicted at risk (risk: per row,
    every copy of an example alike), and at_risk.json listing them, so that distillation can be
    re-run on it and the drop measured."""
    at_risk = risk >= cfg.filter_threshold
    path = cfg.filter_out or os.path.join(cfg.out, "filtered_data")
    train = open_split(cfg.data, "train")
    drop = np.zeros(len(train), dtype=bool)
    drop[:len(at_risk)] = at_risk  # rows beyond --max_examples were not scored: they stay
    splits = {"train": train[~drop]}
    if info["splits"].get("val", {}).get("tokens"):
        splits["val"] = open_split(cfg.data, "val")
    extra = {k: info[k] for k in ("source", "dedup_removed") if k in info}
    extra["filtered"] = {"from": cfg.data, "student": student, "threshold": cfg.filter_threshold, "removed": int(drop.sum())}
    write_dataset(path, os.path.join(cfg.data, "tokenizer.model"), splits, "examples", extra)
    write_atomic(os.path.join(cfg.out, "at_risk.json"), json.dumps(
        {"student": student, "threshold": cfg.filter_threshold, "rows": np.flatnonzero(at_risk).tolist(),
         "probabilities": risk[at_risk].tolist()}) + "\n")
    return {"status": "ok", "at_risk": int(drop.sum()), "kept": int((~drop).sum()), "threshold": cfg.filter_threshold,
            "path": path}


# ----------------------------------------------------------------------------------------------
# The whole measurement: run() for a pipeline, main() for the command line


def run(cfg, models=None):
    """Measure, compare, classify and filter, and write the report folder cfg.out. models: {name:
    Transformer} already loaded (else cfg.models is read). Returns the summary dict on rank 0, None
    on the other ranks."""
    if not cfg.data:
        raise UserError("pass --data=data/<name>, the dataset folder the models were trained on")
    info = read_info(cfg.data)
    check_config(cfg, info)
    check_output_folder(cfg.out, "out")
    if cfg.filter_out:
        check_output_folder(cfg.filter_out, "filter_out")
    rows = open_split(cfg.data, cfg.split)[:cfg.max_examples]  # a memmap: rows are read batch by batch
    if len(rows) == 0:
        raise UserError(f"the {cfg.split!r} split of {cfg.data} has no examples; prepare it with more data")
    paths = parse_models(cfg.models) if models is None else {n: "(in memory)" for n in models}
    check_names(cfg, list(paths))
    with processes(device=cfg.device, dtype="fp32") as ctx:
        if models is None:
            models = load_models(paths, info, cfg.data, ctx.device, info["example_len"])
        check_full_precision(models)
        return measure_family(cfg, models, paths, info, rows, Tokenizer(os.path.join(cfg.data, "tokenizer.model")), ctx)


def measure_family(cfg, models, paths, info, rows, tokenizer, ctx):
    names = list(models)
    first, copies, group = distinct_examples(rows)  # each example once, however often it was planted
    cols = measure_examples(models, rows, cfg.prefix_len, cfg.suffix_len, cfg.batch_size, cfg.generate,
                            cfg.sample_tries, cfg.sample_top_k, cfg.min_k_percent, tokenizer, cfg.seed, ctx.rank,
                            ctx.world_size, index=first)
    cols = gather_columns(cols, ctx.world_size)
    val = {n: validation_scores(cfg, info, m, ctx.rank, ctx.world_size) for n, m in models.items()}
    if not ctx.is_main:
        return None
    cols = {"index": cols.pop("index"), "copies": copies,
            "suffix_in_data": suffix_occurrences(rows, first, cfg.prefix_len, cfg.suffix_len), **cols}

    os.makedirs(cfg.out, exist_ok=True)
    family = compare_family({n: cols[f"{n}.memorized"] for n in names})
    summary = {"data": cfg.data, "split": cfg.split, "n_examples": len(cols["index"]), "n_rows": len(rows),
               "copies": {str(c): int((copies == c).sum()) for c in np.unique(copies)},
               "prefix_len": cfg.prefix_len, "suffix_len": cfg.suffix_len, "example_len": info["example_len"],
               "models": {n: {"role": role_of(n), "path": paths[n], "params": m.num_params(), **val[n],
                              "base": base_of(n, names), **family["models"][n], **model_means(n, cols, cfg.suffix_len)}
                          for n, m in models.items()}}
    for n in names:  # what fine-tuning added: examples memorized that the model's own base does not reproduce
        if base_of(n, names):
            summary["models"][n]["memorized_beyond_base"] = int(beyond_base(cols, n, names).sum())
    summary.update({k: v for k, v in family.items() if k != "models"})
    summary.update(classify_and_filter(cfg, info, cols, names, group))
    if (copies > 1).any():  # planted repeats: the family again on the natural (unrepeated) examples alone
        summary["natural"] = natural_family(cfg, cols, names)
        summary["by_copies"] = {str(c): {"examples": int((copies == c).sum()),
                                         **{n: int(cols[f"{n}.memorized"][copies == c].sum()) for n in names}}
                                for c in np.unique(copies)}
        # How close each stratum came: the leading suffix tokens greedy decoding reproduces, S when memorized.
        summary["reproduced_by_copies"] = {str(c): {n: float(cols[f"{n}.first_mismatch"][copies == c].mean())
                                                    for n in names} for c in np.unique(copies)}
    write_atomic(os.path.join(cfg.out, "per_example.jsonl"), per_example_lines(cols, names))
    summary["figures"] = measurement_figures(summary, cols, cfg.out) if cfg.figures else []
    summary["config"] = config_dict(cfg)
    write_atomic(os.path.join(cfg.out, "summary.json"), json.dumps(summary, indent=2) + "\n")
    write_measurement_report(summary, os.path.join(cfg.out, "report.md"))
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


def print_summary(summary, out):
    for n, m in summary["models"].items():
        print(f"{n:>16}: memorized {m['memorized']:,} of {summary['n_examples']:,} ({100 * m['memorization_rate']:.2f}%), "
              f"val ppl {fmt(m['val_ppl'])}, val accuracy {fmt(m['val_accuracy'])}")
    if "easy" in summary:
        print(f"easy {summary['easy']['count']:,}, teacher-specific {summary['teacher_specific']['count']:,}")
    c = summary["classifier"]
    print(f"classifier: AUC {c['auc_mean']:.4f} ± {c['auc_std']:.4f}" if c["auc_mean"] is not None else f"classifier: {c['status']}")
    print(f"wrote {out}/report.md, summary.json, per_example.jsonl")


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


def load_models(paths, info, data_dir, device, longest):
    """{name: Transformer in fp32, eval mode}, each checked to fit the dataset before its weights are read."""
    for name, path in paths.items():
        check_fits_data(path, info, data_dir, who=f"model {name!r}", accept_larger=True)
    models = {}
    for name, path in paths.items():
        model = load_model(path, device=device, dtype=torch.float32).eval()
        if model.args.vocab_size < info["vocab_size"]:
            raise UserError(f"model {name!r} has {model.args.vocab_size} vocabulary entries, fewer than "
                            f"{data_dir}'s {info['vocab_size']}; use a dataset made with its tokenizer")
        if model.args.max_seq_len < longest:
            raise UserError(f"model {name!r} handles {model.args.max_seq_len} tokens but this run needs "
                            f"{longest}; use shorter examples")
        models[name] = model
    if len({m.args.vocab_size for m in models.values()}) > 1:
        raise UserError("the models have different vocabulary sizes; compare models trained with one tokenizer")
    return models


def check_names(cfg, names):
    """Model names the settings refer to must exist (checked before any work is done)."""
    students = [n for n in names if role_of(n) == "student"]
    if cfg.classifier_student and cfg.classifier_student not in students:
        raise UserError(f"--classifier_student={cfg.classifier_student} is not one of the students {students}")


def check_full_precision(models):
    """Memorization flags must be exact: no model measured here may be quantized (quantize.py)."""
    quantized = [name for name, m in models.items() if is_quantized(m)]
    if quantized:
        raise UserError(f"model {quantized[0]!r} is quantized, and memorization is measured in full precision "
                        "(exact flags); pass it unquantized (--extract_quantize=int8 speeds up the attack alone)")


def check_config(cfg, info):
    if info.get("layout") != "examples":
        raise UserError(f"{cfg.data} has layout {info.get('layout')!r}; prepare it with --layout=examples")
    L = info["example_len"]
    if prompt_len(cfg.prefix_len) + cfg.suffix_len > L:
        raise UserError(f"BOS + prefix_len + suffix_len = {prompt_len(cfg.prefix_len) + cfg.suffix_len} exceeds the "
                        f"{L}-token examples of {cfg.data}; lower them or prepare examples of at least that length")


def main(argv):
    return run(parse_config(MemorizeConfig, argv, prog="memorize.py"))


if __name__ == "__main__":
    run_main(main)
