"""
Checkpoints in and out, and the training run folder.

- Three folder formats are read: this project's (config.json + model.safetensors), Meta's
  (params.json + consolidated.*.pth, model-parallel shards concatenated) and Hugging Face's
  (config.json + *.safetensors, sharded or not, q/k rows permuted back to Meta's rotary layout).
  Every reader yields tensors one at a time under this project's names; the model is built on the
  meta device (shapes, no memory) and each tensor assigned as it arrives, so loading holds one copy
  of the weights, not two.
- Two are written: this project's folder, and an export that transformers' LlamaForCausalLM loads.
- Which tokenizer a checkpoint was trained with, and whether it fits a dataset (one check for
  train.py's --init_from, distill.py's teacher and memorize.py's models).
- The training run folder: a checkpoint enters it only once complete, so a resume only ever reads a
  whole one; the train state (optimizer, RNG, step) and, under FSDP, the optimizer state one shard
  per rank.
- A file that cannot be read (missing, unreadable, damaged, truncated, not plain tensors) is a
  UserError naming it. Nothing is ever unpickled: safetensors for weights, torch.load(weights_only=True)
  for Meta's .pth files and the train state.
"""

import dataclasses
import glob
import json
import os
import pickle
import shutil
import warnings
import zipfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.distributed.tensor import DTensor

from config import UserError, atomic_path, file_sha256, remove_path, write_atomic
from model import ModelArgs, Transformer

WEIGHTS, CONFIG = "model.safetensors", "config.json"
REPLACE = "replace it with an intact copy (or train the checkpoint again)"


# ----------------------------------------------------------------------------------------------
# Reading any checkpoint folder


def load_model(path, device="cpu", dtype=torch.float32, build=None):
    """Load any checkpoint folder this project knows, holding one copy of the weights. build(args)
    makes the empty model the weights go into (quantize.py's builds an int8 one). A folder that
    cannot be read, for any reason, is a UserError naming it."""
    try:
        args, tensors = read_checkpoint(path)
        return load_weights((build or empty_model)(args), tensors, device, dtype, source=path)
    except (OSError, ValueError) as e:  # missing, unreadable, not a checkpoint, a shape that cannot be
        raise UserError(f"cannot load the checkpoint {path} ({first_line(e)}); pass a complete, readable "
                        "checkpoint folder") from None


def read_checkpoint(path):
    """(ModelArgs, iterable of (name, tensor) in this project's names) of any checkpoint folder this
    project knows: its own, Meta's or Hugging Face's. Tensors are read as the iterable is consumed."""
    return {"own": read_own, "meta": read_meta_folder, "hf": read_hf}[checkpoint_format(path)](path)


def checkpoint_format(path):
    """'own', 'meta' or 'hf', from the files in the folder path."""
    if os.path.isfile(os.path.join(path, CONFIG)):
        return "own" if "model_args" in read_json(os.path.join(path, CONFIG)) else "hf"
    if os.path.isfile(os.path.join(path, "params.json")):
        return "meta"
    raise FileNotFoundError(
        f"{path} is not a checkpoint folder: it needs config.json (this project's or Hugging Face's) "
        "or params.json with consolidated.*.pth (Meta's)")


def empty_model(args):
    """A Transformer on the meta device: every shape, no memory, for load_weights to fill."""
    with torch.device("meta"):
        return Transformer(args)


def load_weights(model, tensors, device, dtype, source="the checkpoint"):
    """Fill a model built on the meta device from (name, tensor) pairs in this project's names.

    Tensors are taken one at a time: each is moved to device, cast to dtype if floating, and
    assigned before the next is read (a layer quantized by quantize.py quantizes the float weight it
    receives). Weights that do not fit the model (missing, unexpected, or of another shape) are a
    UserError naming source and a few of them. Returns the model."""
    tied, unexpected = model.args.tie_word_embeddings, []
    for name, tensor in tensors:
        if tied and name == "output.weight":
            continue  # the output layer reads the embedding table: tied below
        module_name, _, attr = name.rpartition(".")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            unexpected.append(name)
            continue
        target = getattr(module, attr, None)
        if isinstance(target, torch.Tensor) and target.shape != tensor.shape:
            raise UserError(f"the weights in {source} do not fit its config ({name} has shape "
                            f"{tuple(tensor.shape)}, the model {tuple(target.shape)}); {REPLACE}")
        tensor = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else None)
        try:
            result = module.load_state_dict({attr: tensor}, strict=False, assign=True)
        except RuntimeError as e:  # a shape check of load_state_dict's own
            raise UserError(f"the weights in {source} do not fit its config ({name}: {first_line(e)}); "
                            f"{REPLACE}") from None
        unexpected += [name for _ in result.unexpected_keys]
        del tensor  # dropped before the next one is read (the readers drop theirs too)
    if tied:
        model.tie_weights()
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    # an int8 layer's scales come with its weight (quantize.py): name the weight alone
    missing = [n for n in missing if not (n.endswith(".scale") and n.removesuffix("scale") + "weight" in missing)]
    if missing or unexpected:
        raise UserError(f"the weights in {source} do not fit the model (missing: {few(missing) or 'none'}; "
                        f"unexpected: {few(unexpected) or 'none'}); {REPLACE}")
    model.init_rope()
    return model.to(device)


