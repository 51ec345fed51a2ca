"""
The reproduction's report: this run's numbers next to the paper's, finding by finding.

- One family (`--out=out/reproduce`): reads memorize.py's summary (`<out>/memorization/summary.json`),
  the training logs of each model (memorization measured during training), and, when they exist,
  the temperature sweep (`<out>/sweep/`) and the filtering experiment (`<out>/filter/`). Writes
  `<out>/summary.json` (memorize.py's summary plus `wall_seconds`, `regime`, `findings`,
  `findings_natural`, `dynamics`, `sweep`, `filtering`), `<out>/report.md` and `<out>/headline.txt`.
- Several families (`--families=out/robustness/seed1,...`): each finding per family seed, the mean
  and spread of its number, and "holds in k of n", in `<out>/report.md` and `<out>/summary.json`.
- Each finding is judged by a rule stated in its text, on the numbers; the report never picks
  what it shows, and a finding a run cannot judge says so ("-") instead of counting as held.

    python report.py --out=out/reproduce --started_at=$(date +%s)
    python report.py --families=out/robustness/seed1,out/robustness/seed2,out/robustness/seed3 --out=out/robustness
"""

import json
import math
import os
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

from config import UserError, at_least, atomic_path, parse_config, run_main, setting, write_atomic

# The paper's headline numbers (Borkar et al. 2026, arXiv 2601.15394), for comparison only.
PAPER = {
    "baseline_over_student": 2.4,  # the baseline memorizes 2.4x more than the (soft) student
    "easy_share": 0.957,  # of the student's memorized examples, the share that teacher and baseline both memorize
    "inherited": "18 of 1,955",  # teacher-specific examples the soft student memorizes
    "hard_over_soft": 2.7,  # teacher-specific examples inherited by hard vs soft distillation (50 vs 18)
    "auc": 0.9997,
    "zlib_coefficient": -4.50,
    "filtering": "706 -> 4",  # the student's memorized examples without and with filtering
}


@dataclass
class ReportConfig:
    out: str = setting("out/reproduce", "the reproduction's output folder (with --families: where the summary goes)")
    families: str = setting("", "comma-separated reproduction folders of several family seeds, to aggregate")
    started_at: Optional[float] = setting(None, "unix time the pipeline started (make reproduce passes it); "
                                                "sets wall_seconds", at_least(0))


def load(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); delete it and run the step that writes it again") from None


def ratio(a, b):
    return None if a is None or not b else a / b


# ----------------------------------------------------------------------------------------------
# One measurement: memorize.py's report.md and figures


def fmt(x):
    if x is None:
        return "-"
    return x if isinstance(x, str) else f"{x:,}" if isinstance(x, int) else f"{x:.3g}"


def md_table(header, rows):
    lines = [header, ["---"] * len(header)] + [[fmt(v) for v in r] for r in rows]
    return "".join("| " + " | ".join(line) + " |\n" for line in lines)


def write_measurement_report(s, path):
    """memorize.py's report.md: the summary's numbers as tables, then the figures."""
    out = [f"# Memorization report\n\n{s['n_examples']:,} examples of `{s['data']}` ({s['split']} split), "
           f"{s['example_len']} tokens each; prefix BOS + {s['prefix_len']} tokens, suffix {s['suffix_len']}.\n\n"
           "## Models\n\n",
           md_table(["model", "role", "params", "val ppl", "val accuracy", "memorized", "beyond its base", "rate",
                     "mean log-ppl", "suffix entropy"],
                    [[n, m["role"], m["params"], m["val_ppl"], m.get("val_accuracy"), m["memorized"],
                      m.get("memorized_beyond_base"), m["memorization_rate"], m["mean_log_ppl"], m["mean_suffix_entropy"]]
                     for n, m in s["models"].items()])]
    names = list(s["models"])
    if len(names) > 1:
        out += ["\n## Overlaps (examples memorized by both)\n\n",
                md_table([""] + names, [[a] + [s["overlap"][a][b] for b in names] for a in names])]
    if "easy" in s:
        e, t = s["easy"], s["teacher_specific"]
        out += [f"\n## Easy and teacher-specific examples\n\nEasy (memorized by the teacher and a baseline seed): "
                f"{e['count']:,}. Teacher-specific (by the teacher and no baseline seed): {t['count']:,}. "
                f"Hard/soft inheritance ratio: {fmt(t['hard_soft_ratio'])}.\n\n",
                md_table(["student", "share of its memorized that is easy", "teacher-specific inherited"],
                         [[k[6:], e[k], t[f"inherited_{k[6:]}"]] for k in e if k.startswith("share_")])]
    out += planted_section(s)
    c = s["classifier"]
    out.append(f"\n## Predicting the student's memorization ({c.get('student') or '-'})\n\n")
    if c["status"] != "ok":
        out.append(c["status"] + "\n")
    else:
        pm = lambda a, b: f"{a:.4f} ± {b:.4f}"  # noqa: E731
        out += [f"{c['trials']} trials, {c['n_positives']} positives and {c['n_negatives']} negatives each, "
                f"{100 * c['test_fraction']:.0f}% held out. AUC-ROC {pm(c['auc_mean'], c['auc_std'])}, recall {pm(c['recall_mean'], c['recall_std'])}, "
                f"precision {pm(c['precision_mean'], c['precision_std'])}.\n\n",
                md_table(["standardized feature", "coefficient"], [[f, pm(v["mean"], v["std"])] for f, v in c["coefficients"].items()])]
    if s.get("filter", {}).get("path"):
        f = s["filter"]
        out.append(f"\nFilter: {f['at_risk']:,} examples predicted at risk (p >= {f['threshold']}) removed, "
                   f"{f['kept']:,} kept in `{f['path']}`.\n")
    if s["figures"]:
        out.append("\n## Figures\n\n" + "".join(f"![{f}]({f})\n" for f in s["figures"]))
    write_atomic(path, "".join(out))


