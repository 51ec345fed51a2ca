"""Bad input, across every script: each gets exit code 2 and one line on stderr that names the
setting or the file, never a traceback, and no file that existed before is changed.

The matrix runs in-process through the scripts' own entry point (`config.run_main(module.main)`),
which is what `python script.py` runs; a representative case per script also runs as a real
command, and so does `--help` into a reader that went away."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import bench
import distill
import extract
import memorize
import prepare
import report
import sample
import train
from config import run_main
from checkpoint import export_hf, load_model
from test_train import TINY, examples_dataset, run, write_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {"prepare": prepare, "train": train, "distill": distill, "memorize": memorize, "extract": extract,
           "sample": sample, "report": report, "bench": bench}


class Evil:
    """Unpickling this would run a shell command: a file holding it must be refused, never loaded."""

    def __reduce__(self):
        return os.system, ("echo unpickled",)


def damaged_copy(src, dst, name, content):
    shutil.copytree(src, dst)
    with open(os.path.join(dst, name), "wb") as f:
        f.write(content)
    return str(dst)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """Datasets, a checkpoint, and damaged copies of each kind of file the scripts read."""
    root = tmp_path_factory.mktemp("bad_input")
    p = {"root": str(root), "ex": examples_dataset(root / "ex", n_train=16)}
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"doc{i}.txt").write_text(f"Document {i} says this, and then some more. " * 4)
    tok = write_tokenizer(root / "bytes.model")
    for name, fraction in (("packed", "0.34"), ("noval", "0")):
        prepare.main([f"--input={corpus}", f"--out_dir={root}", f"--name={name}", f"--tokenizer={tok}",
                      f"--val_fraction={fraction}"])
        p[name] = str(root / name)
    p["ckpt"] = str(root / "ckpt")
    run(p["ex"], p["ckpt"], "--batch_size=4", "--max_steps=2")

    weights = open(os.path.join(p["ckpt"], "model.safetensors"), "rb").read()
    p["trunc_weights"] = damaged_copy(p["ckpt"], root / "trunc_weights", "model.safetensors", weights[:len(weights) // 2])
    p["bad_config"] = damaged_copy(p["ckpt"], root / "bad_config", "config.json", b'{"model_args": {"dim": 32,')
    p["bad_state"] = damaged_copy(p["ckpt"], root / "bad_state", "train_state.pt", b"not a tensor file")
    p["evil_state"] = str(root / "evil_state")
    shutil.copytree(p["ckpt"], p["evil_state"])
    torch.save({"optimizer": Evil(), "step": 2, "rng": {}}, os.path.join(p["evil_state"], "train_state.pt"))

    model = load_model(p["ckpt"])
    p["meta_evil"] = str(root / "meta_evil")  # Meta's layout: params.json + consolidated.00.pth
    os.makedirs(p["meta_evil"])
    a = model.args
    with open(os.path.join(p["meta_evil"], "params.json"), "w") as f:
        json.dump({"dim": a.dim, "n_layers": a.n_layers, "n_heads": a.n_heads, "n_kv_heads": a.n_kv_heads}, f)
    torch.save({"tok_embeddings.weight": Evil()}, os.path.join(p["meta_evil"], "consolidated.00.pth"))
    shutil.copy(os.path.join(p["ckpt"], "tokenizer.model"), p["meta_evil"])
    p["meta_bad_params"] = damaged_copy(p["meta_evil"], root / "meta_bad_params", "params.json", b"dim = 32")
    p["hf_unknown"] = str(root / "hf_unknown")  # a Hugging Face folder with a tensor Llama has not
    export_hf(model, p["hf_unknown"])
    shutil.copy(os.path.join(p["ckpt"], "tokenizer.model"), p["hf_unknown"])
    hf_weights = os.path.join(p["hf_unknown"], "model.safetensors")
    save_file({**load_file(hf_weights), "model.layers.0.mlp.lora_A.weight": torch.zeros(2, 2)}, hf_weights)
    p["hf_missing_shard"] = str(root / "hf_missing_shard")  # an index naming a shard the folder lacks
    export_hf(model, p["hf_missing_shard"])
    shutil.copy(os.path.join(p["ckpt"], "tokenizer.model"), p["hf_missing_shard"])
    shard = os.path.join(p["hf_missing_shard"], "model.safetensors")
    names = list(load_file(shard))
    os.rename(shard, os.path.join(p["hf_missing_shard"], "model-00001-of-00002.safetensors"))
    with open(os.path.join(p["hf_missing_shard"], "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {n: f"model-0000{1 + (n == names[-1])}-of-00002.safetensors" for n in names}}, f)
    own = load_file(os.path.join(p["ckpt"], "model.safetensors"))
    p["keys_off"] = damaged_copy(p["ckpt"], root / "keys_off", "model.safetensors", b"")  # keys the model lacks
    save_file({**{k: v for k, v in own.items() if k != "layers.0.attention.wq.weight"}, "extra.weight": torch.zeros(2)},
              os.path.join(p["keys_off"], "model.safetensors"))
    p["shape_off"] = damaged_copy(p["ckpt"], root / "shape_off", "model.safetensors", b"")  # a tensor of another shape
    save_file({**own, "norm.weight": torch.ones(3)}, os.path.join(p["shape_off"], "model.safetensors"))

    p["bad_meta"] = damaged_copy(p["ex"], root / "bad_meta", "meta.json", b'{"layout": "examples"')
    os.makedirs(root / "bad_summary" / "memorization")
    (root / "bad_summary" / "memorization" / "summary.json").write_text('{"models": {')
    p["bad_summary"] = str(root / "bad_summary")
    (root / "bad.toml").write_text("lr = = 1\n")
    p["bad_toml"] = str(root / "bad.toml")
    p["a_file"] = os.path.join(p["ex"], "meta.json")
    p["out"] = str(root / "out")  # never created by a refused run
    return p


def tree_hashes(root):
    """{relative path: sha256} of every file under root."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