# ----------------------------------------------------------------------------------------------
# This project's folders and Meta's


def read_own(path):
    config = os.path.join(path, CONFIG)
    args = model_args_from_dict(read_json(config)["model_args"], config)
    return args, ((key, tensor) for _, key, tensor in _safetensors_entries([os.path.join(path, WEIGHTS)]))


def read_config(path):
    """The config.json of one of this project's checkpoint folders (model_args, the step, the
    tokenizer's sha256, the training settings), without reading weights."""
    return read_json(os.path.join(path, CONFIG))


def _safetensors_entries(files):
    """(file, name, tensor) from .safetensors files, one tensor at a time. The file is reopened for
    each: while it is open, every page read from its memory map counts in this process's memory.
    A missing file is refused before anything is read, a damaged or truncated one naming it."""
    for file in files:
        if not os.path.isfile(file):
            raise UserError(f"{file} is missing; copy the whole checkpoint folder")

    def read(file, key=None):  # the file's names, or one tensor
        try:
            with safe_open(file, framework="pt") as f:
                return list(f.keys()) if key is None else f.get_tensor(key)
        except SafetensorError as e:
            raise UserError(f"{file} is damaged or truncated ({first_line(e)}); {REPLACE}") from None

    def entries():
        for file in files:
            for key in read(file):
                tensor = read(file, key)
                yield file, key, tensor
                del tensor
    return entries()


def read_meta_folder(path):
    """Meta's folder: params.json and consolidated.00.pth ... one shard per model-parallel rank.
    Sharded tensors are concatenated by Meta's layout: column-parallel layers (wq, wk, wv, w1, w3,
    output) and the vocabulary-parallel embedding on dim 0, row-parallel ones (wo, w2) on dim 1;
    norms are replicated. Key/value heads replicated across more shards than heads are de-duplicated.
    The shards are memory-mapped: pages read stay counted in this process's memory until loading ends."""
    params = read_json(os.path.join(path, "params.json"))
    files = sorted(glob.glob(os.path.join(path, "consolidated.*.pth")))
    if not files:
        raise FileNotFoundError(f"{path} has params.json but no consolidated.*.pth weights")
    shards = [load_tensor_file(f) for f in files]  # memory-mapped: no copy in RAM
    for f, shard in zip(files, shards):
        if not isinstance(shard, dict) or set(shard) != set(shards[0]):
            raise UserError(f"{f} does not hold the same tensors as {files[0]}; {REPLACE}")
    state = {}
    for key in shards[0]:
        parts = [s[key] for s in shards]
        if len(parts) == 1 or key.endswith("norm.weight"):
            state[key] = parts[0]
        elif key.endswith(("wo.weight", "w2.weight")):
            state[key] = torch.cat(parts, dim=1)
        else:
            state[key] = torch.cat(parts, dim=0)
    if "rope.freqs" in state:
        del state["rope.freqs"]  # Llama 2 era buffer, recomputed here
    tied = "output.weight" not in state
    # Meta's params.json omits the 3.2 scaling factor; its 1B and 3B (the tied ones) use 32.
    params.setdefault("tie_word_embeddings", tied)
    if tied and params.get("use_scaled_rope"):
        params.setdefault("rope_scaling_factor", 32.0)
    if "tok_embeddings.weight" not in state:
        raise UserError(f"{files[0]} holds no tok_embeddings.weight, so it is not a Llama checkpoint; {REPLACE}")
    params["vocab_size"] = state["tok_embeddings.weight"].shape[0]
    args = model_args_from_dict(params, os.path.join(path, "params.json"))
    kv_rows = args.n_kv_heads * args.head_dim
    for key in [k for k in state if k.endswith(("wk.weight", "wv.weight"))]:
        w = state[key]
        if w.shape[0] > kv_rows:  # each shard held a copy of its key/value heads
            reps = w.shape[0] // kv_rows
            state[key] = w.view(args.n_kv_heads, reps, args.head_dim, -1)[:, 0].reshape(kv_rows, -1)
    return args, state.items()


