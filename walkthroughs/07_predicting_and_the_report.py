# %% [markdown]
# # 7. Predicting memorization, and reading the report
#
# Borkar et al. (2026) predict, **before** distilling, which training examples the student will
# memorize: a logistic regression on four features computed from the teacher and the baseline alone
# (zlib entropy of the example, the teacher's and the baseline's log-perplexity, and the KL divergence
# between them), evaluated by AUC over 100 resampled trials. Then a reproduction's report compares
# every finding with the paper's by a stated rule.
#
# This chapter fits the logistic regression and computes the AUC by hand and checks them against
# `classifier.py`, runs the paper's trial protocol on the tiny family of chapter 6, and reads that
# family's report finding by finding. If you ran `make reproduce`, it reads that report instead.
# Run chapter 6 first. A few seconds.

# %%
import lesson  # first: it puts the project's files (model.py, train.py, ...) on the path

import json
import os

import numpy as np

import classifier
import memorize
import report

check = lesson.Checks("07")
family = os.path.join(lesson.SCRATCH, "06_family")
if not os.path.isfile(os.path.join(family, "memorization", "per_example.jsonl")):
    raise SystemExit("run walkthroughs/06_memorization.py first: this chapter reads the family it trains")

# %% [markdown]
# ## Logistic regression, by hand
#
# P(memorized | x) = sigmoid(w0 + w . x). The weights minimize the log-loss plus an L2 penalty
# (strength 1, scikit-learn's default; the intercept is not penalized). The loss is convex and
# smooth, and Newton's method (w -= H^-1 g: jump to the minimum of the loss's quadratic
# approximation) reaches its minimum from zero in a few steps here; `classifier.fit_logistic` adds a
# line search, which guarantees progress where a full step would overshoot.

# %%
rng = np.random.default_rng(0)
X = rng.normal(size=(1000, 3))
y = (X @ [2.0, -1.0, 0.0] + 0.5 * rng.normal(size=1000) > 0).astype(float)  # the 3rd feature is noise


def fit_by_hand(X, y, l2=1.0, steps=25):
    A = np.hstack([np.ones((len(X), 1)), X])  # a column of ones: the intercept
    penalty = np.r_[0.0, np.full(X.shape[1], l2)]
    w = np.zeros(A.shape[1])
    for _ in range(steps):
        p = 1 / (1 + np.exp(-A @ w))
        gradient = A.T @ (p - y) + penalty * w
        hessian = (A.T * (p * (1 - p))) @ A + np.diag(penalty)
        w -= np.linalg.solve(hessian, gradient)
    return w


ours, theirs = fit_by_hand(X, y), classifier.fit_logistic(X, y)
print("weights (intercept first):", np.round(ours, 3))
check.close("Newton's method by hand reaches classifier.fit_logistic's weights", ours, theirs, rtol=1e-6, atol=1e-6)
check("the irrelevant third feature gets a weight near 0, the others their signs",
      ours[1] > 1 and ours[2] < -0.5 and abs(ours[3]) < 0.1)

# %% [markdown]
# ## AUC, by hand
#
# The area under the ROC curve is the probability that a random positive scores above a random
# negative (a tie counts half): 1 is a perfect ranking, 0.5 a coin.

# %%
scores = classifier.predict_proba(ours, X)
pos, neg = scores[y == 1], scores[y == 0]
auc = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (len(pos) * len(neg))
check.close("the fraction of correctly ordered pairs equals classifier.auc_roc", auc, classifier.auc_roc(scores, y))

# %% [markdown]
# ## The paper's protocol, on chapter 6's family
#
# Positives: every example the soft student memorized. Negatives: three times as many, drawn anew
# in each trial from those it did not. 30% of each is held out; features are standardized on the
# rest; the AUC is measured on the held-out part; 100 trials (20 here), mean and spread.

# %%
cols = {}
for r in map(json.loads, open(os.path.join(family, "memorization", "per_example.jsonl"))):
    for key, value in r.items():
        if isinstance(value, dict):
            for k, v in value.items():
                cols.setdefault(f"{key}.{k}", []).append(v)
        else:
            cols.setdefault(key, []).append(value)
cols = {k: np.array(v) for k, v in cols.items()}
features = memorize.classifier_features(cols, "baseline")  # zlib, teacher and baseline log-ppl, KL
label = cols["student_soft.memorized"].astype(bool)
trials = classifier.classifier_trials(features, label, memorize.FEATURES, trials=20, min_positives=3, seed=0)
print(f"{trials['n_positives']} positives, {trials['n_negatives']} negatives per trial; "
      f"AUC {trials['auc_mean']:.3f} ± {trials['auc_std']:.3f}")