def write_extraction_report(x, path):
    """extract.py's report.md: how many samples held a training window, and the precision of each ranking."""
    ks = list(next(iter(x["precision"].values())))
    write_atomic(path, "".join([
        f"# Extraction attack on {x['target']} (Carlini et al. 2021)\n\n{x['samples']:,} samples of {x['length']} "
        f"tokens from <|begin_of_text|>; {x['hits']:,} contain a window of {x['window']} tokens of a training example "
        f"of `{x['data']}`. Precision among the top k samples by each score (lower is more suspicious; reference "
        f"model: {x['reference'] or 'none'}):\n\n",
        md_table(["score"] + [f"top {k}" for k in ks], [[n] + [p[k] for k in ks] for n, p in x["precision"].items()])]))


def measurement_figures(summary, cols, out_dir):
    """PNG figures, if matplotlib is installed; returns the file names written."""
    plt = pyplot()
    if plt is None:
        print("note: matplotlib is not installed, so no figures (pip install matplotlib)")
        return []
    written = []

    def save(fig, name):
        save_figure(fig, os.path.join(out_dir, name))
        written.append(name)

    names = list(summary["models"])
    fig, ax = plt.subplots(figsize=(1.5 + 1.1 * len(names), 3))
    ax.bar(names, [100 * summary["models"][n]["memorization_rate"] for n in names])
    ax.set_ylabel("memorized (%)")
    ax.set_title("Discoverable memorization")
    save(fig, "memorization_rate.png")

    # The paper's "forced memorization" view: memorized examples whose suffix the model is unsure
    # about (high entropy) yet reproduces (high log-probability).
    fig, axes = plt.subplots(1, len(names), figsize=(3 * len(names), 3), sharex=True, sharey=True, squeeze=False)
    for ax, n in zip(axes[0], names):
        m = cols[f"{n}.memorized"]
        ax.scatter(cols[f"{n}.suffix_entropy"][m], cols[f"{n}.suffix_logprob"][m], s=4, alpha=0.5)
        ax.set_title(f"{n} ({int(m.sum()):,} memorized)", fontsize=10)
        ax.set_xlabel("suffix entropy (nats)")
    axes[0][0].set_ylabel("suffix log-probability")
    save(fig, "forced_memorization.png")

    c = summary["classifier"]
    who = c["student"] or names[0]
    if c["student"]:  # the classifier's features, split by what the student memorized
        feats = ["zlib_entropy", "teacher.log_ppl", f"{c['baseline']}.log_ppl", f"kl_teacher_{c['baseline']}"]
    else:
        feats = ["zlib_entropy", f"{who}.log_ppl", f"{who}.suffix_entropy"]
    label = cols[f"{who}.memorized"]
    fig, axes = plt.subplots(1, len(feats), figsize=(3 * len(feats), 3), squeeze=False)
    for ax, f in zip(axes[0], feats):
        bins = np.histogram_bin_edges(cols[f], bins=30)
        for rows, name in ((~label, "not memorized"), (label, "memorized")):
            if rows.any():  # a density of no values is 0/0
                ax.hist(cols[f][rows], bins=bins, density=True, alpha=0.6, label=name)
        ax.set_xlabel(f, fontsize=9)
    axes[0][0].legend(fontsize=8, title=who, title_fontsize=8)
    save(fig, "features.png")

    if c.get("roc"):
        fig, ax = plt.subplots(figsize=(3.5, 3.5))
        ax.plot(c["roc"]["fpr"], c["roc"]["tpr"], label=f"AUC {c['auc_mean']:.3f}")
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"predicting {who}")
        ax.legend(loc="lower right")
        save(fig, "roc.png")
    return written


