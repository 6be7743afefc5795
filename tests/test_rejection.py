"""Rejection performance (the paper's Fig. 10 measure), checked against cases worked out by
hand: the least confident patterns rejected first, equal margins together, the smallest
share that leaves at most the target error on the rest."""

from __future__ import annotations

import json

import chex
import jax
import numpy as np
import pytest
from test_plots import near, pixels

from lenet_jax import plots, pretrained
from lenet_jax.cli.evaluate import format_report
from lenet_jax.cli.evaluate import main as eval_main
from lenet_jax.factories import make_model
from lenet_jax.predict import predict_digits
from lenet_jax.rejection import model_rejection, rejection, rejection_curve, score_set


def case(margins: list[float], wrong: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Margins, predictions and labels with the patterns of ``wrong`` misclassified."""
    labels = np.zeros(len(margins), np.int32)
    predictions = labels.copy()
    predictions[wrong] = 1
    return np.asarray(margins), predictions, labels


# Ten patterns, three wrong (indices 1, 3, 8). By margin, smallest first:
#   order   1(W) 5  3(W) 7  2  8(W) 4  6  0  9
#   margin  .1  .2  .3  .4 .5  .6  .7 .8 .9 1.0
# Errors on the kept after rejecting k: k=0 3/10=0.3, k=1 2/9=0.222, k=2 2/8=0.25,
# k=3 1/7=0.143, k=4 1/6=0.167, k=5 1/5=0.2, k=6 0/4=0, ... k=9 0/1, k=10 nothing kept: 0.
TEN = case([0.9, 0.1, 0.5, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6, 1.0], [1, 3, 8])


def test_the_curve_of_ten_patterns_worked_by_hand():
    curve = rejection_curve(*TEN)
    np.testing.assert_array_equal(curve.rejected, np.arange(11))
    np.testing.assert_allclose(curve.share, np.arange(11) / 10)
    np.testing.assert_allclose(curve.error, [3 / 10, 2 / 9, 2 / 8, 1 / 7, 1 / 6, 1 / 5, 0, 0, 0, 0, 0])


@pytest.mark.parametrize("target, k", [
    (0.3, 0),     # already there with nothing rejected (3/10 is 0.3: equal counts)
    (0.25, 1),    # 2/9 = 0.222
    (0.2, 3),     # 1/7 = 0.143; k=2 leaves 2/8 = 0.25 (the curve is not monotonic)
    (0.15, 3),
    (0.14, 6),    # 1/7 = 0.1429 > 0.14, 1/6 and 1/5 too; 0/4 at k=6
    (0.0, 6),
])
def test_the_smallest_rejection_of_ten_patterns_worked_by_hand(target, k):
    r = rejection(*TEN, target=target)
    assert (r.rejected, r.n) == (k, 10)
    assert r.share == k / 10
    assert r.error == pytest.approx(r.curve.error[k]) and r.error <= target
    assert r.error_before == pytest.approx(0.3)


def test_already_below_or_at_the_target_rejects_nothing():
    # 1 wrong of 400: 0.25% <= 0.5%. 1 wrong of 200: exactly 0.5%, which is at most 0.5%.
    for n in (400, 200):
        margins = np.linspace(1.0, 2.0, n)
        r = rejection(*case(list(margins), [0]))
        assert (r.rejected, r.share, r.target) == (0, 0.0, 0.005)
        assert r.error == r.error_before == 1 / n
    # 2 wrong of 200 (1%), the wrong ones the least confident: reject those 2, 0 of 198 left.
    assert rejection(*case(list(np.linspace(1.0, 2.0, 200)), [0, 1])).rejected == 2


def test_the_default_target_of_half_a_percent_on_a_thousand_patterns():
    # 1000 patterns, 8 wrong (0.8%): 4 with the 4 smallest margins, 4 with large ones.
    # k=3 leaves 5 of 997 = 0.5015% > 0.5%; k=4 leaves 4 of 996 = 0.4016%: 0.4% rejected.
    margins = np.arange(1000, dtype=float)
    r = rejection(*case(list(margins), [0, 1, 2, 3, 600, 700, 800, 900]))
    assert (r.rejected, r.share) == (4, 0.004)
    assert r.error == pytest.approx(4 / 996) and r.error_before == pytest.approx(0.008)
    assert r.curve.error[3] == pytest.approx(5 / 997) and r.curve.error[3] > 0.005


def test_all_wrong_needs_everything_rejected():
    # Every k < 4 keeps only wrong patterns (error 1); k=4 keeps nothing: error 0 by definition.
    r = rejection(*case([0.3, 0.1, 0.2, 0.4], [0, 1, 2, 3]))
    assert (r.rejected, r.share, r.error, r.error_before) == (4, 1.0, 0.0, 1.0)
    np.testing.assert_array_equal(r.curve.error, [1, 1, 1, 1, 0])


def test_equal_margins_are_rejected_together():
    # Margins .5 .2 .2 .2 .9, the wrong pattern index 1, one of the three tied at .2.
    # A threshold on the margin rejects none or all of the tied three: k in {0, 3, 4, 5}.
    # k=0: 1/5 = 0.2; k=3: 0/2. Rejecting by index among the ties would stop at k=1 (0/4).
    margins, predictions, labels = case([0.5, 0.2, 0.2, 0.2, 0.9], [1])
    r = rejection(margins, predictions, labels, target=0.1)
    np.testing.assert_array_equal(r.curve.rejected, [0, 3, 4, 5])
    np.testing.assert_allclose(r.curve.error, [0.2, 0, 0, 0])
    assert (r.rejected, r.share) == (3, 0.6)
    for wrong in (2, 3):  # whichever of the tied three is wrong: the same answer
        assert rejection(*case([0.5, 0.2, 0.2, 0.2, 0.9], [wrong]), target=0.1).rejected == 3


def test_the_answer_does_not_depend_on_the_order_of_the_patterns():
    rng = np.random.default_rng(0)
    margins = rng.integers(0, 30, 500).astype(float)  # many ties
    labels = rng.integers(0, 10, 500)
    predictions = np.where(rng.random(500) < 0.05 + 0.3 * (margins < 5), (labels + 1) % 10, labels)
    r = rejection(margins, predictions, labels, target=0.02)
    for _ in range(5):
        p = rng.permutation(500)
        again = rejection(margins[p], predictions[p], labels[p], target=0.02)
        assert (again.rejected, again.error) == (r.rejected, r.error)
        np.testing.assert_array_equal(again.curve.rejected, r.curve.rejected)


@pytest.mark.parametrize("args, message", [
    (([0.1, 0.2], [0, 1], [0]), "must be 1-d and of one length"),
    (([[0.1]], [[0]], [[0]]), "must be 1-d and of one length"),
    (([], [], []), "no patterns"),
    (([0.1, float("nan")], [0, 1], [0, 1]), "must be finite"),
])
def test_bad_inputs_are_one_line_errors(args, message):
    with pytest.raises(ValueError, match=message):
        rejection(*args)


@pytest.mark.parametrize("target", [-0.1, 1.0, 2.0])
def test_a_target_outside_zero_to_one_is_refused(target):
    with pytest.raises(ValueError, match="the target error must be in"):
        rejection(*TEN, target=target)


@pytest.fixture(scope="module")
def shipped():
    params, config, _ = pretrained.load()
    return params, make_model(config, inference=True).apply, config


def test_the_model_is_scored_in_compiled_batches_as_predict_digits_scores_it(shipped, mnist):
    params, apply_fn, config = shipped
    images, labels = mnist.test_images[:700], mnist.test_labels[:700]
    scores = score_set(params, apply_fn, jax.numpy.asarray(images), 300)  # three batches, the last one padded
    classes, reference, margins, _ = predict_digits(params, apply_fn, config.objective, images)
    chex.assert_shape(scores, (700, 10))
    np.testing.assert_allclose(np.asarray(scores), reference, rtol=1e-5, atol=1e-4)
    r = model_rejection(params, apply_fn, config.head, images, labels, batch_size=300)
    assert r == rejection(margins, classes, labels)._replace(curve=r.curve)
    assert r.error_before == np.mean(classes != labels)


def test_eval_reports_the_shipped_models_rejection(capsys):
    assert eval_main(["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    r = report["rejection"]
    assert (r["target_error"], r["n"], r["error_before"]) == (0.005, 10_000, report["test_error"])
    assert r["rejected_share"] == r["rejected"] / 10_000 and r["error_on_kept"] <= 0.005
    assert r["margin_between"] == "the two smallest RBF penalties"
    assert 0 < r["rejected"] < 300  # measured: 89 (0.89%), leaving 49 of 9,911 wrong
    line = (f"rejection for 0.5% error: {r['rejected_share']:.2%} of the test patterns ({r['rejected']} of 10,000, "
            f"smallest margin first) leave {r['error_on_kept']:.2%} error on the rest")
    assert line in format_report(report).splitlines()


def test_the_rejection_figure_draws_the_curve_and_the_target(tmp_path):
    r = rejection(*TEN, target=0.2)
    image = pixels(plots.rejection_curve(r.curve.share, r.curve.error, tmp_path / "r.png", r.target, r.share))
    unmarked = pixels(plots.rejection_curve(r.curve.share, r.curve.error, tmp_path / "unmarked.png", r.target))
    blank = pixels(plots.rejection_curve([0.0], [0.0], tmp_path / "blank.png", r.target))
    blue, red = (31, 119, 180), (214, 39, 40)  # matplotlib's C0 and C3
    assert near(image, blue) > near(blank, blue) + 300  # the curve
    assert near(blank, red) > 300  # the target, dashed across
    plot_area = np.s_[image.shape[0] // 3 :, : 6 * image.shape[1] // 10]  # below and left of the legend (upper right)
    assert near(image[plot_area], red) > near(unmarked[plot_area], red) + 30  # the point that reaches it: 30% rejected, 14% error
