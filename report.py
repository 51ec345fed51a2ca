"""
The reproduction's report: this run's numbers next to the paper's, finding by finding.

- Reads what memorize.py wrote for the model family (`<out>/memorization/summary.json`), and, when
  they exist, the temperature sweep (`<out>/sweep/summary.json`) and the filtering experiment
  (`<out>/filter/summary.json`, `<out>/memorization/summary.json`'s filter entry).
- Writes `<out>/summary.json` (memorize.py's summary plus `wall_seconds`, `findings`, `sweep`,
  `filtering`), `<out>/report.md` and `<out>/headline.txt`, and prints the headline table.
- Each finding is judged by a stated rule on the numbers; the report never picks what it shows.

    python report.py --out=out/reproduce --started_at=$(date +%s)
"""

import json
import os
import time
from dataclasses import dataclass, field
from typing import Optional

from config import UserError, parse_config, run_main

# The paper's headline numbers (Borkar et al. 2026, arXiv 2601.15394), for comparison only.
PAPER = {
    "baseline_over_student": 2.4,  # the baseline memorizes 2.4x more than the (soft) student
    "easy_share": 0.957,  # of the student's memorized examples, the share that teacher and baseline both memorize
    "inherited": "18 of 1,955",  # teacher-specific examples the soft student memorizes
    "hard_over_soft": 2.7,  # teacher-specific examples inherited by hard vs soft distillation
    "auc": 0.9997,
    "zlib_coefficient": -4.50,
}


@dataclass
class ReportConfig:
    out: str = field(default="out/reproduce", metadata={"help": "the reproduction's output folder"})
    started_at: Optional[float] = field(default=None, metadata={
        "help": "unix time the pipeline started (make reproduce passes it); sets wall_seconds"})


def load(path):
    with open(path) as f:
        return json.load(f)


def ratio(a, b):
    return None if a is None or not b else a / b


def findings(s):
    """Each of the paper's findings, this run's numbers, and whether they point the same way."""
    m, out = s["models"], []
    base, soft = m.get("baseline"), m.get("student_soft")
    ts, easy, clf = s.get("teacher_specific", {}), s.get("easy", {}), s.get("classifier", {})

    def add(name, paper, ours, holds):
        out.append({"finding": name, "paper": paper, "this_run": ours,
                    "reproduced": None if holds is None else bool(holds)})

    if base and soft:
        r = ratio(base["memorized"], soft["memorized"])
        add("the soft student memorizes less than the baseline", f"{PAPER['baseline_over_student']}x less",
            f"{base['memorized']} vs {soft['memorized']}" + (f" ({r:.1f}x less)" if r else ""),
            soft["memorized"] < base["memorized"] if base["memorized"] else None)
        if base.get("val_ppl") and soft.get("val_ppl"):
            add("... at a better validation perplexity", "lower perplexity than the baseline",
                f"{soft['val_ppl']:.1f} vs {base['val_ppl']:.1f}", soft["val_ppl"] < base["val_ppl"])
    share = easy.get("share_soft")
    if share is not None:
        add("what the student memorizes is 'easy' (memorized by teacher and baseline)",
            f"{100 * PAPER['easy_share']:.1f}%", f"{100 * share:.1f}%", share >= 0.9)
    if ts.get("count") and ts.get("inherited_soft") is not None:
        frac = ts["inherited_soft"] / ts["count"]
        add("the soft student inherits under 1% of teacher-specific memorization", PAPER["inherited"],
            f"{ts['inherited_soft']} of {ts['count']} ({100 * frac:.1f}%)", frac < 0.01)
    if ts.get("inherited_hard") is not None and ts.get("inherited_soft") is not None:
        r = ratio(ts["inherited_hard"], ts["inherited_soft"])
        add("hard distillation inherits more teacher-specific examples than soft", f"{PAPER['hard_over_soft']}x",
            f"{ts['inherited_hard']} vs {ts['inherited_soft']}" + (f" ({r:.1f}x)" if r else ""),
            # neither inheriting any says nothing about which inherits more
            ts["inherited_hard"] > ts["inherited_soft"] if ts["inherited_hard"] or ts["inherited_soft"] else None)
    if clf.get("auc_mean") is not None:
        add("pre-distillation features predict the student's memorization", f"AUC {PAPER['auc']}",
            f"AUC {clf['auc_mean']:.4f} ± {clf['auc_std']:.4f}", clf["auc_mean"] >= 0.9)
        z = clf["coefficients"]["zlib_entropy"]["mean"]
        add("low zlib entropy (compressible text) raises the risk", f"zlib coefficient {PAPER['zlib_coefficient']}",
            f"{z:+.2f}", z < 0)
    return out