def pyplot():
    """matplotlib's pyplot with a backend that only writes files, or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(fig, path):
    """A matplotlib figure as a PNG, written whole or not at all, then closed."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    pyplot().close(fig)


# ----------------------------------------------------------------------------------------------
# One family: is it in the paper's regime, and does each finding hold


def fine_tuned(name):
    """The family's models (named as memorize.py's roles say), not the bases."""
    return name == "teacher" or name.startswith(("baseline", "student"))


def base_of(name):
    """The base model a fine-tuned model started from: the teacher's, or the student size's."""
    return "base_teacher" if name == "teacher" else "base_student"


def regime(s):
    """The conditions under which the paper's questions can be asked at all (stated rules)."""
    m, n = s["models"], s["n_examples"]
    teacher, soft = m.get("teacher"), m.get("student_soft")
    baselines = {k: v for k, v in m.items() if k.startswith("baseline")}
    if not (teacher and baselines and soft):
        return []
    checks = [("the teacher memorizes at most 90% of D", f"{100 * teacher['memorization_rate']:.1f}%",
               teacher["memorization_rate"] <= 0.9),
              ("every baseline seed memorizes at most 60% of D",
               ", ".join(f"{100 * b['memorization_rate']:.1f}%" for b in baselines.values()),
               all(b["memorization_rate"] <= 0.6 for b in baselines.values())),
              ("the teacher memorizes more than the baseline", f"{teacher['memorized']} vs {m['baseline']['memorized']}",
               teacher["memorized"] > m["baseline"]["memorized"]),
              ("the soft student's classifier has at least 30 positives", f"{soft['memorized']}", soft["memorized"] >= 30),
              ("the teacher does not reproduce all of D, so the hard student's data differs from D",
               f"{teacher['memorized']} of {n}", teacher["memorized"] < n)]
    # The hard student is judged by its use on held-out text, as the paper judges it by downstream
    # tasks: trained on the teacher's single most likely continuations, it is overconfident on real
    # text, which perplexity punishes more than it says about use.
    tuned = [k for k in m if fine_tuned(k) and k != "student_hard" and base_of(k) in m and m[k]["val_ppl"]
             and m[base_of(k)]["val_ppl"]]
    if tuned:
        worst = max(tuned, key=lambda k: m[k]["val_ppl"] / m[base_of(k)]["val_ppl"])
        checks.append(("the teacher's, the baselines' and the soft student's validation perplexity stays below 2x "
                       "their base's", f"largest: {worst} {m[worst]['val_ppl'] / m[base_of(worst)]['val_ppl']:.2f}x",
                       all(m[k]["val_ppl"] < 2 * m[base_of(k)]["val_ppl"] for k in tuned)))
    return [{"condition": c, "this_run": v, "met": bool(ok)} for c, v, ok in checks]