TRAIN = ["--data={ex}", "--out_dir={out}", "--model=tiny", "--dim=32", "--n_layers=1", "--n_heads=2",
         "--n_kv_heads=1", "--batch_size=4", "--max_steps=4", "--warmup_steps=1", "--device=cpu"]
DISTILL = TRAIN + ["--teacher={ckpt}"]
MEMORIZE = ["--data={ex}", "--models=teacher:{ckpt}", "--out={out}", "--prefix_len=8", "--suffix_len=8"]
EXTRACT = ["--data={ex}", "--models=teacher:{ckpt}", "--out={out}", "--window=8", "--samples=4"]
SAMPLE = ["--ckpt={ckpt}", "--max_new_tokens=4", "--device=cpu"]
RESUME = TINY + ["--data={ex}", "--batch_size=4", "--max_steps=2", "--resume"]  # the fixture checkpoint's run

# (id, script, arguments, what the one line must name)
CASES = [
    # settings outside their domain, refused before any work
    ("train-negative-batch", "train", TRAIN + ["--batch_size=-4"], "--batch_size must be at least 1, not -4"),
    ("train-zero-lr", "train", TRAIN + ["--lr=0"], "--lr must be above 0"),
    ("train-nan-lr", "train", TRAIN + ["--lr=nan"], "--lr takes a finite number"),
    ("train-beta2-one", "train", TRAIN + ["--beta2=1"], "--beta2 must be at least 0 and below 1"),
    ("train-negative-seed", "train", TRAIN + ["--seed=-1"], "--seed must be at least 0"),
    ("train-unknown-device", "train", TRAIN + ["--device=tpu"], "--device must be one of auto, cpu, cuda, mps"),
    ("train-unknown-model", "train", TRAIN + ["--model=huge"], "--model must be one of"),
    ("train-warmup-beyond-run", "train", TRAIN + ["--warmup_steps=50"], "--warmup_steps=50 goes beyond the end"),
    ("train-min-lr-above-lr", "train", TRAIN + ["--min_lr=0.5"], "--min_lr=0.5 is above --lr"),
    ("train-micro-batch", "train", TRAIN + ["--micro_batch_size=3"], "--micro_batch_size=3"),
    ("train-no-validation-split", "train", TRAIN + ["--data={noval}", "--seq_len=8"],
     "no validation data (--val_fraction=0)"),
    ("train-bad-preset", "train", TRAIN + ["--config={bad_toml}"], "bad.toml' is not valid TOML"),
    ("train-out-dir-is-a-file", "train", TRAIN + ["--out_dir={a_file}"], "--out_dir="),
    ("distill-zero-temperature", "distill", DISTILL + ["--temperature=0"], "--temperature must be above 0"),
    ("distill-unknown-kind", "distill", DISTILL + ["--kind=medium"], "--kind must be one of soft, hard"),
    ("distill-alpha-above-one", "distill", DISTILL + ["--alpha=1.5"], "--alpha must be at least 0 and at most 1"),
    ("distill-prefix-too-long", "distill", DISTILL + ["--kind=hard", "--prefix_len=40"], "--prefix_len=40"),
    ("prepare-val-fraction-one", "prepare", ["--val_fraction=1"], "--val_fraction must be at least 0 and below 1"),
    ("prepare-small-vocab", "prepare", ["--vocab_size=100"], "--vocab_size must be at least 512"),
    ("prepare-example-len-one", "prepare", ["--example_len=1"], "--example_len must be at least 2"),
    ("prepare-zero-max-tokens", "prepare", ["--max_tokens=0"], "--max_tokens must be at least 1"),
    ("prepare-unknown-layout", "prepare", ["--layout=rows"], "--layout must be one of packed, examples"),
    ("memorize-zero-suffix", "memorize", MEMORIZE + ["--suffix_len=0"], "--suffix_len must be at least 1"),
    ("extract-unknown-quantize", "extract", EXTRACT + ["--quantize=int4"], "--quantize must be one of none, int8, fp8, not 'int4'"),
    ("extract-zero-window", "extract", EXTRACT + ["--window=0"], "--window must be at least 1"),
    ("extract-unknown-reference", "extract", EXTRACT + ["--reference=baseline"], "--reference=baseline is not one of"),
    ("memorize-test-fraction-one", "memorize", MEMORIZE + ["--classifier_test_fraction=1"],
     "--classifier_test_fraction must be above 0 and below 1"),
    ("memorize-prefix-and-suffix-too-long", "memorize", MEMORIZE + ["--suffix_len=12"], "prefix_len + suffix_len"),
    ("sample-fp16", "sample", SAMPLE + ["--dtype=fp16"], "--dtype must be one of fp32, bf16, not 'fp16'"),
    ("sample-zero-top-p", "sample", SAMPLE + ["--top_p=0"], "--top_p must be above 0 and at most 1"),
    ("sample-negative-temperature", "sample", SAMPLE + ["--temperature=-1"], "--temperature must be at least 0"),
    ("sample-unknown-quantize", "sample", SAMPLE + ["--quantize=int4"], "--quantize must be one of none, int8, fp8, not 'int4'"),
    ("sample-missing-prompt-file", "sample", SAMPLE + ["--prompt_file={out}/prompt.txt"], "out/prompt.txt"),
    ("report-negative-start", "report", ["--out={out}", "--started_at=-1"], "--started_at must be at least 0"),
    ("bench-zero-repeats", "bench", ["--repeats=0"], "--repeats must be at least 1"),
    ("bench-one-example", "bench", ["--mem_examples=1"], "--mem_examples must be at least 2"),
    ("bench-zero-quality-tokens", "bench", ["--quality_tokens=0"], "--quality_tokens must be at least 1"),
    ("bench-quality-missing-ckpt", "bench", ["--sections=quality", "--ckpt={out}", "--data={ex}"],
     "checkpoint folder"),
    # files that are damaged, foreign or unsafe
    ("sample-truncated-weights", "sample", ["--ckpt={trunc_weights}"], "trunc_weights/model.safetensors is damaged"),
    ("sample-config-not-json", "sample", ["--ckpt={bad_config}"], "bad_config/config.json is not valid JSON"),
    ("sample-params-not-json", "sample", ["--ckpt={meta_bad_params}"], "meta_bad_params/params.json is not valid"),
    ("sample-pickled-meta-weights", "sample", ["--ckpt={meta_evil}"], "consolidated.00.pth is not a plain tensor"),
    ("sample-unknown-hf-key", "sample", ["--ckpt={hf_unknown}"], "'model.layers.0.mlp.lora_A.weight'"),
    ("sample-missing-hf-shard", "sample", ["--ckpt={hf_missing_shard}"], "model-00002-of-00002.safetensors is missing"),
    ("sample-keys-off", "sample", ["--ckpt={keys_off}"],
     "keys_off do not fit the model (missing: layers.0.attention.wq.weight; unexpected: extra.weight)"),
    ("sample-shape-off", "sample", ["--ckpt={shape_off}"], "shape_off do not fit its config (norm.weight has shape (3,)"),
    ("sample-int8-truncated-weights", "sample", ["--ckpt={trunc_weights}", "--quantize=int8"],
     "trunc_weights/model.safetensors is damaged"),
    ("sample-int8-keys-off", "sample", ["--ckpt={keys_off}", "--quantize=int8"], "missing: layers.0.attention.wq.weight"),
    ("train-resume-damaged-state", "train", RESUME + ["--out_dir={bad_state}"], "bad_state/train_state.pt is not"),
    ("train-resume-pickled-state", "train", RESUME + ["--out_dir={evil_state}"], "evil_state/train_state.pt is not"),
    ("train-init-from-damaged", "train", TRAIN + ["--init_from={trunc_weights}"], "model.safetensors is damaged"),
    ("train-meta-not-json", "train", TRAIN + ["--data={bad_meta}"], "bad_meta/meta.json is not valid JSON"),
    ("distill-damaged-teacher", "distill", TRAIN + ["--teacher={bad_config}"], "bad_config/config.json"),
    ("memorize-damaged-model", "memorize", MEMORIZE[:1] + MEMORIZE[2:] + ["--models=t:{trunc_weights}"],
     "model.safetensors is damaged"),
    ("memorize-meta-not-json", "memorize", ["--data={bad_meta}", "--models={ckpt}"], "bad_meta/meta.json"),
    ("extract-damaged-model", "extract", EXTRACT[:1] + EXTRACT[2:] + ["--models=t:{trunc_weights}"],
     "model.safetensors is damaged"),
    ("report-summary-not-json", "report", ["--out={bad_summary}"], "memorization/summary.json is not valid JSON"),
]
# One case per script also runs as a real command: `python script.py ...`.
COMMAND_LINE = ["prepare-val-fraction-one", "train-negative-batch", "distill-zero-temperature", "memorize-zero-suffix",
                "extract-unknown-quantize",
                "sample-pickled-meta-weights", "report-negative-start", "bench-zero-repeats"]


