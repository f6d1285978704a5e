"""zslfast.metrics on hand-computed cases (per-class vs per-sample accuracy, absent classes, CZSL restriction,
calibrated stacking flipping predictions, H), and against a plain loop on random predictions."""

import numpy as np
import pytest
import torch

from zslfast.metrics import (
    GZSLResult,
    calibrated_stacking,
    czsl_accuracy,
    gamma_sweep,
    gzsl_accuracy,
    per_class_accuracy,
)


def loop_per_class_accuracy(pred, labels, classes):
    accs = []
    for c in classes:
        idx = [i for i, y in enumerate(labels) if y == c]
        if idx:
            accs.append(sum(pred[i] == c for i in idx) / len(idx))
    return sum(accs) / len(accs) if accs else 0.0


def test_per_class_accuracy_is_a_mean_over_classes_not_samples():
    labels = torch.tensor([0, 0, 0, 1, 2, 2])
    pred = torch.tensor([0, 1, 0, 1, 0, 2])
    # class 0: 2/3, class 1: 1/1, class 2: 1/2 -> 13/18 (per-sample accuracy would be 4/6)
    assert per_class_accuracy(pred, labels) == pytest.approx(13 / 18, abs=1e-12)
    assert per_class_accuracy(pred.numpy(), labels.numpy()) == pytest.approx(13 / 18, abs=1e-12)
    assert per_class_accuracy(pred.tolist(), labels.tolist()) == pytest.approx(13 / 18, abs=1e-12)


def test_per_class_accuracy_leaves_absent_classes_out():
    labels = torch.tensor([0, 0, 0, 1, 2, 2])
    pred = torch.tensor([0, 1, 0, 1, 0, 2])
    assert per_class_accuracy(pred, labels, classes=[0, 1, 2, 7]) == pytest.approx(13 / 18, abs=1e-12)
    assert per_class_accuracy(pred, labels, classes=[0]) == pytest.approx(2 / 3, abs=1e-12)
    assert per_class_accuracy(pred, labels, classes=[1, 2]) == pytest.approx(3 / 4, abs=1e-12)
    assert per_class_accuracy(pred, labels, classes=[5, 6]) == 0.0
    assert per_class_accuracy(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long)) == 0.0


def test_per_class_accuracy_matches_a_loop(generator):
    for _ in range(5):
        labels = torch.randint(0, 9, (57,), generator=generator)
        noise = torch.randint(0, 12, (57,), generator=generator)
        pred = torch.where(torch.rand(57, generator=generator) < 0.6, labels, noise)
        classes = [0, 2, 3, 5, 8, 11]
        expected = loop_per_class_accuracy(pred.tolist(), labels.tolist(), classes)
        assert per_class_accuracy(pred, labels, classes) == pytest.approx(expected, abs=1e-12)
        expected = loop_per_class_accuracy(pred.tolist(), labels.tolist(), sorted(set(labels.tolist())))
        assert per_class_accuracy(pred, labels) == pytest.approx(expected, abs=1e-12)


