"""sample.py: the command-line sampler prints what model.generate produces, and refuses bad input."""

import pytest
import torch

import sample
from config import UserError
from model import ModelArgs, Transformer
from tokenizer import train_bpe

TEXT = "To be, or not to be, that is the question. Whether 'tis nobler in the mind to suffer. " * 20


@pytest.fixture
def ckpt(tmp_path):
    tok = train_bpe([TEXT], 550, str(tmp_path / "tokenizer.model"), progress=False)
    torch.manual_seed(0)
    m = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=tok.n_words,
                              multiple_of=16, max_seq_len=128))
    m.init_weights()
    m.save_pretrained(str(tmp_path))
    return tmp_path, m, tok


def test_greedy_output_is_the_prompt_and_the_models_continuation(ckpt, capsys):
    path, m, tok = ckpt
    sample.main([f"--ckpt={path}", "--prompt=To be", "--temperature=0", "--max_new_tokens=12"])
    out = capsys.readouterr().out
    new = m.generate(torch.tensor([tok.encode("To be", bos=True)]), 12, stop_tokens={tok.eos_id})[0].tolist()
    if tok.eos_id in new:
        new = new[:new.index(tok.eos_id)]
    assert out == "To be" + tok.decode(new) + "\n"


def test_chat_prompt_and_seeded_sampling_are_reproducible(ckpt, capsys):
    path, _, _ = ckpt
    args = [f"--ckpt={path}", "--prompt=hi", "--chat", "--temperature=1.0", "--seed=5",
            "--max_new_tokens=10", "--num_samples=2"]
    sample.main(args)
    first = capsys.readouterr().out
    sample.main(args)
    assert capsys.readouterr().out == first and first.count("-" * 40) == 1


def test_missing_checkpoint_and_too_long_prompt_are_clear_errors(ckpt, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        sample.main([f"--ckpt={tmp_path}/nope"])
    path, _, _ = ckpt
    with pytest.raises(UserError, match="shorten it"):
        sample.main([f"--ckpt={path}", "--prompt=" + "word " * 400])