# ----------------------------------------------------------------------------------------------
# Hugging Face's folders: other names, and q/k rows in the rotate-half layout


# Hugging Face's names for Meta's, per layer and at the top.
_HF_LAYER = {
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
    "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
}
_HF_TOP = {"model.embed_tokens": "tok_embeddings", "model.norm": "norm", "lm_head": "output"}


def hf_config_to_args(cfg):
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise ValueError("Llama checkpoints with attention or MLP biases are not supported")
    n_heads = cfg["num_attention_heads"]
    if cfg.get("head_dim") not in (None, cfg["hidden_size"] // n_heads):
        raise ValueError("head_dim must equal hidden_size / num_attention_heads")
    # Older configs keep rope_theta at the top and rope_scaling beside it; newer ones (transformers
    # 5) hold both in rope_parameters.
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise ValueError(f"rope type {rope_type!r} is not Llama 3's")
    args = dict(
        dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads", n_heads), vocab_size=cfg["vocab_size"],
        ffn_hidden_dim=cfg["intermediate_size"], norm_eps=cfg.get("rms_norm_eps", 1e-5),
        rope_theta=theta, max_seq_len=cfg.get("max_position_embeddings", 8192),
        tie_word_embeddings=cfg.get("tie_word_embeddings", False), use_scaled_rope=rope_type == "llama3",
    )
    if rope_type == "llama3":
        args.update(rope_scaling_factor=rope["factor"], rope_low_freq_factor=rope["low_freq_factor"],
                    rope_high_freq_factor=rope["high_freq_factor"],
                    rope_original_max_seq_len=rope["original_max_position_embeddings"])
    return ModelArgs(**args)


def read_hf(path):
    config = os.path.join(path, CONFIG)
    try:
        args = hf_config_to_args(read_json(config))
    except KeyError as e:
        raise UserError(f"{config} has no {e} entry, so it is neither this project's nor a Hugging Face "
                        f"Llama config; {REPLACE}") from None
    except (TypeError, ValueError) as e:
        raise UserError(f"{config} describes no model this project can build ({first_line(e)})") from None
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise UserError(f"{index} has no weight_map of tensor names to files; {REPLACE}")
        files = sorted({os.path.join(path, v) for v in weight_map.values()})
    else:
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"{path} has a Hugging Face config.json but no .safetensors weights")
    return args, _hf_tensors(_safetensors_entries(files), args)


def _hf_tensors(raw, args):
    """Hugging Face's (file, name, tensor) triples renamed to Meta's names, q/k rows un-permuted, one
    tensor at a time."""
    for file, key, w in raw:
        if key.startswith("model.layers."):
            i, _, rest = key.removeprefix("model.layers.").partition(".")
            module, _, param = rest.rpartition(".")
            if module not in _HF_LAYER:
                raise UserError(f"{file} holds {key!r}, which is no part of a Llama layer; this loader "
                                "reads Llama 3 checkpoints (LlamaForCausalLM) only")
            name = f"layers.{i}.{_HF_LAYER[module]}.{param}"
            if module == "self_attn.q_proj":
                w = from_rotate_half_layout(w, args.n_heads)
            elif module == "self_attn.k_proj":
                w = from_rotate_half_layout(w, args.n_kv_heads)
        else:
            module, _, param = key.rpartition(".")
            if module not in _HF_TOP:
                continue  # e.g. rotary inv_freq buffers saved by old versions
            name = f"{_HF_TOP[module]}.{param}"
        yield name, w
        del w


