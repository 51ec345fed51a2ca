"""The walkthroughs: every chapter runs as a script from a fresh checkout, stops at the first claim that
does not hold, and ends by reporting how many it checked; every chapter is a valid notebook without
outputs. (Chapter 7 reads the family chapter 6 trains, so they run in order.)"""

import glob
import os
import re
import subprocess
import sys

import jupytext
import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHAPTERS = sorted(glob.glob(os.path.join(ROOT, "walkthroughs", "0*.py")))


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("walkthroughs")  # figures and scratch runs, outside the checkout


def test_there_are_seven_chapters_and_only_sources_are_committed():
    assert [os.path.basename(c)[:3] for c in CHAPTERS] == [f"0{i}_" for i in range(1, 8)]
    tracked = subprocess.run(["git", "ls-files", "walkthroughs"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    assert tracked and all(f.endswith((".py", ".md")) for f in tracked), tracked


@pytest.mark.parametrize("chapter", CHAPTERS, ids=[os.path.basename(c)[:2] for c in CHAPTERS])
def test_the_chapter_runs_as_a_script_and_reports_its_checks(chapter, out):
    env = {**os.environ, "MPLBACKEND": "Agg", "WALKTHROUGH_OUT": str(out), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, chapter], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    number = os.path.basename(chapter)[:2]
    last = done.stdout.strip().splitlines()[-1]
    match = re.fullmatch(rf"walkthrough {number}: (\d+) checks passed", last)
    assert match and int(match.group(1)) >= 5, last
    assert done.stdout.count("  ok: ") == int(match.group(1))  # every check printed what it claimed
    for figure in re.findall(r"^figure: (.+)$", done.stdout, re.M):
        assert figure.startswith(str(out)) and os.path.getsize(figure) > 1000, figure


@pytest.mark.parametrize("chapter", CHAPTERS, ids=[os.path.basename(c)[:2] for c in CHAPTERS])
def test_the_chapter_is_a_valid_notebook_of_markdown_and_code_without_outputs(chapter):
    notebook = jupytext.read(chapter)
    nbformat.validate(notebook)
    kinds = [cell.cell_type for cell in notebook.cells]
    assert kinds[0] == "markdown" and kinds.count("markdown") >= 5 and kinds.count("code") >= 5
    assert notebook.cells[0].source.startswith(f"# {int(os.path.basename(chapter)[:2])}. ")  # its title
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")
    assert "## Exercises" in notebook.cells[-1].source or "## Exercises" in notebook.cells[-2].source