def test_per_class_accuracy_rejects_bad_input():
    with pytest.raises(TypeError, match="integer"):
        per_class_accuracy(torch.tensor([0.0, 1.0]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="same shape"):
        per_class_accuracy(torch.tensor([0, 1, 1]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=">= 0"):
        per_class_accuracy(torch.tensor([0, 1]), torch.tensor([0, -1]))


def test_czsl_restricts_the_prediction_to_unseen_classes():
    # Classes 0, 1 seen; 2, 3 unseen. The seen columns win the global argmax everywhere.
    scores = torch.tensor([
        [9.0, 0.0, 0.5, 0.1],  # -> 2 (correct)
        [0.0, 9.0, 0.2, 0.3],  # -> 3 (wrong, label 2)
        [9.0, 9.0, 0.0, 1.0],  # -> 3 (correct)
    ])
    labels = torch.tensor([2, 2, 3])
    assert czsl_accuracy(scores, labels, [2, 3]) == pytest.approx((1 / 2 + 1) / 2)
    assert czsl_accuracy(scores.numpy(), labels.numpy(), np.array([3, 2])) == pytest.approx(0.75)
    with pytest.raises(ValueError, match=r"czsl_accuracy: unseen_classes must be class ids in \[0, 4\)"):
        czsl_accuracy(scores, labels, [2, 4])


def test_calibrated_stacking_subtracts_gamma_from_seen_columns_only():
    scores = torch.tensor([[3.0, 1.0, 2.5], [0.0, 4.0, 1.0]])
    out = calibrated_stacking(scores, [0, 1], 1.0)
    assert torch.equal(out, torch.tensor([[2.0, 0.0, 2.5], [-1.0, 3.0, 1.0]]))
    assert torch.equal(scores, torch.tensor([[3.0, 1.0, 2.5], [0.0, 4.0, 1.0]]))  # input untouched
    assert out.argmax(1).tolist() == [2, 1]  # the first prediction flips to the unseen class
    assert scores.argmax(1).tolist() == [0, 1]


def gzsl_case():
    # seen classes 0, 1; unseen classes 2, 3. With gamma g subtracted from columns 0 and 1:
    scores_seen = torch.tensor([
        [2.0, 0.0, 1.5, 0.0],  # y=0: correct while g < 0.5
        [0.0, 3.0, 0.0, 1.5],  # y=1: correct while g < 1.5
        [0.0, 2.5, 0.0, 0.0],  # y=1: correct while g < 2.5
    ])
    labels_seen = torch.tensor([0, 1, 1])
    scores_unseen = torch.tensor([
        [1.0, 0.0, 0.2, 0.0],  # y=2: correct once g > 0.8
        [0.0, 0.0, 0.0, 1.0],  # y=3: always correct
        [0.0, 2.5, 0.0, 1.0],  # y=3: correct once g > 1.5
    ])
    labels_unseen = torch.tensor([2, 3, 3])
    return scores_seen, labels_seen, scores_unseen, labels_unseen, [0, 1], [2, 3]


def test_gzsl_u_s_h_hand_computed():
    case = gzsl_case()
    r = gzsl_accuracy(*case)  # the default, gamma 0: the plain argmax, the protocol the three papers' texts give
    # gamma 0: S = (1 + 1)/2 = 1; U = (0 + 1/2)/2 = 1/4; H = 2 * 1/4 / (5/4) = 0.4
    assert isinstance(r, GZSLResult)
    assert (r.u, r.s, r.h) == pytest.approx((0.25, 1.0, 0.4))
    r = gzsl_accuracy(*case, gamma=1.0)
    # gamma 1: S = (0 + 1)/2 = 1/2; U = (1 + 1/2)/2 = 3/4; H = 2 * 3/8 / (5/4) = 0.6
    assert (r.u, r.s, r.h) == pytest.approx((0.75, 0.5, 0.6))
    u, s, h = gzsl_accuracy(*case, gamma=2.0)
    # gamma 2: S = (0 + 1/2)/2 = 1/4; U = 1; H = 2 * 1/4 / (5/4) = 0.4
    assert (u, s, h) == pytest.approx((1.0, 0.25, 0.4))
    # gamma 0.6: S = 1/2, U = 1/4, H = 1/3
    assert gzsl_accuracy(*case, gamma=0.6) == pytest.approx((0.25, 0.5, 1 / 3))


def test_h_is_zero_when_both_accuracies_are_zero():
    scores = torch.tensor([[0.0, 1.0, 0.0]])
    # seen test image of class 0 predicted 1; unseen image of class 2 predicted 1
    r = gzsl_accuracy(scores, torch.tensor([0]), scores, torch.tensor([2]), [0, 1], [2])
    assert r == (0.0, 0.0, 0.0)


def test_gzsl_rejects_overlapping_class_sets_and_shape_mismatch():
    case = list(gzsl_case())
    with pytest.raises(ValueError, match="overlap"):
        gzsl_accuracy(*case[:4], [0, 1, 2], [2, 3])
    with pytest.raises(ValueError, match="disagree on N"):
        gzsl_accuracy(case[0], case[1][:2], *case[2:])


def test_gamma_sweep_picks_the_best_h():
    case = gzsl_case()
    best, gamma, results = gamma_sweep(*case, gammas=[0.0, 1.0, 2.0])
    assert gamma == 1.0 and best == results[1]
    assert [r.h for r in results] == pytest.approx([0.4, 0.6, 0.4])
    best, gamma, _ = gamma_sweep(*case, gammas=torch.tensor([2.0, 0.0]))  # tie: the first gamma wins
    assert gamma == 2.0 and best.h == pytest.approx(0.4)
    best, gamma, results = gamma_sweep(*case)  # default grid over the score range
    assert len(results) == 41 and best.h == pytest.approx(0.6) and 0.8 < gamma < 1.5


def test_gzsl_matches_a_loop_on_random_scores(generator):
    C, seen, unseen = 9, [0, 2, 3, 5, 7], [1, 4, 6, 8]
    scores_s = torch.randn(40, C, generator=generator)
    labels_s = torch.tensor(seen)[torch.randint(0, 5, (40,), generator=generator)]
    scores_u = torch.randn(30, C, generator=generator)
    labels_u = torch.tensor(unseen)[torch.randint(0, 4, (30,), generator=generator)]
    gamma = 0.3
    def predict(row):
        adjusted = [v - gamma if c in seen else v for c, v in enumerate(row)]
        return max(range(C), key=lambda c: adjusted[c])
    s = loop_per_class_accuracy([predict(r) for r in scores_s.tolist()], labels_s.tolist(), seen)
    u = loop_per_class_accuracy([predict(r) for r in scores_u.tolist()], labels_u.tolist(), unseen)
    r = gzsl_accuracy(scores_s, labels_s, scores_u, labels_u, seen, unseen, gamma)
    assert (r.u, r.s, r.h) == pytest.approx((u, s, 2 * u * s / (u + s)), abs=1e-12)
