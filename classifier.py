"""
Predicting which examples a model memorizes from per-example features, in numpy only: L2 logistic
regression fitted by Newton's method, ROC curve and AUC, and the protocol of Borkar et al. (2026):
all positives, 1:3 negatives resampled per trial, 30% held out, 100 trials. memorize.py feeds it the
pre-distillation features (zlib entropy, teacher and baseline perplexity, their KL).
"""

import numpy as np


def sigmoid(z):
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # no overflow for large |z|


def fit_logistic(X, y, l2=1.0, max_iter=100):
    """Weights [intercept, w_1..w_d] minimizing sum of log-losses + l2/2 |w|^2 (intercept free), by
    Newton's method with backtracking. l2 = 1 is scikit-learn's default (C = 1); it keeps the weights
    finite on separable data."""
    A = np.hstack([np.ones((len(X), 1)), X])
    reg = np.full(A.shape[1], float(l2))
    reg[0] = 0.0

    def loss(w):
        z = A @ w
        return np.sum(np.logaddexp(0.0, z) - y * z) + 0.5 * np.sum(reg * w * w)

    w = np.zeros(A.shape[1])
    for _ in range(max_iter):
        p = sigmoid(A @ w)
        grad = A.T @ (p - y) + reg * w
        hess = (A.T * (p * (1 - p))) @ A + np.diag(reg) + 1e-9 * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        t, f0 = 1.0, loss(w)
        while loss(w - t * step) > f0 - 1e-4 * t * (grad @ step) and t > 1e-6:
            t /= 2
        w = w - t * step
        if np.abs(t * step).max() < 1e-9:
            break
    return w


def predict_proba(w, X):
    return sigmoid(w[0] + X @ w[1:])


def fit_standardized(X, y):
    """Standardize the features with X's mean and std, fit; returns the weights (on standardized
    features) and a function that gives the probability of new rows."""
    mu, sd = X.mean(0), X.std(0)
    sd = np.where(sd > 0, sd, 1.0)
    w = fit_logistic((X - mu) / sd, np.asarray(y, dtype=np.float64))
    return w, lambda Z: predict_proba(w, (Z - mu) / sd)


def auc_roc(scores, labels):
    """Area under the ROC curve = P(score of a random positive > that of a random negative), ties
    counted half (the Mann-Whitney statistic from average ranks)."""
    labels = np.asarray(labels, dtype=bool)
    n_pos, n_neg = labels.sum(), (~labels).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inverse]  # average 1-based rank of each value
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_curve(scores, labels):
    """(false positive rates, true positive rates) at every distinct threshold, from (0, 0) to (1, 1)."""
    labels = np.asarray(labels, dtype=bool)
    order = np.argsort(-scores, kind="stable")
    s, l = scores[order], labels[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each distinct score
    tp, fp = np.cumsum(l)[last], np.cumsum(~l)[last]
    return np.r_[0, fp / max(fp[-1], 1)], np.r_[0, tp / max(tp[-1], 1)]


def classifier_trials(X, y, feature_names, trials=100, neg_ratio=3, test_fraction=0.3, min_positives=10, seed=0):
    """The paper's protocol: all positives, neg_ratio negatives per positive sampled anew each trial,
    test_fraction of each class held out, features standardized on the training part. Returns AUC,
    recall and precision (threshold 0.5) as mean and std over trials, the standardized coefficients
    and the mean ROC curve; a "skipped: ..." status, numbers null, when there are too few examples."""
    y = np.asarray(y, dtype=bool)
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    n_neg = min(len(neg), neg_ratio * len(pos))
    out = {"features": list(feature_names), "n_positives": int(len(pos)), "n_negatives": int(n_neg),
           "trials": trials, "test_fraction": test_fraction, "auc_mean": None, "auc_std": None, "recall_mean": None, "recall_std": None,
           "precision_mean": None, "precision_std": None, "coefficients": None, "roc": None}
    if len(pos) < max(min_positives, 2) or n_neg < 2:
        out["status"] = (f"skipped: the student memorized {len(pos)} examples and not {len(neg)}; the classifier "
                         f"needs at least {max(min_positives, 2)} memorized (--classifier_min_positives) and 2 not")
        return out
    rng = np.random.default_rng(seed)
    aucs, recalls, precisions, coefs, tprs = [], [], [], [], []
    grid = np.linspace(0, 1, 101)
    for _ in range(trials):
        train, test = [], []
        for group in (rng.permutation(pos), rng.choice(neg, n_neg, replace=False)):
            k = min(max(1, round(test_fraction * len(group))), len(group) - 1)
            test.append(group[:k])
            train.append(group[k:])
        train, test = np.concatenate(train), np.concatenate(test)
        w, predict = fit_standardized(X[train], y[train])
        p = predict(X[test])
        predicted, truth = p >= 0.5, y[test]
        aucs.append(auc_roc(p, truth))
        recalls.append((predicted & truth).sum() / truth.sum())
        precisions.append((predicted & truth).sum() / predicted.sum() if predicted.any() else 0.0)
        coefs.append(w[1:])
        fpr, tpr = roc_curve(p, truth)
        tprs.append(np.interp(grid, fpr, tpr))
    coefs = np.array(coefs)
    out.update(status="ok", auc_mean=float(np.mean(aucs)), auc_std=float(np.std(aucs)),
               recall_mean=float(np.mean(recalls)), recall_std=float(np.std(recalls)),
               precision_mean=float(np.mean(precisions)), precision_std=float(np.std(precisions)),
               coefficients={f: {"mean": float(coefs[:, i].mean()), "std": float(coefs[:, i].std())}
                             for i, f in enumerate(feature_names)},
               roc={"fpr": grid.tolist(), "tpr": np.mean(tprs, 0).tolist()})
    return out


def at_risk_probability(X, y, neg_ratio=3, seed=0):
    """Fit once on all positives and neg_ratio negatives per positive, then score every example.
    Trained at a 1:neg_ratio balance, the model overestimates risk where positives are rarer:
    it flags more than it should, the safe side for a filter."""
    y = np.asarray(y, dtype=bool)
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    rng = np.random.default_rng(seed)
    rows = np.concatenate([pos, rng.choice(neg, min(len(neg), neg_ratio * len(pos)), replace=False)])
    return fit_standardized(X[rows], y[rows])[1](X)
