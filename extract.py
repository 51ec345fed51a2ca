"""
The extraction attack of Carlini et al. (2021): can someone who can only sample from a model find its
training data? memorize.py asks whether a model completes an example from its own prefix; here the
attacker knows no prefix.

- Draw samples from <|begin_of_text|> with top-k sampling (Carlini et al.: k = 40).
- Rank them three ways, lower = more suspicious: the target's perplexity, its log-perplexity over
  the text's zlib entropy, and its log-perplexity over a reference model's (here a baseline, which
  saw the same data but is a different model).
- Look each sample up in the training split: it is extracted when it holds `--window` consecutive
  tokens of one training example (an index of hashed n-grams, `data.NgramIndex`). The report gives the
  precision among the top k of each ranking.
- Under torchrun every rank draws a share of the samples, each batch from its own seeded stream, so
  any number of processes draws what one does. `--quantize=int8` samples from an int8 copy of the
  target (quantize.py) for speed; every score stays fp32.

    python extract.py --data=data/shakespeare_mem --models=teacher:out/teacher,baseline:out/baseline --samples=256
"""

import json
import os
from dataclasses import dataclass

import numpy as np
import torch

from checkpoint import check_fits_data, load_model
from config import (UserError, at_least, check_output_folder, config_dict, one_of, parse_config, positive,
                    progress_bar, run_main, seed_range, setting, write_atomic)
from data import NgramIndex, open_split, read_info
from distributed import DEVICES, batch_generator, batch_share, gather_columns, processes
from memorize import family_roles, parse_models, token_logprobs, zlib_entropy
from quantize import KINDS, quantized_copy
from report import write_extraction_report
from tokenizer import Tokenizer


@dataclass
class ExtractConfig:
    data: str = setting("", "dataset folder (layout examples) whose training split the samples are looked up in")
    models: str = setting("", "comma-separated name:path, as memorize.py takes them (names give roles)")
    out: str = setting("out/extract", "report folder")
    target: str = setting("", "the attacked model (default: teacher, else the first)")
    reference: str = setting("", "model for the reference-ratio score (default: the first baseline; 'none' to skip)")
    samples: int = setting(256, "samples drawn from <|begin_of_text|>", positive)
    length: int = setting(0, "tokens per sample (0: the examples' length without BOS)", at_least(0))
    top_k: int = setting(40, "top-k sampling (Carlini et al.: 40)", positive)
    window: int = setting(50, "a sample is extracted when it holds this many consecutive tokens of a training "
                              "example (memorize.py's suffix length S)", positive)
    quantize: str = setting("none", "int8: sample from an int8 copy of the target, for speed; every score stays fp32",
                            one_of(*KINDS))
    batch_size: int = setting(32, "samples per batch", positive)
    device: str = setting("auto", "auto: cuda > mps > cpu", one_of(*DEVICES))
    seed: int = setting(1337, "seeds the sampling", seed_range)


# The attack's random stream is offset from --seed, so that with one seed for both scripts its samples
# are not the ones memorize.py's --sample_tries draws.
SEED_OFFSET = 7919


# ----------------------------------------------------------------------------------------------
# Sampling, scoring, looking up


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
# The attack


def run(cfg):
    """Sample, score, look up, write the report folder cfg.out. Returns the summary on rank 0."""
    if not cfg.data:
        raise UserError("pass --data=data/<name>, the dataset folder the target was trained on")
    info = read_info(cfg.data)
    if info["layout"] != "examples":
        raise UserError(f"{cfg.data} has layout {info['layout']!r}; prepare it with --layout=examples")
    check_output_folder(cfg.out, "out")
    paths = parse_models(cfg.models)
    teacher, baselines, _ = family_roles(list(paths))
    target = cfg.target or teacher or next(iter(paths))
    # Carlini et al. compare with a smaller model trained on similar data; here, a baseline.
    reference = cfg.reference or next((b for b in baselines if b != target), "none")
    for key, name in (("target", target), ("reference", reference)):
        if name != "none" and name not in paths:
            raise UserError(f"--{key}={name} is not one of the models {list(paths)}; name one of them")
    length = cfg.length or info["example_len"] - 1
    chosen = {n: paths[n] for n in (target, reference) if n != "none"}
    for name, path in chosen.items():
        check_fits_data(path, info, cfg.data, who=f"model {name!r}", accept_larger=True)
    with processes(device=cfg.device, dtype="fp32") as ctx:
        models = {n: load_model(p, device=ctx.device).eval() for n, p in chosen.items()}
        for name, model in models.items():
            if model.args.max_seq_len < length + 1:
                raise UserError(f"model {name!r} handles {model.args.max_seq_len} tokens but samples of {length} "
                                "need one more; lower --length")
        sampler = quantized_copy(models[target], cfg.quantize) if cfg.quantize != "none" else None
        tokenizer = Tokenizer(os.path.join(cfg.data, "tokenizer.model"))
        ex = extraction_samples(models[target], models.get(reference), cfg.samples, length, info["bos_id"], cfg.top_k,
                                cfg.batch_size, tokenizer, cfg.seed + SEED_OFFSET, ctx.rank, ctx.world_size,
                                sampler=sampler)
        ex = gather_columns(ex, ctx.world_size)
        if not ctx.is_main:
            return None
    hits = NgramIndex(open_split(cfg.data, "train"), cfg.window).contains(ex["tokens"])
    summary = {"data": cfg.data, "samples": len(hits), "target": target,
               "reference": None if reference == "none" else reference, "length": length, "window": cfg.window,
               "hits": int(hits.sum()), "precision": extraction_report(ex, hits), "config": config_dict(cfg)}
    os.makedirs(cfg.out, exist_ok=True)
    write_atomic(os.path.join(cfg.out, "samples.jsonl"), (
        json.dumps({"log_ppl": float(ex["log_ppl"][i]), "zlib_entropy": float(ex["zlib_entropy"][i]),
                    "reference_log_ppl": float(ex["reference_log_ppl"][i]) if "reference_log_ppl" in ex else None,
                    "contains_training_window": bool(hits[i]), "text": tokenizer.decode(ex["tokens"][i])}) + "\n"
        for i in range(len(hits))))
    write_atomic(os.path.join(cfg.out, "summary.json"), json.dumps(summary, indent=2) + "\n")
    write_extraction_report(summary, os.path.join(cfg.out, "report.md"))
    print(f"{summary['hits']} of {summary['samples']} samples from {target} hold a training window of "
          f"{cfg.window} tokens; wrote {cfg.out}/report.md, summary.json, samples.jsonl")
    return summary


def main(argv):
    return run(parse_config(ExtractConfig, argv, prog="extract.py"))


if __name__ == "__main__":
    run_main(main)