def to_rotate_half_layout(w, n_heads):
    """wq or wk rows in Meta's rotary layout (each head's channels rotate in adjacent pairs: 0-1, 2-3,
    ...) reordered for Hugging Face's (channel i rotates with i + head_dim / 2): per head, the even
    rows first, then the odd ones. The same permutation of q and k leaves every q.k unchanged."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def from_rotate_half_layout(w, n_heads):
    """The inverse of to_rotate_half_layout: Hugging Face's q/k rows back in Meta's order."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


# ----------------------------------------------------------------------------------------------
# Writing


def save_model(model, path, extra=None):
    """This project's folder: model.safetensors (tied output stored once) and config.json, holding
    ModelArgs under "model_args" and whatever `extra` adds (the step, the tokenizer's sha256...)."""
    os.makedirs(path, exist_ok=True)
    state = {k: v for k, v in model.state_dict().items()
             if not (model.args.tie_word_embeddings and k == "output.weight")}
    save_safetensors(state, os.path.join(path, WEIGHTS), metadata={"format": "pt"})
    write_json({"model_args": dataclasses.asdict(model.args), **(extra or {})},
                       os.path.join(path, CONFIG))


def export_hf(model, path, bos_token_id=None, eos_token_id=None):
    """A folder that transformers' LlamaForCausalLM.from_pretrained loads with the same logits."""
    a = model.args
    os.makedirs(path, exist_ok=True)
    cfg = dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=a.dim,
        num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads,
        head_dim=a.head_dim, intermediate_size=a.hidden_dim, vocab_size=a.vocab_size,
        rms_norm_eps=a.norm_eps, rope_theta=a.rope_theta, max_position_embeddings=a.max_seq_len,
        tie_word_embeddings=a.tie_word_embeddings, hidden_act="silu", attention_bias=False,
        mlp_bias=False, torch_dtype=str(model.tok_embeddings.weight.dtype).removeprefix("torch."),
        bos_token_id=bos_token_id, eos_token_id=eos_token_id,
        rope_scaling=None if not a.use_scaled_rope else dict(
            rope_type="llama3", factor=a.rope_scaling_factor, low_freq_factor=a.rope_low_freq_factor,
            high_freq_factor=a.rope_high_freq_factor,
            original_max_position_embeddings=a.rope_original_max_seq_len),
    )
    to_hf_layer = {v: k for k, v in _HF_LAYER.items()}
    to_hf_top = {v: k for k, v in _HF_TOP.items()}
    state = {}
    for name, w in model.state_dict().items():
        if name == "output.weight" and a.tie_word_embeddings:
            continue
        module, param = name.rsplit(".", 1)
        if module.startswith("layers."):
            _, i, sub = module.split(".", 2)
            if sub == "attention.wq":
                w = to_rotate_half_layout(w, a.n_heads)
            elif sub == "attention.wk":
                w = to_rotate_half_layout(w, a.n_kv_heads)
            key = f"model.layers.{i}.{to_hf_layer[sub]}.{param}"
        else:
            key = f"{to_hf_top[module]}.{param}"
        state[key] = w
    save_safetensors(state, os.path.join(path, WEIGHTS), metadata={"format": "pt"})
    write_json(cfg, os.path.join(path, CONFIG))


def save_safetensors(tensors, path, metadata=None):
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)