def findings(s, sweep=None, filtering=None, perplexity=True):
    """Each of the paper's findings: this run's numbers, one number to aggregate over seeds
    (`value`), and whether it points the way the paper's does (`reproduced`). A finding this run
    cannot judge (the soft student memorized nothing, say) is still listed, with `reproduced`
    None and the reason; the sweep and the filtering only when they ran."""
    m, out = s["models"], []
    base, soft = m.get("baseline"), m.get("student_soft")
    if not (base and soft):
        return out
    ts, easy, clf = s.get("teacher_specific", {}), s.get("easy", {}), s.get("classifier", {})

    def add(key, name, paper, ours, value=None, holds=None):
        out.append({"key": key, "finding": name, "paper": paper, "this_run": ours, "value": value,
                    "reproduced": None if holds is None else bool(holds)})

    r = ratio(base["memorized"], soft["memorized"])
    add("less", "the soft student memorizes less than the baseline", f"{PAPER['baseline_over_student']}x less",
        f"{base['memorized']} vs {soft['memorized']}" + (f" ({r:.1f}x less)" if r else ""), r,
        soft["memorized"] < base["memorized"] if base["memorized"] else None)
    if perplexity:
        b, st = base.get("val_ppl"), soft.get("val_ppl")
        judged = bool(b and st)
        add("perplexity", "... at no worse validation perplexity", "17.31 vs 17.69",
            f"{st:.2f} vs {b:.2f}" if judged else "no validation perplexity",
            st / b if judged else None, st <= b if judged else None)
    share = easy.get("share_soft")
    add("easy", "what the soft student memorizes is 'easy' (teacher and a baseline both memorize it): at least 90%",
        f"{100 * PAPER['easy_share']:.1f}%", "the soft student memorized none" if share is None else f"{100 * share:.1f}%",
        share, None if share is None else share >= 0.9)
    frac = ratio(ts.get("inherited_soft"), ts.get("count"))
    add("inherited", "the soft student inherits under 1% of teacher-specific memorization", PAPER["inherited"],
        "no teacher-specific examples" if frac is None else
        f"{ts['inherited_soft']} of {ts['count']} ({100 * frac:.1f}%)", frac, None if frac is None else frac < 0.01)
    if ts.get("inherited_hard") is not None:
        hard_n, soft_n = ts["inherited_hard"], ts["inherited_soft"]
        r = ratio(hard_n, soft_n)
        add("hard_over_soft", "hard distillation inherits more teacher-specific examples than soft",
            f"{PAPER['hard_over_soft']}x (50 vs 18)", f"{hard_n} vs {soft_n}" + (f" ({r:.1f}x)" if r else ""), r,
            hard_n > soft_n if hard_n or soft_n else None)  # neither inheriting any says nothing
    fitted = clf.get("auc_mean") is not None
    reason = f"no classifier ({clf.get('status', 'not run')})"
    z = clf["coefficients"]["zlib_entropy"]["mean"] if fitted else None
    add("auc", "pre-distillation features predict the soft student's memorization: AUC at least 0.9",
        f"AUC {PAPER['auc']}", f"AUC {clf['auc_mean']:.4f} ± {clf['auc_std']:.4f}" if fitted else reason,
        clf.get("auc_mean"), clf["auc_mean"] >= 0.9 if fitted else None)
    add("zlib", "low zlib entropy (compressible text) raises the risk: negative coefficient",
        f"{PAPER['zlib_coefficient']}", f"{z:+.2f}" if fitted else reason, z, z < 0 if fitted else None)
    ratio_clf = s.get("classifier_zlib_ratio", {})
    if ratio_clf:
        zr = ratio_clf["coefficients"]["zlib_ratio"]["mean"] if ratio_clf.get("auc_mean") is not None else None
        add("zlib_ratio", "... measured as the compression ratio (compressed / raw bytes) instead: negative coefficient",
            "-", f"{zr:+.2f}" if zr is not None else f"no classifier ({ratio_clf.get('status', 'not run')})", zr,
            None if zr is None else zr < 0)
    if sweep:
        counts = [v["memorized"] for v in sweep["students"].values()]
        add("temperature", "a higher temperature, less memorization (T = 1, 2, 3, 4)", "falls with T",
            " / ".join(map(str, counts)), ratio(counts[-1], counts[0]), sweep["falls_with_temperature"])
    if filtering:
        name = "filtering the examples predicted at risk removes at least 90% of the student's memorization"
        if "skipped" in filtering:
            add("filtering", name, PAPER["filtering"], filtering["skipped"])
        else:
            before, after = filtering["before"], filtering["after"]
            add("filtering", name, PAPER["filtering"], f"{before} -> {after}", ratio(after, before),
                after <= 0.1 * before if before else None)
    return out


# ----------------------------------------------------------------------------------------------
# Memorization dynamics: the rows train.py logged every few epochs


def memorization_log(path):
    """[(epoch, set of memorized row indices)] from a run folder's log.jsonl, or [] without one."""
    log = os.path.join(path or "", "log.jsonl")
    if not path or not os.path.isfile(log):
        return []
    with open(log) as f:
        rows = [json.loads(line) for line in f]
    return [(r["epoch"], set(r["indices"])) for r in rows if r["kind"] == "memorization"]


def final_sets(per_example_path, names):
    """{model: set of row indices it memorized} from memorize.py's per_example.jsonl."""
    sets = {n: set() for n in names}
    with open(per_example_path) as f:
        for line in f:
            r = json.loads(line)
            for n in names:
                if r[n]["memorized"]:
                    sets[n].add(r["index"])
    return sets


