"""Temperature scaling fitted on a validation split: it lowers the validation NLL, never changes a prediction,
and recovers the temperature that made synthetic logits overconfident."""

import numpy as np
import pytest

from models.contract.temperature import calibrated_probabilities, fit_temperatures, nll, softmax

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
