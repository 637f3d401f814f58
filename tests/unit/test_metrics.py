import numpy as np
import pytest

from models.contract.config import GroupConfig
from models.contract.metrics import class_groups, evaluate_predictions, expected_calibration_error, reliability_bins
from models.contract.reporting import group_table


def _probs(conf_and_pred: list[tuple[float, int]], num_classes: int = 3) -> np.ndarray:
    """Rows whose max probability is `conf` at class `pred`, the rest spread evenly."""
    rows = []
    for conf, pred in conf_and_pred:
        row = np.full(num_classes, (1 - conf) / (num_classes - 1))
        row[pred] = conf
        rows.append(row)
    return np.array(rows)


def test_ece_of_perfectly_calibrated_bins_is_zero():
    # confidence 0.9 in one bin with 9 of 10 correct
    probs = _probs([(0.9, 0)] * 10)
    labels = np.array([0] * 9 + [1])
    assert expected_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-12)


def test_ece_matches_a_hand_computed_two_bin_case():
    # bin (0.8667, 0.9333]: 4 samples at 0.9, 2 correct -> |0.5 - 0.9| = 0.4, weight 4/6
    # bin (0.4667, 0.5333]: 2 samples at 0.5, 2 correct -> |1.0 - 0.5| = 0.5, weight 2/6
    probs = _probs([(0.9, 0)] * 4 + [(0.5, 1)] * 2)
    labels = np.array([0, 0, 2, 2, 1, 1])
    assert expected_calibration_error(probs, labels) == pytest.approx(4 / 6 * 0.4 + 2 / 6 * 0.5)


def test_ece_of_always_wrong_full_confidence_is_one():
    probs = _probs([(1.0, 0)] * 5)
    assert expected_calibration_error(probs, np.ones(5, dtype=int)) == pytest.approx(1.0)


def test_ece_puts_a_confidence_on_a_bin_edge_into_the_bin_it_closes():
    bins = reliability_bins(np.array([1 / 3, 1.0]), np.array([True, False]), n_bins=3)
    assert [b.count for b in bins] == [1, 0, 1]


def test_reliability_bins_cover_zero_to_one_in_equal_widths():
    bins = reliability_bins(np.array([0.5]), np.array([True]), n_bins=15)
    assert len(bins) == 15 and bins[0].lower == 0.0 and bins[-1].upper == 1.0
    assert all(b.upper - b.lower == pytest.approx(1 / 15) for b in bins)
    assert sum(b.count for b in bins) == 1


def test_class_groups_by_training_counts_use_thresholds_100_and_20():
    assert class_groups([500, 101, 100, 20, 19, 1]) == ["many", "many", "medium", "medium", "few", "few"]


def test_class_groups_by_explicit_slices():
    groups = class_groups([1] * 10, GroupConfig(slices=((0, 3), (3, 7), (7, 10))))
    assert groups == ["many"] * 3 + ["medium"] * 4 + ["few"] * 3


def test_group_accuracy_is_the_mean_of_per_class_accuracies():
    # class 0 (many): 3 of 4 right; class 1 (few): 0 of 1 right, class 2 (few): 1 of 1 right
    probs = _probs([(0.9, 0)] * 3 + [(0.9, 1), (0.9, 0), (0.9, 2)])
    labels = np.array([0, 0, 0, 0, 1, 2])
    report = evaluate_predictions(probs, labels, ["many", "few", "few"])
    assert report.top1 == pytest.approx(4 / 6)
    assert report.groups["many"].accuracy == pytest.approx(0.75)
    assert report.groups["few"].accuracy == pytest.approx(0.5)
    assert report.groups["few"].n == 2
    # an empty group reports null, not a 0 % that reads as a measured failure
    assert report.groups["medium"].n == 0
    assert report.groups["medium"].accuracy is None and report.groups["medium"].ece is None
    # group ECE is over the group's samples only: few has 2 samples at 0.9 with 1 right
    assert report.groups["few"].ece == pytest.approx(0.4)


def test_expected_calibration_error_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        expected_calibration_error(np.ones((3, 2)) / 2, np.zeros(4, dtype=int))


def test_tables_show_a_dash_for_an_empty_group():
    probs = _probs([(0.9, 0), (0.9, 1)], num_classes=2)
    report = evaluate_predictions(probs, np.array([0, 1]), ["many", "many"])
    table = group_table(report, [200, 150], [1, 1], ["many", "many"])
    few_row = table.splitlines()[-1].split()
    assert few_row[0] == "few" and few_row[-2:] == ["-", "-"]


def test_classwise_ece_is_the_mean_over_classes_of_each_class_probabilitys_calibration_error():
    from models.contract.metrics import classwise_ece

    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]])
    labels = np.array([0, 1, 1])
    # class 0: p = .9 (hit), .6 (miss), .2 (miss) in bins of width 1/15, each alone: |1-.9| + |0-.6| + |0-.2|
    # class 1: p = .1 (miss), .4 (hit), .8 (hit): |0-.1| + |1-.4| + |1-.8|; both over 3 images
    expected = ((0.1 + 0.6 + 0.2) / 3 + (0.1 + 0.6 + 0.2) / 3) / 2
    assert classwise_ece(probs, labels, np.array([0, 1])) == pytest.approx(expected)
    assert classwise_ece(probs, labels, np.array([1])) == pytest.approx((0.1 + 0.6 + 0.2) / 3)
    assert classwise_ece(probs, labels, np.array([], dtype=int)) is None


def test_reports_hold_the_classwise_ece_per_group_only_when_asked():
    from models.contract.metrics import classwise_ece

    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(6), 200)
    labels = rng.integers(0, 6, 200)
    groups = ["many", "many", "medium", "medium", "few", "few"]
    assert evaluate_predictions(probs, labels, groups).groups["few"].classwise_ece is None  # every epoch: skipped
    report = evaluate_predictions(probs, labels, groups, classwise=True)
    assert report.groups["overall"].classwise_ece == pytest.approx(classwise_ece(probs, labels, np.arange(6)))
    assert report.groups["few"].classwise_ece == pytest.approx(classwise_ece(probs, labels, np.array([4, 5])))
