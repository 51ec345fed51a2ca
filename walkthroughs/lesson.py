"""What every chapter shares: the project's files on the path, counted checks, figures saved to disk.

A chapter starts with `import lesson` and `check = lesson.Checks("01")`; each `check(...)` or
`check.close(...)` stops the chapter if what it claims is false, and `check.done()` ends it with
`walkthrough 01: 12 checks passed`. Figures go to out/walkthroughs/ (and show inline in a notebook).
"""

import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__)) if "__file__" in globals() else os.getcwd()
ROOT = os.path.dirname(HERE)  # the project: model.py, train.py, ...
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
FIGURES = os.path.join(ROOT, "out", "walkthroughs")
SCRATCH = os.path.join(FIGURES, "scratch")  # datasets and runs a chapter makes


class Checks:
    def __init__(self, chapter):
        self.chapter, self.passed = chapter, 0
        torch.manual_seed(0)

    def __call__(self, claim, holds):
        """Stop the chapter unless `holds` is true; say what was checked."""
        if not holds:
            raise AssertionError(f"walkthrough {self.chapter}: this does not hold: {claim}")
        self.passed += 1
        print(f"  ok: {claim}")

    def close(self, claim, got, expected, **tolerance):
        """Stop the chapter unless got equals expected up to rounding (torch.testing.assert_close)."""
        torch.testing.assert_close(torch.as_tensor(got), torch.as_tensor(expected), **tolerance)
        self(claim, True)

    def done(self):
        print(f"walkthrough {self.chapter}: {self.passed} checks passed")


def save_figure(fig, name):
    """Write fig to out/walkthroughs/<name>.png, show it when running in a notebook, and close it."""
    import matplotlib.pyplot as plt
    os.makedirs(FIGURES, exist_ok=True)
    path = os.path.join(FIGURES, f"{name}.png")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    if "ipykernel" in sys.modules:
        plt.show()
    plt.close(fig)
    print(f"figure: {os.path.relpath(path, ROOT)}")
    return path