def write_json(obj, path):
    write_atomic(path, json.dumps(obj, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------
# Which tokenizer a checkpoint was trained with


def tokenizer_sha256(path):
    """The sha256 of the tokenizer a checkpoint folder was trained with, or None where it does not
    say: config.json's tokenizer_sha256 (this project's folders), else a tokenizer.model in the folder
    or in its original/ (where a Hugging Face download keeps Meta's file)."""
    if checkpoint_format(path) == "own" and read_config(path).get("tokenizer_sha256"):
        return read_config(path)["tokenizer_sha256"]
    for file in (os.path.join(path, "tokenizer.model"), os.path.join(path, "original", "tokenizer.model")):
        if os.path.isfile(file):
            return file_sha256(file)
    return None


def declared_vocab_size(path):
    """The vocabulary size a checkpoint folder's config states, or None, without reading weights."""
    fmt = checkpoint_format(path)
    config = read_json(os.path.join(path, "params.json" if fmt == "meta" else CONFIG))
    size = (config.get("model_args") or {}).get("vocab_size") if fmt == "own" else config.get("vocab_size")
    return size if isinstance(size, int) and size > 0 else None


def check_fits_data(path, info, data_dir, who="the checkpoint", accept_larger=False, larger_hint=""):
    """Refuse, before any weights are read, a checkpoint that was trained with another tokenizer than
    the dataset's (by sha256, where the folder says which it used), or whose vocabulary has another
    size. accept_larger lets a larger (padded) vocabulary pass; larger_hint names the setting that
    would, in the refusal. One check for train.py's --init_from, distill.py's teacher, memorize.py."""
    try:
        sha, vocab = tokenizer_sha256(path), declared_vocab_size(path)
    except FileNotFoundError as e:  # not a checkpoint folder
        raise UserError(f"{who} {path} is missing or incomplete ({first_line(e)}); pass a checkpoint folder "
                        "(a run folder of train.py or distill.py, Meta's or Hugging Face's)") from None
    if vocab is not None and vocab != info["vocab_size"] and not (accept_larger and vocab > info["vocab_size"]):
        hint = f", or pass {larger_hint}" if larger_hint and vocab > info["vocab_size"] else ""
        raise UserError(f"{who} {path} has a vocabulary of {vocab} tokens but {data_dir} has {info['vocab_size']}; "
                        f"use data prepared with its tokenizer (prepare.py --tokenizer=<its tokenizer.model>){hint}")
    if sha is not None and sha != info["tokenizer_sha256"]:
        raise UserError(f"{who} {path} was trained with another tokenizer than the data in {data_dir}; use data "
                        "prepared with its tokenizer (prepare.py --tokenizer=<its tokenizer.model>)")
    if sha is None:
        print(f"warning: {path} does not say which tokenizer it used; assuming {data_dir}'s")


# ----------------------------------------------------------------------------------------------
# The training run folder
#
# A checkpoint's files are written into .tmp-ckpt/, renamed to .ckpt-ready/ once complete (one
# atomic rename), then moved one by one into the run folder. A run killed while writing leaves
# .tmp-ckpt/, discarded at the next start; one killed while moving leaves .ckpt-ready/, whose
# remaining files the next start moves in. So a resume only ever reads a complete checkpoint.
#
# The weights are always gathered into one model.safetensors. The optimizer state (twice the
# weights in fp32) goes into train_state.pt from one process or DDP; under FSDP each rank writes
# only its shard, into optimizer/ (torch.distributed.checkpoint), and reads back only what it
# holds, so no rank ever holds the whole state. Either kind resumes on any number of processes.

OPTIMIZER_DIR = "optimizer"
RUN_FILES = (WEIGHTS, CONFIG, "tokenizer.model", "train_state.pt", OPTIMIZER_DIR)
TMP_DIR, READY_DIR = ".tmp-ckpt", ".ckpt-ready"


def check_run_dir(out_dir, resume, overwrite, plan, ctx):
    """Complete or discard an interrupted save, then check that a run may use out_dir: --resume needs
    a checkpoint there made with the same plan (the settings that fix the data order and the schedule,
    {key: value}); a new run needs an out_dir without a checkpoint, or --overwrite. Deletes nothing."""
    if ctx.is_main and os.path.isdir(out_dir):
        finish_interrupted_save(out_dir)
    ctx.barrier()
    if resume:
        if not os.path.isfile(os.path.join(out_dir, "train_state.pt")):
            raise UserError(f"there is no checkpoint to resume in {out_dir}; drop --resume to start a new run")
        saved = read_config(out_dir).get("train_config", {})
        for key, value in plan.items():
            if key in saved and saved[key] != value:
                raise UserError(f"--resume needs the saved run's --{key}={saved[key]}, not {value}")
    elif any(os.path.exists(os.path.join(out_dir, f)) for f in RUN_FILES) and not overwrite:
        raise UserError(f"{out_dir} already holds a checkpoint; pass --resume to continue it, "
                        "--overwrite to replace it, or another --out_dir")


def clear_run_dir(out_dir):
    """Delete a run folder's checkpoint and log, for a new run (--overwrite). Called only once every
    setting of the run has been checked: a refused run changes nothing already written."""
    for name in RUN_FILES + ("log.jsonl",):
        remove_path(os.path.join(out_dir, name))


def finish_interrupted_save(out_dir):
    shutil.rmtree(os.path.join(out_dir, TMP_DIR), ignore_errors=True)
    ready = os.path.join(out_dir, READY_DIR)
    if os.path.isdir(ready):
        for name in RUN_FILES:
            if os.path.exists(os.path.join(ready, name)):  # the ones already moved are gone
                if os.path.isdir(os.path.join(ready, name)):  # a folder cannot replace a full one
                    remove_path(os.path.join(out_dir, name))
                os.replace(os.path.join(ready, name), os.path.join(out_dir, name))
        shutil.rmtree(ready)


def save_checkpoint(model, optimizer, ctx, out_dir, step, epoch, config_extra, tokenizer_path):
    """Gather the full model (a collective under FSDP); rank 0 writes it, config.json (ModelArgs,
    step, epoch and config_extra), the tokenizer and train_state.pt; the optimizer state goes into
    train_state.pt, or under FSDP every rank writes its shard of it."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    tmp = os.path.join(out_dir, TMP_DIR)
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    if ctx.parallel == "fsdp":
        ctx.barrier()  # .tmp-ckpt is clean before any rank writes into it
        optim_state = {"param_groups": save_sharded_optimizer(model, optimizer, os.path.join(tmp, OPTIMIZER_DIR))}
    else:
        optim_state = {"optimizer": get_optimizer_state_dict(model, optimizer, options=options)}
    if ctx.is_main:
        full = empty_model(model.args)  # an unsharded model around the gathered tensors, to save them
        full.load_state_dict(weights, assign=True)
        save_model(full, tmp, extra={"step": step, "epoch": epoch, **config_extra})
        shutil.copyfile(tokenizer_path, os.path.join(tmp, "tokenizer.model"))
        rng = {"torch": torch.get_rng_state()}
        if ctx.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(ctx.device)
        torch.save({**optim_state, "step": step, "epoch": epoch, "rng": rng}, os.path.join(tmp, "train_state.pt"))
        os.replace(tmp, os.path.join(out_dir, READY_DIR))
        finish_interrupted_save(out_dir)
        if "optimizer" in optim_state:  # an earlier FSDP checkpoint's shards are stale now
            remove_path(os.path.join(out_dir, OPTIMIZER_DIR))
    ctx.barrier()


def restore_train_state(model, optimizer, ctx, out_dir):
    """Load the optimizer state and RNG of the checkpoint in out_dir. Returns its step and the
    bytes of optimizer tensors this process read (the most any rank read, under torchrun)."""
    path = os.path.join(out_dir, "train_state.pt")
    state = load_tensor_file(path)
    if not isinstance(state, dict) or not {"step", "rng"} <= set(state) or not {"optimizer", "param_groups"} & set(state):
        raise UserError(f"{path} is not a training state written by train.py; pass --overwrite to start afresh")
    if state["step"] != read_config(out_dir).get("step"):
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


# ----------------------------------------------------------------------------------------------
# Small helpers


def first_line(error, limit=160):
    """An exception's message cut to one short line (torch's and safetensors' run to paragraphs)."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def read_json(path):
    """A JSON object from a checkpoint's config.json, params.json or index; UserError if damaged."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({first_line(e)}); {REPLACE}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} holds a JSON {type(obj).__name__}, not an object of settings; {REPLACE}")
    return obj


def load_tensor_file(path):
    """A file of tensors saved by torch.save (Meta's consolidated.*.pth, train.py's train_state.pt),
    read with weights_only: a restricted unpickler that only rebuilds tensors and plain containers,
    so a file that would run code is refused rather than run. Zip-format files are memory-mapped."""
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing a file
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError:
        raise UserError(f"{path} is not a plain tensor file (it is damaged, or holds Python objects that only an "
                        f"unpickler that can run code would load, which this project never does); {REPLACE}") from None
    except (RuntimeError, EOFError, OSError) as e:  # a damaged or truncated archive
        raise UserError(f"{path} is damaged or truncated ({first_line(e)}); {REPLACE}") from None


def model_args_from_dict(d, source="the settings"):
    """ModelArgs from a dict, ignoring keys this file does not know (newer params.json fields)."""
    known = {f.name for f in dataclasses.fields(ModelArgs)}
    try:
        return ModelArgs(**{k: v for k, v in d.items() if k in known})
    except TypeError:
        raise UserError(f"{source} gives a model setting of the wrong type (a shape that is not a number?); "
                        f"{REPLACE}") from None
    except ValueError as e:  # numbers that do not fit together
        raise UserError(f"{source} describes no valid model ({first_line(e)}); {REPLACE}") from None


def few(names, n=3):
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")