def sweep_section(path):
    """Memorization of soft students distilled at several temperatures (make sweep-temperature)."""
    if not os.path.isfile(path):
        return None, []
    s = load(path)
    rows = sorted(((float(n.split("_T")[1]), v["memorized"], v["memorization_rate"], v["val_ppl"])
                   for n, v in s["models"].items() if "_T" in n))
    table = {f"T={t:g}": {"memorized": mem, "memorization_rate": rate, "val_ppl": ppl} for t, mem, rate, ppl in rows}
    counts = [r[1] for r in rows]
    falls = None if len(set(counts)) < 2 else all(a >= b for a, b in zip(counts, counts[1:]))
    lines = ["\n## Temperature sweep (make sweep-temperature)\n\n",
             "The paper: memorization falls as the temperature rises. "
             "This run: " + {True: "it does", False: "it does not fall monotonically",
                             None: "cannot tell, every student memorized as many"}[falls] + ".\n\n",
             "| temperature | memorized | rate | val ppl |\n|---|---|---|---|\n"]
    lines += [f"| {t:g} | {mem} | {100 * rate:.1f}% | {ppl:.1f} |\n" for t, mem, rate, ppl in rows]
    if os.path.isfile(os.path.join(os.path.dirname(path), "memorization_rate.png")):
        lines.append("\n![memorization per temperature](sweep/memorization_rate.png)\n")
    return {"students": table, "falls_with_temperature": falls}, lines


def filter_section(path, before):
    """The student distilled on data without the examples the classifier flagged (make filter)."""
    if not os.path.isfile(path):
        return None, []
    after = load(path)["models"]["student_filtered"]
    f = {"before": before, "after": after["memorized"], "after_rate": after["memorization_rate"],
         "after_val_ppl": after["val_ppl"]}
    lines = ["\n## Filtering before distillation (make filter)\n\n",
             f"The soft student memorized {before} examples of D; distilled again on D without the examples the "
             f"classifier flagged, it memorizes {after['memorized']} of the remaining ones "
             f"(validation perplexity {after['val_ppl']:.1f}). The paper: far fewer memorized examples after filtering.\n"]
    return f, lines


FIGURES = [
    ("memorization_rate.png", "Memorization rate per model.",
     "The paper's counterpart: the bar chart of memorized examples per model, where the student sits far below "
     "the baseline and the teacher highest."),
    ("forced_memorization.png", "Suffix entropy against suffix log-probability of memorized examples.",
     "The paper's counterpart: its 'forced memorization' scatter, where the student's memorized examples "
     "cluster at low entropy and high log-probability, while the baseline also memorizes high-entropy examples."),
    ("features.png", "Feature distributions of memorized and not memorized examples.",
     "The paper's counterpart: memorized examples have lower zlib entropy and lower perplexity."),
    ("roc.png", "ROC curve of the classifier predicting the student's memorization.",
     "The paper's counterpart: an ROC curve hugging the top-left corner (AUC 0.9997)."),
]


