"""Temperature scaling fitted on a validation split: it lowers the validation NLL, never changes a prediction,
and recovers the temperature that made synthetic logits overconfident."""

import numpy as np
import pytest

from models.contract.temperature import (
    calibrated_probabilities,
    class_log_prior,
    fit_logit_adjustment,
    fit_temperatures,
    mean_class_accuracy,
    nll,
    softmax,
)

GROUPS = ["many"] * 4 + ["medium"] * 3 + ["few"] * 3


def _overconfident(n: int, temperature: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from softmax(z), logits reported as z * temperature: calibrated at T = temperature."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, (n, len(GROUPS)))
    probs = softmax(z)
    labels = np.array([rng.choice(len(GROUPS), p=p) for p in probs])
    return z * temperature, labels


@pytest.mark.parametrize("level", ["overall", "group", "class"])
def test_fitting_lowers_the_validation_nll_and_leaves_every_argmax_unchanged(level):
    logits, labels = _overconfident(3000, 3.0)
    fitted = fit_temperatures(logits, labels, GROUPS, level)
    calibrated = fitted.apply(logits)
    assert np.array_equal(calibrated.argmax(axis=1), logits.argmax(axis=1))
    before = nll(logits, labels)
    after = -np.mean(np.log(calibrated[np.arange(len(labels)), labels]))
    assert after < before * 0.8
    assert len(fitted.per_class) == len(GROUPS) and fitted.validation_images == 3000


def test_the_overall_temperature_recovers_the_one_that_made_the_logits_overconfident():
    logits, labels = _overconfident(5000, 3.0, seed=1)
    fitted = fit_temperatures(logits, labels, GROUPS, "overall")
    assert fitted.overall == pytest.approx(3.0, rel=0.1)
    assert set(fitted.per_class) == {fitted.overall}


def test_group_temperatures_follow_the_predicted_class_and_class_ones_shrink_towards_them():
    logits, labels = _overconfident(4000, 1.0, seed=2)
    few = np.isin(logits.argmax(axis=1), [7, 8, 9])
    logits[few] *= 4.0  # only images predicted into the few group are overconfident
    fitted = fit_temperatures(logits, labels, GROUPS, "group")
    assert fitted.groups["few"] > 2.5 and fitted.groups["many"] == pytest.approx(1.0, rel=0.15)
    assert fitted.per_class[8] == fitted.groups["few"] and fitted.per_class[0] == fitted.groups["many"]
    by_class = fit_temperatures(logits, labels, GROUPS, "class")
    for c, group in enumerate(GROUPS):  # between its own fit and its group's; close to the group's
        assert by_class.per_class[c] == pytest.approx(by_class.groups[group], rel=0.35)


def test_calibrated_probabilities_divide_by_the_predicted_class_temperature():
    logits = np.array([[2.0, 0.0, 1.0], [0.0, 3.0, 1.0]])
    out = calibrated_probabilities(logits, np.array([2.0, 0.5, 1.0]))
    np.testing.assert_allclose(out[0], softmax(logits[:1] / 2.0)[0], rtol=1e-6)
    np.testing.assert_allclose(out[1], softmax(logits[1:] / 0.5)[0], rtol=1e-6)
    assert out.dtype == np.float32


def test_class_log_prior_is_the_log_frequency_and_finite_for_an_empty_class():
    prior = class_log_prior([300, 100, 0])
    assert np.all(np.isfinite(prior))
    assert prior[0] - prior[1] == pytest.approx(np.log(3.0), abs=1e-6)
    assert prior[2] == pytest.approx(np.log(0.5 / 400.5), abs=1e-6)


def test_mean_class_accuracy_weighs_every_class_present_the_same():
    predicted, labels = np.array([0, 0, 0, 0, 1, 2]), np.array([0, 0, 0, 0, 2, 2])
    assert mean_class_accuracy(predicted, labels) == pytest.approx((1.0 + 0.5) / 2)  # class 1 is absent


def _head_biased_logits(rng: np.random.Generator, prior: np.ndarray, bias: float) -> tuple[np.ndarray, np.ndarray]:
    labels = np.repeat(np.arange(len(prior)), 30)  # a balanced validation split
    scores = rng.normal(0.0, 1.0, (len(labels), len(prior)))
    scores[np.arange(len(labels)), labels] += 1.5
    return (scores + bias * prior).astype(np.float32), labels


def test_logit_adjustment_undoes_a_head_bias_and_raises_the_mean_class_accuracy():
    rng = np.random.default_rng(0)
    prior = class_log_prior(np.geomspace(500, 5, 20).round().astype(int))
    logits, labels = _head_biased_logits(rng, prior, bias=1.0)
    tau = fit_logit_adjustment(logits, labels, prior)
    assert 0.6 <= tau <= 1.4
    assert (mean_class_accuracy((logits - tau * prior).argmax(1), labels)
            > mean_class_accuracy(logits.argmax(1), labels) + 0.05)


def test_logit_adjustment_keeps_tau_zero_when_no_other_value_does_better():
    prior = class_log_prior([400, 40, 4])
    logits = np.eye(3, dtype=np.float32)[[0, 1, 2, 2, 1, 0]] * 50.0  # every prediction right, by a wide margin
    assert fit_logit_adjustment(logits, np.array([0, 1, 2, 2, 1, 0]), prior) == 0.0
