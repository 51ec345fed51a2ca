"""
Sample from a model on the command line, printing the text as it is generated.

- Any checkpoint `Transformer.from_pretrained` accepts: this project's, Meta's or Hugging Face's.
- `--prompt` or `--prompt_file`; `--chat` wraps the prompt in Llama 3's chat format and stops at
  `<|eot_id|>`; generation always stops at the end-of-text tokens.
- Greedy at `--temperature=0`, else sampling with optional `--top_k` / `--top_p`, seeded by `--seed`.
- `--quantize=int8` loads row-wise int8 weights (quantize.py), quantized tensor by tensor: a quarter
  of fp32's memory, and faster decoding where weights dominate (1.9x on the Llama 3.2 1B shape).

    python sample.py --ckpt=out/small --prompt="ROMEO:" --max_new_tokens=200
"""

import os
import sys
from dataclasses import dataclass
from typing import Optional

import torch

import quantize
from config import UserError, parse_config, run_main, setting
from model import Transformer
from tokenizer import Tokenizer
from train import pick_device


@dataclass
class SampleConfig:
    ckpt: str = "out/small"  # a checkpoint folder
    tokenizer: str = ""  # tokenizer.model; default: the one in (or under original/ of) the checkpoint
    prompt: str = "\n"
    prompt_file: str = ""  # read the prompt from this file instead
    chat: bool = False  # wrap the prompt as a user message in the chat format
    num_samples: int = 1
    max_new_tokens: int = 200
    temperature: float = 0.8  # 0 = greedy
    top_k: Optional[int] = 200
    top_p: Optional[float] = None
    seed: int = 1337
    device: str = "auto"
    dtype: str = "fp32"  # fp32 or bf16 weights
    quantize: str = setting("none", "none, or int8: row-wise int8 weights, quantized while loading (quantize.py)")


def find_tokenizer(cfg):
    candidates = [cfg.tokenizer] if cfg.tokenizer else [
        os.path.join(cfg.ckpt, "tokenizer.model"), os.path.join(cfg.ckpt, "original", "tokenizer.model")]
    for path in candidates:
        if os.path.isfile(path):
            return Tokenizer(path)
    raise UserError(f"no tokenizer.model found for {cfg.ckpt}; pass --tokenizer=path/to/tokenizer.model")


class Printer:
    """Prints one row's new text as tokens arrive. Decoding the whole row each time and printing
    what is new keeps multi-byte characters split over tokens intact."""

    def __init__(self, tokenizer, stop_tokens):
        self.tok, self.stop_tokens, self.ids, self.shown, self.done = tokenizer, stop_tokens, [], "", False

    def __call__(self, token):
        t = int(token[0])
        if self.done or t in self.stop_tokens:
            self.done = True
            return
        self.ids.append(t)
        text = self.tok.decode(self.ids)
        if not text.endswith("\ufffd"):  # wait for the rest of a split character
            sys.stdout.write(text[len(self.shown):])
            sys.stdout.flush()
            self.shown = text


def main(argv):
    cfg = parse_config(SampleConfig, argv)
    if not os.path.isdir(cfg.ckpt):
        raise UserError(f"checkpoint folder {cfg.ckpt!r} does not exist; pass --ckpt=path/to/checkpoint")
    tok = find_tokenizer(cfg)
    device = pick_device(cfg.device, 0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[cfg.dtype]
    if cfg.quantize not in quantize.KINDS:
        raise UserError(f"--quantize is one of {', '.join(quantize.KINDS)}, not {cfg.quantize!r}")
    try:
        if cfg.quantize == "none":
            model = Transformer.from_pretrained(cfg.ckpt, device=device, dtype=dtype).eval()
        else:  # one tensor at a time: memory never holds the whole model in floating point
            model = quantize.from_pretrained(cfg.ckpt, cfg.quantize, device=device, dtype=dtype).eval()
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"{e}") from None
    if model.args.vocab_size < tok.n_words:
        raise UserError(f"the tokenizer has {tok.n_words} tokens but the model only {model.args.vocab_size}; "
                        "pass the tokenizer the model was trained with via --tokenizer")
    text = open(cfg.prompt_file).read() if cfg.prompt_file else cfg.prompt
    if cfg.chat:
        ids, stop = tok.encode_dialog_prompt([{"role": "user", "content": text}]), tok.stop_tokens
    else:
        ids, stop = tok.encode(text, bos=True), {tok.eos_id}
    max_new = min(cfg.max_new_tokens, model.args.max_seq_len - len(ids))
    if max_new <= 0:
        raise UserError(f"the prompt has {len(ids)} tokens, no room left in max_seq_len "
                        f"{model.args.max_seq_len}; shorten it")
    prompt = torch.tensor([ids], device=device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    for i in range(cfg.num_samples):
        if not cfg.chat:
            sys.stdout.write(text)
        model.generate(prompt, max_new, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                       stop_tokens=stop, generator=generator, on_token=Printer(tok, stop))
        sys.stdout.write("\n" + ("-" * 40 + "\n" if i + 1 < cfg.num_samples else ""))


if __name__ == "__main__":
    run_main(main)
