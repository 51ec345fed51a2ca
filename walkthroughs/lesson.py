"""What every chapter shares: the project's files on the path, counted checks, figures saved to disk.

A chapter starts with `import lesson` and `check = lesson.Checks("01")`; each `check(...)` or
`check.close(...)` stops the chapter if what it claims is false, and `check.done()` ends it with
`walkthrough 01: 12 checks passed`. Figures go to out/walkthroughs/ (or $WALKTHROUGH_OUT), and show
inline in a notebook; the data and runs a chapter makes go to its scratch/ folder.
"""

import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__)) if "__file__" in globals() else os.getcwd()
ROOT = os.path.dirname(HERE)  # the project: model.py, train.py, ...
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
FIGURES = os.environ.get("WALKTHROUGH_OUT") or os.path.join(ROOT, "out", "walkthroughs")
SCRATCH = os.path.join(FIGURES, "scratch")  # datasets and runs a chapter makes


class Checks:
    def __init__(self, chapter):
        self.chapter, self.passed = chapter, 0
        torch.manual_seed(0)
        torch.set_num_threads(1)  # the chapters' models are tiny: threads only wait for each other

    def __call__(self, claim, holds):
        """Stop the chapter unless `holds` is true; say what was checked."""
        if not holds:
            raise AssertionError(f"walkthrough {self.chapter}: this does not hold: {claim}")
        self.passed += 1
        print(f"  ok: {claim}")

    def close(self, claim, got, expected, **tolerance):
        """Stop the chapter unless got equals expected up to rounding (torch.testing.assert_close)."""
        got, expected = torch.as_tensor(got), torch.as_tensor(expected)
        if got.dtype != expected.dtype:  # a float32 model's output next to a float64 computation
            got, expected = got.double(), expected.double()
        torch.testing.assert_close(got, expected, **tolerance)
        self(claim, True)

    def done(self):
        print(f"walkthrough {self.chapter}: {self.passed} checks passed")


def grammar_corpus(folder, n_docs=12, lines=150, seed=0):
    """A folder of .txt documents written on the spot: sentences from a small grammar ("a proud moon
    fears this fair river."), one a line, so that a model has something to learn in seconds."""
    import shutil

    import numpy as np
    rng = np.random.default_rng(seed)
    words = {"the": ["the", "a", "this"], "adj": ["old", "young", "fair", "proud", "gentle", "dark"],
             "noun": ["king", "queen", "knight", "moon", "river", "sword", "crown"],
             "verb": ["sees", "loves", "fears", "follows", "praises", "remembers"]}
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    for d in range(n_docs):
        text = "\n".join(" ".join(rng.choice(words[p]) for p in ("the", "adj", "noun", "verb", "the", "adj", "noun"))
                         + "." for _ in range(lines))
        with open(os.path.join(folder, f"doc{d:02d}.txt"), "w") as f:
            f.write(text.capitalize() + "\n")
    return folder


def save_figure(fig, name):
    """Write fig to out/walkthroughs/<name>.png, show it when running in a notebook, and close it."""
    import matplotlib.pyplot as plt
    os.makedirs(FIGURES, exist_ok=True)
    path = os.path.join(FIGURES, f"{name}.png")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    if "ipykernel" in sys.modules:
        plt.show()
    plt.close(fig)
    print(f"figure: {path}")
    return path
