"""config.py: settings with domains, --help that lines up, and progress that reads well in a log."""

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from typing import Optional

import pytest

from config import ProgressLines, UserError, between, help_text, parse_config, positive, setting

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Example:
    steps: int = setting(10, "optimizer steps", positive)
    dropout: Optional[float] = setting(None, "a probability, or none", between(0, 1, high_open=True))
    sections: str = setting("training,generation,memorization,distillation,and,some,more", "a long default")
    name: str = setting("x", "no domain")


def test_a_value_outside_its_domain_is_refused_naming_the_setting_and_range():
    assert parse_config(Example, ["--dropout=0.5"]).dropout == 0.5
    assert parse_config(Example, []).dropout is None  # unset passes
    with pytest.raises(UserError, match=r"^--dropout must be at least 0 and below 1, not 1\.0$"):
        parse_config(Example, ["--dropout=1"])
    with pytest.raises(UserError, match=r"^--steps must be at least 1, not 0$"):
        parse_config(Example, ["--steps=0"])


def test_help_columns_line_up_whatever_the_length_of_a_default():
    lines = help_text(Example, "example.py").splitlines()[3:]
    helps = ["optimizer steps [at least 1]", "a probability, or none [at least 0 and below 1]", "a long default",
             "no domain"]
    assert len({line.index(text) for line, text in zip([lines[0], lines[1], lines[3], lines[4]], helps)}) == 1
    types = ["int", "float or none", "str", "str"]
    assert len({line.index(f"  {t}  ") for line, t in zip([lines[0], lines[1], lines[3], lines[4]], types)}) == 1
    assert lines[2].strip() == "--sections='training,generation,memorization,distillation,and,some,more'"


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_plain_progress_lines_come_every_tenth_at_most_once_a_second_and_every_30_s(monkeypatch, capsys):
    clock = FakeClock()
    monkeypatch.setattr(ProgressLines, "clock", clock)
    bar = ProgressLines(None, 100, "train", "step", initial=0)
    for _ in range(100):  # 2 s per step: every tenth (10 steps, 20 s) gets a line
        clock.now += 2.0
        bar.set_postfix(loss="1.0")
        bar.update()
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 10 and lines[0] == "train: step 10 of 100 (10%), loss 1.0, 20.0 s, about 180 s left"
    assert lines[-1] == "train: step 100 of 100 (100%), loss 1.0, 200.0 s"

    bar = ProgressLines(range(1000), None, "tokenizing", "document")
    for _ in bar:  # 1 ms per document: the tenths come too fast, so only the last line is shown
        clock.now += 0.001
    assert capsys.readouterr().err.splitlines() == ["tokenizing: document 1,000 of 1,000 (100%), 1.0 s"]

    bar = ProgressLines(None, 10_000, "slow", "batch")
    for _ in range(20):  # 5 s per batch, a tenth takes hours: a line every 30 s
        clock.now += 5.0
        bar.update()
    assert len(capsys.readouterr().err.splitlines()) == 3


def test_a_script_whose_output_is_not_a_terminal_writes_plain_progress_lines(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(8):
        (corpus / f"doc{i}.txt").write_text(" ".join(f"word{i * j % 97}" for j in range(400)))
    proc = subprocess.run([sys.executable, "prepare.py", f"--input={corpus}", f"--out_dir={tmp_path}",
                           "--vocab_size=600"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stdout + proc.stderr
    for loop in ("training BPE: merge", "tokenizing: document"):
        assert re.search(rf"^{loop} [\d,]+ of [\d,]+ \(100%\), [\d.]+ s$", proc.stderr, re.M), proc.stderr
