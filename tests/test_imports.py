"""The files form layers a reader can follow: no import cycle, every import of the project at the top of
its file, and each pipeline step's code in the Makefile is the code the step really runs (so a change
to it makes the step run again)."""

import ast
import glob
import os
import re
import sys

import numpy as np
import pytest

import distill
import extract
import memorize
import prepare
import train
from conftest import models_arg
from test_train import TINY, examples_dataset, packed_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = sorted(os.path.splitext(os.path.basename(f))[0] for f in glob.glob(os.path.join(ROOT, "*.py")))
# Imported inside a function on purpose: optional dependencies, only needed by the feature that uses them.
OPTIONAL = {"matplotlib", "transformers", "pyarrow"}


def imports_of(module):
    """{imported top-level name: [line numbers]} of a project file, and those made inside a function."""
    tree = ast.parse(open(os.path.join(ROOT, f"{module}.py"), encoding="utf-8").read())
    top, nested = {}, {}
    inside = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(f)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module.split(".")[0]]
        else:
            continue
        for name in names:
            (nested if id(node) in inside else top).setdefault(name, []).append(node.lineno)
    return top, nested


def test_no_project_file_imports_itself_through_others():
    deps = {m: set(imports_of(m)[0]) & set(MODULES) - {m} for m in MODULES}
    done, path = set(), []

    def visit(m):
        assert m not in path, "import cycle: " + " -> ".join(path[path.index(m):] + [m])
        if m in done:
            return
        path.append(m)
        for d in sorted(deps[m]):
            visit(d)
        path.pop()
        done.add(m)

    for m in MODULES:
        visit(m)
    # The layers the design promises: the architecture and the helpers below everything else.
    assert deps["model"] == set() and deps["config"] == set() and deps["classifier"] == set()
    assert "torch" not in imports_of("tokenizer")[0] and "torch" not in imports_of("classifier")[0]
    assert not deps["distributed"] & {"train", "memorize", "distill", "checkpoint"}


def test_every_import_is_at_the_top_of_its_file_unless_optional():
    late = {m: sorted(set(imports_of(m)[1]) - OPTIONAL) for m in MODULES}
    assert {m: names for m, names in late.items() if names} == {}


# --- the Makefile names the code each step runs ----------------------------------------------------

def makefile_lists():
    """The Makefile's *_CODE variables as sets of file names, $(VAR) references expanded."""
    text = open(os.path.join(ROOT, "Makefile")).read().replace("\\\n", " ")
    raw = dict(re.findall(r"^(\w+_CODE)\s*:=\s*(.*)$", text, re.M))

    def expand(name):
        words = raw[name].split()
        return set().union(*[expand(w[2:-1]) if w.startswith("$(") else {w} for w in words])
    return {name: expand(name) for name in raw}


def files_run_by(fn):
    """The project files whose functions ran while fn() ran (in this thread), found by profiling."""
    seen = set()

    def profile(frame, event, arg):
        if event == "call":
            seen.add(frame.f_code.co_filename)
    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return {os.path.basename(f) for f in seen if os.path.isfile(f) and os.path.dirname(os.path.abspath(f)) == ROOT}


@pytest.fixture(scope="module")
def steps(tmp_path_factory, world):
    """Each pipeline step of the Makefile, run once on tiny data: {Makefile variable: files it ran}."""
    tmp = tmp_path_factory.mktemp("steps")
    corpus = tmp / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=rng.integers(2, 8))) for _ in range(300)]
    for i in range(6):
        (corpus / f"doc{i}.txt").write_text(" ".join(rng.choice(words, size=400)))
    data, packed = examples_dataset(tmp / "ex", n_train=16), packed_dataset(tmp / "packed")
    tune = [*TINY, "--batch_size=4", "--max_steps=4", "--mem_every=1", "--mem_prefix_len=4", "--mem_suffix_len=4"]
    return {
        "PREPARE_CODE": files_run_by(lambda: prepare.main([f"--input={corpus}", f"--out_dir={tmp}", "--name=p",
                                                            "--vocab_size=600", "--layout=examples", "--example_len=9"])),
        "TRAIN_CODE": files_run_by(lambda: train.main([f"--data={data}", f"--out_dir={tmp / 't'}", *tune]))
        | files_run_by(lambda: train.main([f"--data={packed}", f"--out_dir={tmp / 'tp'}", *TINY, "--batch_size=4",
                                           "--max_steps=2", "--seq_len=16", f"--init_from={tmp / 't'}"])),
        "DISTILL_CODE": files_run_by(lambda: distill.main([f"--data={data}", f"--out_dir={tmp / 's'}", *tune,
                                                           f"--teacher={tmp / 't'}"]))
        | files_run_by(lambda: distill.main([f"--data={data}", f"--out_dir={tmp / 'h'}", *tune, "--kind=hard",
                                             "--prefix_len=4", f"--teacher={tmp / 't'}"])),
        "MEASURE_CODE": files_run_by(lambda: memorize.main([f"--data={world['data']}", models_arg(world),
                                                            f"--out={tmp / 'm'}", "--prefix_len=7", "--suffix_len=8",
                                                            "--generate=true", "--classifier_min_positives=2",
                                                            "--classifier_trials=3"])),
        "EXTRACT_CODE": files_run_by(lambda: extract.main([f"--data={world['data']}", models_arg(world),
                                                           f"--out={tmp / 'x'}", "--samples=4", "--window=8",
                                                           "--quantize=int8"])),
    }


@pytest.mark.parametrize("step", ["PREPARE_CODE", "TRAIN_CODE", "DISTILL_CODE", "MEASURE_CODE", "EXTRACT_CODE"])
def test_the_makefile_names_every_file_whose_code_a_step_runs(steps, step):
    ran, listed = steps[step], makefile_lists()[step]
    assert ran - listed == set(), f"{step} lacks files the step runs"
    assert ran, "the profile saw nothing: the check itself is broken"
