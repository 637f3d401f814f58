"""Post-hoc temperature scaling, fitted on a validation split (numpy only, no torch).

A model's logits z become probabilities softmax(z / T), with T > 0 chosen to minimise the negative
log-likelihood of the validation labels (Guo et al., ICML 2017). Dividing every logit of an image by
the same positive number never changes its argmax, so accuracy is untouched. Three levels:

- overall: one T for every image;
- group: one T per many/medium/few group, chosen by the group of the image's PREDICTED class (the true
  class is unknown when serving), fitted on the validation images predicted into that group;
- class: one T per predicted class, fitted on the images predicted as that class and shrunk towards its
  group's: beta_c = (n_c * beta_c_fit + k * beta_group) / (n_c + k), with beta = 1 / T and k = SHRINKAGE,
  so a class with few validation predictions keeps close to its group.

The result is a vector of C temperatures indexed by the predicted class, whatever the level: the exported
ONNX graph and the predict endpoint apply it the same way.

Optionally, before the temperatures, a post-hoc logit adjustment (Menon et al., ICLR 2021): z - tau * log pi,
with pi the training split's class frequencies and tau chosen on the validation split for the best mean
per-class accuracy. Unlike temperature scaling it moves predictions between head and tail classes: tau > 0
favours the tail, tau < 0 the head, tau = 0 changes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

CalibrationLevel = Literal["overall", "group", "class"]
SHRINKAGE = 20.0  # validation predictions worth as much as the group's fit (the k above)
BETA_RANGE = (1e-2, 1e2)  # inverse temperatures searched: T from 0.01 to 100
_SEARCH_STEPS = 80
TAU_GRID = tuple(round(-1.0 + 0.05 * i, 2) for i in range(61))  # logit-adjustment strengths tried: -1 to 2


class Temperatures(BaseModel):
    """A fitted temperature scaling, as stored with a model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    level: CalibrationLevel
    overall: float = Field(description="the one temperature fitted on every validation image")
    groups: dict[str, float] = Field(description="per group, fitted on the images predicted into it")
    per_class: tuple[float, ...] = Field(description="what is applied: the temperature of each predicted class")
    validation_images: int

    def apply(self, logits: np.ndarray) -> np.ndarray:
        return calibrated_probabilities(logits, np.asarray(self.per_class, dtype=np.float32))


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def nll(logits: np.ndarray, labels: np.ndarray, beta: float = 1.0) -> float:
    """Mean negative log-likelihood of `labels` under softmax(beta * logits)."""
    if len(labels) == 0:
        return 0.0
    z = beta * logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=1))
    return float(np.mean(log_norm - z[np.arange(len(labels)), labels]))


def fit_inverse_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The beta = 1 / T minimising the NLL: golden-section search over log beta (the NLL is convex in beta,
    hence unimodal in log beta). 1.0 when there is nothing to fit on."""
    if len(labels) == 0:
        return 1.0
    lo, hi = math.log(BETA_RANGE[0]), math.log(BETA_RANGE[1])
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = nll(logits, labels, math.exp(a)), nll(logits, labels, math.exp(b))
    for _ in range(_SEARCH_STEPS):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = nll(logits, labels, math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = nll(logits, labels, math.exp(b))
    return math.exp((lo + hi) / 2)


def fit_temperatures(logits: np.ndarray, labels: np.ndarray, groups: Sequence[str],
                     level: CalibrationLevel, shrinkage: float = SHRINKAGE) -> Temperatures:
    """Temperatures fitted on validation `logits` (N x C) and `labels`; `groups`: each class's group."""
    group_of_class = np.asarray(groups)
    predicted = logits.argmax(axis=1)
    overall = fit_inverse_temperature(logits, labels)
    group_beta = {}
    for name in dict.fromkeys(groups):  # in order of first appearance
        chosen = group_of_class[predicted] == name
        group_beta[name] = fit_inverse_temperature(logits[chosen], labels[chosen]) if chosen.any() else overall
    betas = np.full(len(groups), overall)
    if level != "overall":
        betas = np.array([group_beta[g] for g in groups])
    if level == "class":
        for c in range(len(groups)):
            chosen = predicted == c
            n = int(chosen.sum())
            if n:
                fitted = fit_inverse_temperature(logits[chosen], labels[chosen])
                betas[c] = (n * fitted + shrinkage * betas[c]) / (n + shrinkage)
    return Temperatures(level=level, overall=1.0 / overall, groups={g: 1.0 / b for g, b in group_beta.items()},
                        per_class=tuple(float(1.0 / b) for b in betas), validation_images=len(labels))


def calibrated_probabilities(logits: np.ndarray, per_class: np.ndarray) -> np.ndarray:
    """softmax(z / T[argmax z]) per image: the argmax (the prediction) never changes."""
    temperature = per_class[logits.argmax(axis=1)][:, None]
    return softmax(logits / temperature).astype(np.float32)


def class_log_prior(class_counts: Sequence[int]) -> np.ndarray:
    """log of the training split's class frequencies; an empty class gets the log of half an image (finite)."""
    counts = np.maximum(np.asarray(class_counts, dtype=np.float64), 0.5)
    return np.log(counts / counts.sum()).astype(np.float32)


def mean_class_accuracy(predicted: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy averaged over the classes present in `labels` (each class weighs the same)."""
    size = int(max(predicted.max(initial=0), labels.max(initial=0))) + 1
    seen = np.bincount(labels, minlength=size)
    right = np.bincount(labels, weights=(predicted == labels).astype(np.float64), minlength=size)
    present = seen > 0
    return float(np.mean(right[present] / seen[present])) if present.any() else 0.0


def fit_logit_adjustment(logits: np.ndarray, labels: np.ndarray, log_prior: np.ndarray) -> float:
    """The tau of TAU_GRID whose adjusted logits z - tau * log_prior have the best mean per-class accuracy on
    the validation `logits` and `labels`; among equals the one nearest 0 (no adjustment unless it helps)."""
    best_tau, best_score = 0.0, mean_class_accuracy(logits.argmax(axis=1), labels)
    for tau in sorted(TAU_GRID, key=abs):
        score = mean_class_accuracy((logits - tau * log_prior).argmax(axis=1), labels)
        if score > best_score:
            best_tau, best_score = tau, score
    return best_tau