def dynamics(s, out):
    """Per model, memorized examples at each tracked epoch; per student, how much of the teacher's
    and of the baseline's final memorized sets it holds along the way (whom it follows)."""
    names = [n for n in s["models"] if fine_tuned(n)]
    curves = {n: memorization_log(s["models"][n].get("path")) for n in names}
    if not any(curves.values()):
        return None
    final = final_sets(os.path.join(out, "memorization", "per_example.jsonl"), names)
    baselines = set().union(*(final[n] for n in names if n.startswith("baseline")))
    out_curves = {n: [{"epoch": e, "memorized": len(idx)} for e, idx in c] for n, c in curves.items() if c}
    follows = {}
    for n in names:
        if n.startswith("student") and curves[n] and final.get("teacher") is not None:
            follows[n] = [{"epoch": e, "of_teacher": share(idx, final["teacher"]), "of_baselines": share(idx, baselines),
                           "teacher_specific": len(idx & (final["teacher"] - baselines))} for e, idx in curves[n]]
    return {"curves": out_curves, "follows": follows}


def share(found, target):
    return len(found & target) / len(target) if target else None


def dynamics_figure(d, path):
    """Memorized examples against epochs per model, and the students' share of the teacher's and the
    baselines' final sets. Returns whether a figure was written (needs matplotlib)."""
    plt = pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for n, c in d["curves"].items():
        axes[0].plot([p["epoch"] for p in c], [p["memorized"] for p in c], marker="o", ms=3, label=n)
    axes[0].set(xlabel="epoch", ylabel="memorized examples of D", title="Memorization during training")
    axes[0].legend(fontsize=8)
    for n, c in d["follows"].items():
        for key, style in (("of_teacher", "-"), ("of_baselines", "--")):
            axes[1].plot([p["epoch"] for p in c], [100 * (p[key] or 0) for p in c], style, marker="o", ms=3,
                         label=f"{n}: {key.replace('_', ' ')}")
    axes[1].set(xlabel="epoch", ylabel="% of that final set memorized", title="Whom the students follow")
    axes[1].legend(fontsize=8)
    save_figure(fig, path)
    return True


# ----------------------------------------------------------------------------------------------
# The temperature sweep and the filtering experiment (make sweep-temperature, make filter)


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
    lines += [f"| {t:g} | {mem} | {100 * rate:.2f}% | {fmt_num(ppl)} |\n" for t, mem, rate, ppl in rows]
    if os.path.isfile(os.path.join(os.path.dirname(path), "memorization_rate.png")):
        lines.append("\n![memorization per temperature](sweep/memorization_rate.png)\n")
    return {"students": table, "falls_with_temperature": falls}, lines


def filter_section(path, before, full):
    """The student distilled on data without the examples the classifier flagged (make filter);
    full is the family's summary, for what the filter removed."""
    if not os.path.isfile(path) or before is None:
        return None, []
    done = load(path)
    if "skipped" in done:
        return {"skipped": done["skipped"]}, ["\n## Filtering before distillation (make filter)\n\n"
                                             f"Not run: {done['skipped']}.\n"]
    after = done["models"]["student_filtered"]
    n, rows = full["n_examples"], full["n_rows"]
    removed, removed_rows = n - done["n_examples"], rows - done["n_rows"]
    f = {"before": before, "after": after["memorized"], "after_rate": after["memorization_rate"],
         "after_val_ppl": after["val_ppl"], "removed_examples": removed, "removed_rows": removed_rows}
    lines = ["\n## Filtering before distillation (make filter)\n\n",
             f"The classifier flagged {removed:,} of the {n:,} distinct examples of D ({removed_rows:,} of its "
             f"{rows:,} rows: every copy of a flagged example goes). "
             f"The soft student memorized {before} examples of D; distilled again on D without the flagged ones, "
             f"it memorizes {after['memorized']} of the remaining ones "
             f"(validation perplexity {fmt_num(after['val_ppl'])}). The paper: far fewer memorized examples after "
             "filtering (706 -> 4).\n"]
    return f, lines


# ----------------------------------------------------------------------------------------------
# Writing one family's report


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


def fmt_num(x):
    return "-" if x is None else f"{x:,.2f}"


def findings_table(rows):
    lines = ["| finding | paper | this run | same direction |\n|---|---|---|---|\n"]
    for f in rows:
        verdict = {True: "yes", False: "**no**", None: "-"}[f["reproduced"]]
        lines.append(f"| {f['finding']} | {f['paper']} | {f['this_run']} | {verdict} |\n")
    return "".join(lines)