def check_one_line(code, out, err, expected, paths):
    assert code == 2, err
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and "unpickled" not in out + err  # nothing was unpickled and run
    assert expected.format(**paths) in lines[0]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_one_line_and_exit_code_2(case, paths, capfd, monkeypatch):
    _, script, args, expected = case
    monkeypatch.chdir(paths["root"])  # prepare's and bench's defaults stay inside the fixture folder
    before = tree_hashes(paths["root"])
    capfd.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_main(SCRIPTS[script].main, [a.format(**paths) for a in args])
    check_one_line(exit_info.value.code, *capfd.readouterr(), expected, paths)
    assert tree_hashes(paths["root"]) == before


def test_bad_input_on_the_command_line_gets_one_line_and_exit_code_2(paths):
    cases = [c for c in CASES if c[0] in COMMAND_LINE]
    before = tree_hashes(paths["root"])
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, f"{script}.py"), *[a.format(**paths) for a in args]],
                              cwd=paths["root"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _, script, args, _ in cases]  # all at once: most of each is the interpreter starting
    for (name, _, _, expected), proc in zip(cases, procs):
        out, err = proc.communicate(timeout=120)
        check_one_line(proc.returncode, out, err, expected, paths)
    assert tree_hashes(paths["root"]) == before


@pytest.mark.parametrize("script", ["prepare", "report"])
def test_help_into_a_closed_pipe_is_quiet(script):
    """`script --help | head`: the reader is gone before the help is written; no BrokenPipeError."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, f"{script}.py"), "--help"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before the interpreter has even started: the write must fail
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141 and err == ""


def test_report_shows_a_dash_for_a_model_without_validation_perplexity(tmp_path, capsys):
    models = {name: {"params": 1e6, "memorized": k, "memorization_rate": k / 10, "val_ppl": None}
              for name, k in (("teacher", 9), ("baseline", 5), ("student_soft", 1))}
    summary = {"n_examples": 10, "example_len": 17, "prefix_len": 8, "suffix_len": 8, "models": models}
    (tmp_path / "memorization").mkdir()
    (tmp_path / "memorization" / "summary.json").write_text(json.dumps(summary))
    report.main([f"--out={tmp_path}"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| student_soft")]
    assert rows == ["| student_soft | 1.00M | 1 | - | 10.00% | - | - | - | - |"]


@pytest.mark.parametrize("script, args", [("sample", SAMPLE), ("distill", DISTILL), ("memorize", MEMORIZE),
                                          ("extract", EXTRACT), ("train", TRAIN + ["--init_from={ckpt}"])])
def test_a_checkpoint_that_cannot_be_read_gets_one_line_in_every_script(script, args, paths, capfd, monkeypatch):
    # As a user without read permission on the weights sees it (tests run as root, who may read anything).
    import checkpoint

    def refuse(path, *a, **k):
        raise PermissionError(13, "Permission denied", path)
    monkeypatch.setattr(checkpoint, "safe_open", refuse)
    monkeypatch.chdir(paths["root"])
    before = tree_hashes(paths["root"])
    capfd.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_main(SCRIPTS[script].main, [a.format(**paths) for a in args])
    check_one_line(exit_info.value.code, *capfd.readouterr(), "Permission denied", paths)
    assert tree_hashes(paths["root"]) == before
