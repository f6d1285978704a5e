"""ZSL evaluation as in Xian et al. 2017: per-class mean top-1 accuracy, conventional ZSL (CZSL) over the unseen
classes, and generalized ZSL (GZSL) U, S, H; zslfast adds calibrated stacking (Chao et al. 2016).

What the papers report: ILPG follows Xian et al. 2017 (average per-class top-1; CZSL on the unseen images; GZSL
S, U and H); SVIP measures top-1 accuracy in ZSL and GZSL (S, U, H) following Xian et al.; SAGE reports A_zsl,
A_u, A_s and H. None of the three texts mentions calibrated stacking: their protocol is the plain argmax,
``gzsl_accuracy``'s default gamma=0. SVIP's released code also reports "stacked" accuracies (a bias swept over
[-1, 1) added to the unseen classes' softmax probabilities, the best H on the test images). ``gamma`` > 0 and
``gamma_sweep`` are calibrated stacking; a gamma chosen on the test split gives an optimistic H.

    per_class_accuracy(pred (N,), labels (N,), classes=None)   mean over the classes present of each class's top-1
    czsl_accuracy(scores (N, C), labels (N,), unseen_classes)  argmax restricted to the unseen classes' columns
    calibrated_stacking(scores (N, C), seen_classes, gamma)    scores with gamma subtracted from the seen columns
    gzsl_accuracy(scores_seen_test (Ns, C), labels_seen_test, scores_unseen_test (Nu, C), labels_unseen_test,
                  seen_classes, unseen_classes, gamma=0.0)    -> GZSLResult(u, s, h)
        argmax over all C classes after calibrated stacking; S = per-class accuracy of the test-seen images over
        the seen classes, U = that of the test-unseen images over the unseen classes, H = 2 U S / (U + S) (0 when
        U + S = 0)
    gamma_sweep(..., gammas)                                   -> (best GZSLResult by H, its gamma, all results)

Inputs may be torch tensors, numpy arrays or lists; class ids are 0-based column indices of ``scores``. Bad input
(float labels, class ids outside the columns, a NaN score, a NaN or inf gamma) raises TypeError/ValueError naming
the function and the argument (zslfast.validation); -inf scores (a class masked out) are allowed.
Accuracies are fractions in [0, 1], returned as Python floats.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch

from .validation import as_integer_tensor, as_scores, check_class_ids, check_number, shape_str


class GZSLResult(NamedTuple):
    """GZSL accuracies: u (unseen), s (seen), h (harmonic mean), fractions in [0, 1]."""

    u: float
    s: float
    h: float


def per_class_accuracy(pred, labels, classes=None) -> float:
    """Mean over classes of each class's top-1 accuracy (Xian et al. 2017, Eq. "acc_Y").

    pred (N,) predicted class ids, labels (N,) true ones. ``classes``: the classes to average over; those with no
    sample in ``labels`` are left out (absent classes do not count as 0). None: every class present in labels.
    Samples whose label is not in ``classes`` are ignored. 0.0 when no class is present.
    """
    fn = "per_class_accuracy"
    pred = as_integer_tensor(fn, "pred", pred)
    labels = as_integer_tensor(fn, "labels", labels).to(pred.device)
    if pred.shape != labels.shape:
        raise ValueError(f"{fn}: pred and labels must have the same shape, got {shape_str(pred)} and {shape_str(labels)}")
    if labels.numel() == 0:
        return 0.0
    if int(labels.min()) < 0:
        raise ValueError(f"{fn}: labels must be class ids >= 0, got {int(labels.min())}")
    if classes is None:
        classes = torch.unique(labels)
    else:
        classes = torch.unique(as_integer_tensor(fn, "classes", classes).to(labels.device))
    if classes.numel() == 0:
        return 0.0
    if int(classes.min()) < 0:
        raise ValueError(f"{fn}: classes must be class ids >= 0, got {int(classes.min())}")
    size = int(max(int(labels.max()), int(classes.max()))) + 1
    keep = torch.isin(labels, classes)
    labels, pred = labels[keep], pred[keep]
    total = torch.bincount(labels, minlength=size).double()
    correct = torch.bincount(labels[pred == labels], minlength=size).double()
    total, correct = total[classes], correct[classes]
    present = total > 0
    if not bool(present.any()):
        return 0.0
    return float((correct[present] / total[present]).mean())


def czsl_accuracy(scores, labels, unseen_classes) -> float:
    """Conventional ZSL: per-class accuracy with the prediction restricted to the unseen classes.

    scores (N, C) over all classes (column c = class c), labels (N,) of unseen-class images, unseen_classes the
    candidate ids. The prediction is the unseen class with the highest score.
    """
    fn = "czsl_accuracy"
    scores = as_scores(fn, "scores", scores)
    labels = as_integer_tensor(fn, "labels", labels).to(scores.device)
    unseen = check_class_ids(fn, "unseen_classes", unseen_classes, scores.shape[1], scores.device)
    if labels.shape[0] != scores.shape[0]:
        raise ValueError(f"{fn}: scores {shape_str(scores)} and labels {shape_str(labels)} disagree on N")
    pred = unseen[scores[:, unseen].argmax(dim=1)]
    return per_class_accuracy(pred, labels, unseen)


def calibrated_stacking(scores, seen_classes, gamma: float):
    """Calibrated stacking (Chao et al. 2016): ``scores`` (N, C) with ``gamma`` subtracted from the seen columns.

    Returns a new tensor (the input is not modified); a larger gamma moves predictions towards unseen classes.
    """
    fn = "calibrated_stacking"
    scores = as_scores(fn, "scores", scores)
    seen = check_class_ids(fn, "seen_classes", seen_classes, scores.shape[1], scores.device)
    gamma = check_number(fn, "gamma", gamma)
    out = scores.clone()
    out[:, seen] -= gamma
    return out


def _harmonic(u: float, s: float) -> float:
    return 0.0 if u + s == 0 else 2.0 * u * s / (u + s)


def gzsl_accuracy(
    scores_seen_test,
    labels_seen_test,
    scores_unseen_test,
    labels_unseen_test,
    seen_classes,
    unseen_classes,
    gamma: float = 0.0,
) -> GZSLResult:
    """GZSL U, S, H: predict over all classes after subtracting ``gamma`` from the seen-class scores.

    scores_* (N*, C) over all C classes, labels_* (N*,); S is the per-class accuracy of the test-seen images over
    ``seen_classes``, U that of the test-unseen images over ``unseen_classes``, H = 2US/(U+S) (0 if U+S = 0).
    """
    fn = "gzsl_accuracy"
    seen = check_class_ids(fn, "seen_classes", seen_classes, None)
    unseen = check_class_ids(fn, "unseen_classes", unseen_classes, None)
    check_number(fn, "gamma", gamma)
    if bool(torch.isin(seen, unseen).any()):
        raise ValueError(f"{fn}: seen_classes and unseen_classes overlap")
    accs = []
    for which, scores, labels, classes in (
        ("seen", scores_seen_test, labels_seen_test, seen),
        ("unseen", scores_unseen_test, labels_unseen_test, unseen),
    ):
        scores = as_scores(fn, f"scores_{which}_test", scores)
        labels = as_integer_tensor(fn, f"labels_{which}_test", labels).to(scores.device)
        if labels.shape[0] != scores.shape[0]:
            raise ValueError(
                f"{fn}: scores_{which}_test {shape_str(scores)} and labels_{which}_test {shape_str(labels)} disagree on N"
            )
        check_class_ids(fn, "seen_classes", seen, scores.shape[1])
        check_class_ids(fn, "unseen_classes", unseen, scores.shape[1])
        pred = calibrated_stacking(scores, seen.to(scores.device), gamma).argmax(dim=1)
        accs.append(per_class_accuracy(pred, labels, classes.to(scores.device)))
    s, u = accs
    return GZSLResult(u=u, s=s, h=_harmonic(u, s))


def gamma_sweep(
    scores_seen_test,
    labels_seen_test,
    scores_unseen_test,
    labels_unseen_test,
    seen_classes,
    unseen_classes,
    gammas: Optional[Sequence[float]] = None,
) -> tuple[GZSLResult, float, list]:
    """``gzsl_accuracy`` for each gamma; returns (the result with the best H, its gamma, every result in order).

    Ties go to the first gamma. ``gammas`` None: 41 values evenly spaced over [0, spread], spread the largest
    per-row score range seen in the inputs (a search range that scales with the scores). Tune gamma on a
    validation split in real experiments; sweeping on the test split reports an upper bound.
    """
    if gammas is None:
        spread = max(
            float((s.max(dim=1).values - s.min(dim=1).values).max())
            for s in (
                as_scores("gamma_sweep", "scores_seen_test", scores_seen_test),
                as_scores("gamma_sweep", "scores_unseen_test", scores_unseen_test),
            )
        )
        gammas = torch.linspace(0.0, spread, 41).tolist()
    gammas = [check_number("gamma_sweep", "gammas", float(g)) for g in torch.as_tensor(gammas).reshape(-1).tolist()]
    if not gammas:
        raise ValueError("gamma_sweep: gammas is empty")
    results = [
        gzsl_accuracy(scores_seen_test, labels_seen_test, scores_unseen_test, labels_unseen_test, seen_classes,
                      unseen_classes, gamma)
        for gamma in gammas
    ]
    best = max(range(len(results)), key=lambda i: (results[i].h, -i))
    return results[best], gammas[best], results