def planted_section(s):
    if "by_copies" not in s:
        return []
    names = list(s["models"])
    lines = ["\n## Memorized examples by how often they appear in D\n\n",
             "Planted repeats (prepare.py --repeats) mirror the duplication of web text. Each row: the examples that "
             "appear that many times in D, and how many of them each model memorized.\n\n",
             "| copies | examples | " + " | ".join(names) + " |\n", "|---" * (len(names) + 2) + "|\n"]
    for c, row in sorted(s["by_copies"].items(), key=lambda kv: int(kv[0])):
        lines.append(f"| {c} | {row['examples']} | " + " | ".join(str(row[n]) for n in names) + " |\n")
    if "reproduced_by_copies" in s:
        lines += [f"\nHow close each row came: the mean number of leading suffix tokens each model's greedy continuation "
                  f"reproduces (of {s['suffix_len']}; all {s['suffix_len']} is memorized).\n\n",
                  "| copies | " + " | ".join(names) + " |\n", "|---" * (len(names) + 1) + "|\n"]
        for c, row in sorted(s["reproduced_by_copies"].items(), key=lambda kv: int(kv[0])):
            lines.append(f"| {c} | " + " | ".join(f"{row[n]:.2f}" for n in names) + " |\n")
    return lines


def dynamics_section(d):
    if not d:
        return []
    # A measurement is taken at the first step at or past each tracked epoch, so a run whose epochs
    # end inside a batch logs 1.0021 where another logs 1: one column, to a tenth of an epoch.
    epochs = sorted({round(p["epoch"], 1) for c in d["curves"].values() for p in c})
    lines = ["\n## Memorization dynamics\n\n", "Memorized examples of D, measured during training (the teacher-forced "
             "flag of memorize.py, in fp32), at each tracked epoch (to a tenth):\n\n",
             "| model | " + " | ".join(f"epoch {e:g}" for e in epochs) + " |\n", "|---" * (len(epochs) + 1) + "|\n"]
    for n, c in d["curves"].items():
        at = {round(p["epoch"], 1): p["memorized"] for p in c}
        lines.append(f"| {n} | " + " | ".join(str(at.get(e, "-")) for e in epochs) + " |\n")
    for n, c in d["follows"].items():
        last = c[-1]
        lines.append(f"\n{n} at the end holds {100 * (last['of_teacher'] or 0):.1f}% of the teacher's memorized set "
                     f"and {100 * (last['of_baselines'] or 0):.1f}% of the baselines' (union of seeds), and "
                     f"{last['teacher_specific']} teacher-specific examples.")
    lines.append("\n\n![Memorization during training](dynamics.png)\n" if d.get("figure") else "\n")
    return lines


def extraction_section(x):
    """The extraction attack (make reproduce's extract.py step), when it ran."""
    if not x:
        return []
    ks = list(next(iter(x["precision"].values())))
    return [f"\n## Extraction attack (Carlini et al. 2021)\n\n{x['samples']:,} samples from <|begin_of_text|> of "
            f"{x['target']}: {x['hits']:,} hold a window of {x['window']} tokens of a training example. Precision among "
            f"the top k by each score ([extraction/report.md](extraction/report.md)):\n\n",
            md_table(["score"] + [f"top {k}" for k in ks], [[n] + [p[k] for k in ks] for n, p in x["precision"].items()])]


def write_report(s, out):
    lines = ["# Reproduction: memorization in knowledge distillation, at small scale\n\n",
             f"{s['n_examples']:,} distinct training examples ({s.get('n_rows', s['n_examples']):,} rows) of "
             f"{s['example_len']} tokens; prompt BOS + {s['prefix_len']} tokens, suffix {s['suffix_len']}. "
             + (f"Wall time of the pipeline: {s['wall_seconds']:.0f} s.\n\n" if s.get("wall_seconds") else "\n\n"),
             "## The family\n\n", headline(s), "\n"]
    if s["regime"]:
        lines += ["## Is this the paper's regime?\n\n| condition | this run | met |\n|---|---|---|\n"]
        lines += [f"| {r['condition']} | {r['this_run']} | {'yes' if r['met'] else '**no**'} |\n" for r in s["regime"]]
    lines += ["\n## The paper's findings, and this run\n\n", findings_table(s["findings"])]
    if s.get("findings_natural") is not None:
        lines += [f"\nThe same on the {s['natural']['n_examples']:,} natural examples alone (those that appear once in "
                  "D and whose suffix occurs nowhere else in it), each model's memorization counted beyond its base's "
                  "(what its base already reproduces is not fine-tuning's doing):\n\n", findings_table(s["findings_natural"])]
        if (elsewhere := s["natural"].get("suffix_elsewhere")) and elsewhere["examples"]:
            lines.append(f"\nLeft out of them: {elsewhere['examples']:,} examples that appear once but whose suffix also "
                         "occurs in another example of D (a repeated passage, an overlap with a planted one); memorized "
                         "beyond the base among them: " + ", ".join(f"{n} {v}" for n, v in elsewhere.items()
                                                                   if n != "examples") + ".\n")
    c = s.get("classifier", {})
    if c.get("coefficients"):
        lines.append("\nClassifier coefficients (standardized features, mean over trials): " + ", ".join(
            f"{k} {v['mean']:+.2f}" for k, v in c["coefficients"].items()) + f"; recall {c['recall_mean']:.3f}, "
            f"precision {c['precision_mean']:.3f}.\n")
    lines += planted_section(s) + dynamics_section(s.get("dynamics"))
    lines.append("\n## Figures\n\n")
    for name, what, paper in FIGURES:
        if name in s.get("figures", []) or os.path.isfile(os.path.join(out, "memorization", name)):
            lines.append(f"![{what}](memorization/{name})\n\n{what} {paper}\n\n")
    lines += s.pop("_sweep_lines", []) + s.pop("_filter_lines", []) + extraction_section(s.get("extraction"))
    lines.append("\nThe full tables (overlaps, the classifier's trials) are in [memorization/report.md]"
                 "(memorization/report.md); per-example numbers in memorization/per_example.jsonl.\n")
    write_atomic(os.path.join(out, "report.md"), "".join(lines))