for name, c in trials["coefficients"].items():
    print(f"  {name:>20}: {c['mean']:+.2f}")
check("three negatives per positive (or all there are)",
      trials["n_negatives"] == min(3 * trials["n_positives"], int((~label).sum())))
check("the features predict the soft student's memorization far better than a coin", trials["auc_mean"] > 0.8)

# %% [markdown]
# ## Reading a report
#
# `report.py` puts a family's numbers next to the paper's, finding by finding, each judged by a rule
# stated in its text ("the soft student memorizes less than the baseline", "at least 90% of what it
# memorizes is easy", ...). A finding the run cannot judge (a student that memorized nothing, say)
# says so instead of counting as reproduced. With `make reproduce` done, the real report is read.

# %%
real = os.path.join(lesson.ROOT, "out", "reproduce", "summary.json")
if os.path.isfile(real):  # make reproduce's report, read as it is (this chapter never rewrites it)
    out = os.path.dirname(real)
    with open(real) as f:
        s = json.load(f)
else:  # the report of chapter 6's family, written into its scratch folder
    out = family
    s = report.main([f"--out={family}"])
print(f"\nreading {os.path.relpath(out, lesson.ROOT)}/report.md\n")
meaning = {
    "less": "distillation reduces memorization: count the examples each reproduces",
    "perplexity": "... and not by being a worse model: validation perplexity no higher",
    "easy": "what the student memorizes, the teacher and a baseline memorized too: easy, predictable examples",
    "inherited": "of what only the teacher memorized (teacher-specific), the soft student takes almost nothing",
    "hard_over_soft": "training on the teacher's own words (hard) passes on more teacher-specific examples",
    "auc": "the classifier above, on the soft student (memorize.py's own trials and seed: a slightly different AUC)",
    "zlib": "compressible text (low zlib entropy) is at more risk: a negative coefficient",
    "zlib_ratio": "the same with compressed / raw bytes, which does not grow with the text's length",
}
for f in s["findings"]:
    verdict = {True: "same direction as the paper", False: "NOT the paper's direction", None: "cannot tell"}[f["reproduced"]]
    print(f"- {f['finding']}\n    paper: {f['paper']}; this run: {f['this_run']} -> {verdict}\n    "
          f"({meaning.get(f['key'], '')})")
m = s["models"]
less = next(f for f in s["findings"] if f["key"] == "less")
rule = m["student_soft"]["memorized"] < m["baseline"]["memorized"] if m["baseline"]["memorized"] else None
check("the 'less' finding's verdict is the rule applied to the counts (none to compare: cannot tell)",
      less["reproduced"] == rule)
easy = next(f for f in s["findings"] if f["key"] == "easy")
check("the 'easy' share is the soft student's memorized examples that are easy, over all it memorized",
      easy["value"] is None or abs(easy["value"] - s["easy"]["share_soft"]) < 1e-12)

# %% [markdown]
# **Where memorization comes from at this scale.** Look at the report's table "Memorized examples by
# how often they appear in D". The paper's data has no duplicates: what its models memorize is
# natural, predictable text seen once. Small models trained for a few epochs on a few thousand
# examples memorize almost nothing they saw once; what they memorize is what was planted several
# times. So a small-scale run mostly answers "does distillation reduce the memorization of repeated
# text?", and the findings on natural examples alone (the table after the findings) are what would
# answer the paper's own question. "How close each row came", under the table by copies, says how far
# from memorized each stratum ended: the leading suffix tokens each model's greedy continuation gets
# right.

# %%
if "by_copies" in s:
    for c, row in sorted(s["by_copies"].items(), key=lambda kv: int(kv[0])):
        print(f"seen {c:>2} time(s): {row['examples']:>4} examples, teacher memorized {row['teacher']}")
    once = s["by_copies"]["1"]
    check("once-seen examples are memorized at a lower rate than planted ones, by the teacher",
          once["teacher"] / once["examples"] < min(r["teacher"] / r["examples"] for c, r in s["by_copies"].items() if c != "1"))

check.done()

# %% [markdown]
# ## Exercises
#
# 1. Drop the KL feature (the 4th column) and run the trials again. Check how much the AUC changes.
# 2. Label the *hard* student's memorization instead of the soft one's. Check whether the same
#    features predict it as well (AUC above 0.8?).
# 3. In `report.py`, the "easy" finding holds when at least 90% of the soft student's memorized
#    examples are easy. For chapter 6's family, compute that share yourself from `cols` (the soft
#    student's memorized examples that the teacher and the baseline memorized too) and check it equals
#    `report.main([f"--out={family}"])["easy"]["share_soft"]`. (`make reproduce`'s easy set counts an
#    example the teacher and any of its three baseline seeds memorized.)