def write_report(s, out):
    lines = ["# Reproduction: memorization in knowledge distillation, at small scale\n\n",
             f"{s['n_examples']:,} training examples of {s['example_len']} tokens; prefix BOS + {s['prefix_len']} "
             f"tokens, suffix {s['suffix_len']}. Wall time of the pipeline: "
             f"{s['wall_seconds']:.0f} s.\n\n" if s.get("wall_seconds") else "\n",
             "## The family\n\n", headline(s), "\n"]
    lines += ["## The paper's findings, and this run\n\n| finding | paper | this run | same direction |\n|---|---|---|---|\n"]
    for f in s["findings"]:
        verdict = {True: "yes", False: "**no**", None: "-"}[f["reproduced"]]
        lines.append(f"| {f['finding']} | {f['paper']} | {f['this_run']} | {verdict} |\n")
    c = s.get("classifier", {})
    if c.get("coefficients"):
        lines.append("\nClassifier coefficients (standardized features, mean over trials): " + ", ".join(
            f"{k} {v['mean']:+.2f}" for k, v in c["coefficients"].items()) + f"; recall {c['recall_mean']:.3f}, "
            f"precision {c['precision_mean']:.3f}.\n")
    lines.append("\n## Figures\n\n")
    for name, what, paper in FIGURES:
        if name in s.get("figures", []) or os.path.isfile(os.path.join(out, "memorization", name)):
            lines.append(f"![{what}](memorization/{name})\n\n{what} {paper}\n\n")
    lines += s.pop("_sweep_lines", []) + s.pop("_filter_lines", [])
    lines.append("\nThe full tables (overlaps, per-seed numbers, the extraction attack) are in "
                 "[memorization/report.md](memorization/report.md); per-example numbers in "
                 "memorization/per_example.jsonl.\n")
    write_atomic(os.path.join(out, "report.md"), "".join(lines))


def headline(s):
    ts, easy = s.get("teacher_specific", {}), s.get("easy", {})
    rows = ["| model | params | memorized | rate | val ppl | teacher-specific inherited | share in easy set |\n",
            "|---|---|---|---|---|---|---|\n"]
    for name, m in s["models"].items():
        key = name[len("student_"):] if name.startswith("student_") else None
        inherited = ts.get(f"inherited_{key}") if key else None
        share = easy.get(f"share_{key}") if key else None
        rows.append(f"| {name} | {m['params'] / 1e6:.2f}M | {m['memorized']} | {100 * m['memorization_rate']:.1f}% | "
                    f"{m['val_ppl']:.1f} | {'-' if inherited is None else inherited} | "
                    f"{'-' if share is None else f'{100 * share:.1f}%'} |\n")
    rows.append(f"\nTeacher-specific examples: {ts.get('count', '-')}; easy examples: {easy.get('count', '-')}; "
                f"classifier AUC: {fmt_auc(s.get('classifier', {}))}.\n")
    return "".join(rows)


def fmt_auc(c):
    return "-" if c.get("auc_mean") is None else f"{c['auc_mean']:.4f}"


def write_atomic(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv):
    cfg = parse_config(ReportConfig, argv, prog="report.py")
    src = os.path.join(cfg.out, "memorization", "summary.json")
    if not os.path.isfile(src):
        raise UserError(f"{src} does not exist; run memorize.py with --out={cfg.out}/memorization first")
    s = load(src)
    previous = os.path.join(cfg.out, "summary.json")
    if cfg.started_at is not None:
        s["wall_seconds"] = time.time() - cfg.started_at
    elif os.path.isfile(previous):  # a later sweep or filter keeps the pipeline's own wall time
        s["wall_seconds"] = load(previous).get("wall_seconds")
    s["findings"] = findings(s)
    s["sweep"], s["_sweep_lines"] = sweep_section(os.path.join(cfg.out, "sweep", "summary.json"))
    soft_before = s["models"].get("student_soft", {}).get("memorized")
    s["filtering"], s["_filter_lines"] = filter_section(os.path.join(cfg.out, "filter", "summary.json"), soft_before)
    write_report(s, cfg.out)
    write_atomic(previous, json.dumps(s, indent=2) + "\n")
    text = headline(s)
    write_atomic(os.path.join(cfg.out, "headline.txt"), text)
    print(text + f"\nreport: {os.path.join(cfg.out, 'report.md')}")
    return s


if __name__ == "__main__":
    run_main(main)