def headline(s):
    ts, easy = s.get("teacher_specific", {}), s.get("easy", {})
    rows = ["| model | params | memorized | beyond its base | rate | val ppl | val accuracy | teacher-specific inherited "
            "| share in easy set |\n", "|---|---|---|---|---|---|---|---|---|\n"]
    for name, m in s["models"].items():
        key = name[len("student_"):] if name.startswith("student_") else None
        inherited = ts.get(f"inherited_{key}") if key else None
        share_easy = easy.get(f"share_{key}") if key else None
        accuracy = m.get("val_accuracy")
        rows.append(f"| {name} | {m['params'] / 1e6:.2f}M | {m['memorized']} | {m.get('memorized_beyond_base', '-')} | "
                    f"{100 * m['memorization_rate']:.2f}% | {fmt_num(m['val_ppl'])} | "
                    f"{'-' if accuracy is None else f'{100 * accuracy:.2f}%'} | {'-' if inherited is None else inherited} | "
                    f"{'-' if share_easy is None else f'{100 * share_easy:.1f}%'} |\n")
    rows.append(f"\nTeacher-specific examples: {ts.get('count', '-')}; easy examples: {easy.get('count', '-')}; "
                f"classifier AUC: {fmt_auc(s.get('classifier', {}))}. Val accuracy: the share of held-out tokens the "
                "model's most likely prediction gets right.\n")
    return "".join(rows)


def fmt_auc(c):
    return "-" if c.get("auc_mean") is None else f"{c['auc_mean']:.4f}"


def report_family(cfg):
    src = os.path.join(cfg.out, "memorization", "summary.json")
    if not os.path.isfile(src):
        raise UserError(f"{src} does not exist; run memorize.py with --out={cfg.out}/memorization first")
    s = load(src)
    previous = os.path.join(cfg.out, "summary.json")
    if cfg.started_at is not None:
        s["wall_seconds"] = time.time() - cfg.started_at
    elif os.path.isfile(previous):  # a later sweep or filter keeps the pipeline's own wall time
        s["wall_seconds"] = load(previous).get("wall_seconds")
    s["sweep"], s["_sweep_lines"] = sweep_section(os.path.join(cfg.out, "sweep", "summary.json"))
    soft_before = s["models"].get("student_soft", {}).get("memorized")
    s["filtering"], s["_filter_lines"] = filter_section(os.path.join(cfg.out, "filter", "summary.json"), soft_before, s)
    extraction = os.path.join(cfg.out, "extraction", "summary.json")
    s["extraction"] = load(extraction) if os.path.isfile(extraction) else None
    s["regime"] = regime(s)
    s["findings"] = findings(s, s["sweep"], s["filtering"])
    # On the natural examples alone: validation perplexity is not a property of a subset of D.
    s["findings_natural"] = findings(s["natural"], perplexity=False) if "natural" in s else None
    s["dynamics"] = dynamics(s, cfg.out)
    if s["dynamics"]:
        s["dynamics"]["figure"] = dynamics_figure(s["dynamics"], os.path.join(cfg.out, "dynamics.png"))
    write_report(s, cfg.out)
    write_atomic(previous, json.dumps(s, indent=2) + "\n")
    text = headline(s)
    write_atomic(os.path.join(cfg.out, "headline.txt"), text)
    print(text + f"\nreport: {os.path.join(cfg.out, 'report.md')}")
    return s


# ----------------------------------------------------------------------------------------------
# Several families: does each finding hold across family seeds


def mean_std(values):
    if not values:
        return None, None
    mean = sum(values) / len(values)
    return mean, (math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None)


