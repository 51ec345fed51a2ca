"""sample.py: the command-line sampler prints what model.generate produces, and refuses bad input."""

import pytest
import torch

import prepare
import quantize
import sample
from config import UserError
from checkpoint import save_model
from data import open_split
from model import ModelArgs, Transformer
from test_train import run, write_tokenizer
from tokenizer import Tokenizer, train_bpe

TEXT = "To be, or not to be, that is the question. Whether 'tis nobler in the mind to suffer. " * 20


@pytest.fixture
def ckpt(tmp_path):
    tok = train_bpe([TEXT], 550, str(tmp_path / "tokenizer.model"), progress=False)
    torch.manual_seed(0)
    m = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=tok.n_words,
                              multiple_of=16, max_seq_len=128))
    m.init_weights()
    save_model(m, str(tmp_path))
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


def test_quantize_int8_streams_the_int8_models_greedy_tokens(ckpt, capsys):
    path, _, tok = ckpt
    sample.main([f"--ckpt={path}", "--prompt=To be", "--temperature=0", "--max_new_tokens=12", "--quantize=int8"])
    out = capsys.readouterr().out
    q = quantize.from_pretrained(str(path), "int8")
    new = q.generate(torch.tensor([tok.encode("To be", bos=True)]), 12, stop_tokens={tok.eos_id})[0].tolist()
    if tok.eos_id in new:
        new = new[:new.index(tok.eos_id)]
    # The printer holds back a character whose bytes have not all arrived: the text ends at the
    # last token after which the decoded text is whole.
    whole = next(tok.decode(new[:j]) for j in range(len(new), -1, -1) if not tok.decode(new[:j]).endswith("\ufffd"))
    assert out == "To be" + whole + "\n"
    with pytest.raises(UserError, match="--quantize must be one of none, int8, fp8, not .int4."):
        sample.main([f"--ckpt={path}", "--quantize=int4"])


def test_a_model_trained_on_packed_documents_stops_at_their_end(tmp_path, capsys):
    """prepare.py ends each packed document with EOS, so a model learns to say when a text is over,
    and sample.py stops there, long before max_new_tokens."""
    for i, text in enumerate(["Cats nap.", "Dogs dig.", "Owls hoot.", "Bees hum."]):
        (tmp_path / f"doc{i}.txt").write_text(text)
    prepare.main([f"--input={tmp_path}", f"--out_dir={tmp_path}", "--name=data", "--val_fraction=0.25",
                  f"--tokenizer={write_tokenizer(tmp_path / 'bytes.model')}"])
    run(tmp_path / "data", tmp_path / "model", "--seq_len=8", "--batch_size=4", "--max_steps=300",
        "--warmup_steps=10", "--eval_interval=0")
    tok = Tokenizer(str(tmp_path / "data" / "tokenizer.model"))
    stream = open_split(str(tmp_path / "data"), "train").tolist()
    train_docs = tok.decode(stream).split("<|end_of_text|>")[:-1]  # each was <|begin_of_text|>text
    assert len(train_docs) == 3
    capsys.readouterr()
    for doc in (d.removeprefix("<|begin_of_text|>") for d in train_docs):
        sample.main([f"--ckpt={tmp_path / 'model'}", f"--prompt={doc[:4]}", "--temperature=0", "--max_new_tokens=100"])
        assert capsys.readouterr().out == doc + "\n"  # the document and nothing after it