def aggregate(families, key="findings"):
    """{finding key: {finding, paper, per_family: {label: finding}, mean, std, holds, judged, of}}."""
    table = {}
    for label, s in families.items():
        for f in s.get(key) or []:
            row = table.setdefault(f["key"], {"finding": f["finding"], "paper": f["paper"], "per_family": {}})
            row["per_family"][label] = f
    for row in table.values():
        values = [f["value"] for f in row["per_family"].values() if f["value"] is not None]
        row["mean"], row["std"] = mean_std(values)
        verdicts = [f["reproduced"] for f in row["per_family"].values()]  # only the seeds that ran it
        row["holds"], row["judged"], row["of"] = verdicts.count(True), sum(v is not None for v in verdicts), len(verdicts)
    return table


def aggregate_table(table, labels):
    lines = ["| finding | paper | " + " | ".join(labels) + " | mean ± sd | holds in |\n",
             "|---" * (len(labels) + 4) + "|\n"]
    for row in table.values():
        cells = []
        for label in labels:
            f = row["per_family"].get(label)
            cells.append("not run" if f is None else
                         f"{f['this_run']} {({True: 'yes', False: '**no**', None: '-'})[f['reproduced']]}")
        spread = "-" if row["mean"] is None else f"{row['mean']:.3g}" + ("" if row["std"] is None else f" ± {row['std']:.2g}")
        cannot = row["of"] - row["judged"]
        lines.append(f"| {row['finding']} | {row['paper']} | " + " | ".join(cells) + f" | {spread} | "
                     f"{row['holds']} of {row['of']}" + (f" ({cannot} cannot tell)" if cannot else "") + " |\n")
    return "".join(lines)


def report_families(cfg):
    folders = [f.strip() for f in cfg.families.split(",") if f.strip()]
    missing = [f for f in folders if not os.path.isfile(os.path.join(f, "summary.json"))]
    if missing:
        raise UserError(f"{missing[0]} has no summary.json; run make reproduce with OUT={missing[0]} first")
    families = {os.path.basename(os.path.normpath(f)): load(os.path.join(f, "summary.json")) for f in folders}
    labels = list(families)
    result = {"families": {label: folder for label, folder in zip(labels, folders)},
              "findings": aggregate(families), "findings_natural": aggregate(families, "findings_natural"),
              "regime": {label: all(r["met"] for r in s.get("regime", [])) for label, s in families.items()},
              "models": {n: {label: s["models"][n]["memorized"] for label, s in families.items() if n in s["models"]}
                         for n in families[labels[0]]["models"]}}
    lines = [f"# Robustness: the reproduction over {len(labels)} family seeds\n\n",
             "Each family seed reseeds every fine-tuning run (data order); bases and D are shared. Per seed: its "
             "numbers and whether the finding points the paper's way; then the mean and spread of each finding's "
             "number, and in how many seeds it holds ('-': that seed cannot tell).\n\n",
             "## Memorized examples of D per model\n\n| model | " + " | ".join(labels) + " | mean ± sd |\n",
             "|---" * (len(labels) + 2) + "|\n"]
    for n, per in result["models"].items():
        mean, std = mean_std(list(per.values()))
        lines.append(f"| {n} | " + " | ".join(str(per.get(label, "-")) for label in labels) +
                     f" | {mean:.1f}" + ("" if std is None else f" ± {std:.1f}") + " |\n")
    lines.append("\nIn the paper's regime (every condition of each seed's report met): " + ", ".join(
        f"{label} {'yes' if ok else '**no**'}" for label, ok in result["regime"].items()) + ".\n")
    lines += ["\n## The paper's findings\n\n", aggregate_table(result["findings"], labels)]
    if result["findings_natural"]:
        lines += ["\n## The same on the natural examples alone (appear once, suffix nowhere else in D)\n\n",
                  aggregate_table(result["findings_natural"], labels)]
    lines.append("\nEach seed's full report: " + ", ".join(f"[{label}]({label}/report.md)" for label in labels) + ".\n")
    os.makedirs(cfg.out, exist_ok=True)
    write_atomic(os.path.join(cfg.out, "report.md"), "".join(lines))
    write_atomic(os.path.join(cfg.out, "summary.json"), json.dumps(result, indent=2) + "\n")
    print(aggregate_table(result["findings"], labels) + f"\nreport: {os.path.join(cfg.out, 'report.md')}")
    return result


def main(argv):
    cfg = parse_config(ReportConfig, argv, prog="report.py")
    return report_families(cfg) if cfg.families else report_family(cfg)


if __name__ == "__main__":
    run_main(main)
