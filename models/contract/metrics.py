"""Accuracy and calibration overall and per many/medium/few-shot class group.

Works on numpy arrays so the serving side (onnxruntime + numpy, no torch) computes the very same
numbers as the trainer.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from models.contract.config import GroupConfig

GROUP_NAMES = ("many", "medium", "few")
N_BINS = 15  # equal-width confidence bins of the ECE and the reliability diagrams, as in the paper


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True)


class ReliabilityBin(_Record):
    lower: float
    upper: float
    count: int
    accuracy: float = Field(description="0 where the bin is empty")
    confidence: float


class GroupSummary(_Record):
    n: int = Field(description="evaluation images whose true class is in the group")
    accuracy: float | None = Field(description="mean per-class accuracy over the group's classes, fraction; null "
                                   "where the group has no class with evaluation images")
    ece: float | None = Field(description=f"expected calibration error, {N_BINS} equal-width bins, fraction; null "
                              "where the group has no evaluation images")
    classwise_ece: float | None = Field(
        None, description="class-wise ECE (Kull et al., NeurIPS 2019): per class of the group, the calibration error "
        "of that class's probability for every evaluation image against whether the image is of that class, "
        f"{N_BINS} bins; the mean over the group's classes; null where not measured")


class GroupReport(GroupSummary):
    bins: tuple[ReliabilityBin, ...]


def summaries(report: EvaluationReport) -> dict[str, GroupSummary]:
    """A report's accuracy, ECE and class-wise ECE per group, without the reliability bins."""
    return {name: GroupSummary(n=g.n, accuracy=g.accuracy, ece=g.ece, classwise_ece=g.classwise_ece)
            for name, g in report.groups.items()}


class CalibrationFit(_Record):
    """Temperature scaling fitted on a validation split after stage 2, and its effect."""

    level: str = Field(description="overall, group or class (see the run config's validation.calibration)")
    validation: str = Field(description="where the validation images came from")
    validation_images: int
    temperatures: dict[str, float] = Field(description="the temperature fitted overall and per group of the "
                                           "predicted class (the class level shrinks per-class fits towards these)")
    logit_adjustment_tau: float | None = Field(
        None, description="the post-hoc logit adjustment applied before the temperatures (logits minus tau x log "
        "training class frequency), fitted on the validation split; null: none was asked for")
    test_before: dict[str, GroupSummary] = Field(
        description="the test split's accuracy, ECE and class-wise ECE without the scaling (and adjustment), "
        "overall and per group; the report's groups hold them with it")
    validation_before: dict[str, GroupSummary] = Field(description="the same on the validation split, unscaled")
    validation_after: dict[str, GroupSummary] = Field(description="the same on the validation split, scaled (and "
                                                      "adjusted)")


class EvaluationReport(_Record):
    top1: float = Field(description="sample accuracy over the whole evaluation set")
    groups: dict[str, GroupReport] = Field(description="overall, many, medium, few")
    calibration_fit: CalibrationFit | None = Field(
        None, description="the temperature scaling the served model applies, when its run held out a validation "
        "split; null: the model's probabilities are its softmax as trained")


class EpochMetrics(_Record):
    """One epoch of one stage as the trainer measured it: the record stored per (run, stage, epoch)
    and served by the API. A field added here reaches the store and the API unchanged."""

    stage: int
    epoch: int = Field(description="1-based")
    epochs: int = Field(description="epochs of this stage")
    loss: float = Field(description="mean training loss over the epoch")
    lr: float
    top1: float = Field(description="on the evaluation split; accuracies and ECE are fractions in [0, 1]")
    many: float | None = Field(description="group accuracy; null where the group is empty (as for ece_*)")
    medium: float | None
    few: float | None
    ece: float
    ece_many: float | None
    ece_medium: float | None
    ece_few: float | None
    train_seconds: float
    images_per_second: float


class StepProgress(_Record):
    """Where a training run stands inside an epoch, as the trainer reports it every few seconds: served with
    the run (GET /v1/runs/{id}) and as its event stream's progress events."""

    stage: int
    epoch: int = Field(description="1-based: the epoch under way")
    epochs: int = Field(description="epochs of this stage")
    step: int = Field(description="steps of this epoch done")
    steps: int = Field(description="steps of this epoch")
    images_per_second: float = Field(description="training images per second over this epoch so far")
    stage_eta_s: float = Field(description="estimated seconds until this stage's last epoch is evaluated")
    run_eta_s: float = Field(description="estimated seconds until both stages are done; during stage 1, stage 2's "
                             "epochs are counted at stage 1's epoch time (an upper estimate)")


def reliability_bins(confidences: np.ndarray, correct: np.ndarray, n_bins: int = N_BINS) -> tuple[ReliabilityBin, ...]:
    """Equal-width bins (lower, upper] over [0, 1] of the max softmax probability."""
    if n_bins < 1:
        raise ValueError("n_bins must be >= 1")
    confidences = np.asarray(confidences, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # right=True: a confidence equal to an edge belongs to the bin it closes, as in the official code
    which = np.clip(np.digitize(confidences, edges, right=True) - 1, 0, n_bins - 1)
    bins = []
    for b in range(n_bins):
        sel = which == b
        count = int(sel.sum())
        bins.append(ReliabilityBin(
            lower=float(edges[b]), upper=float(edges[b + 1]), count=count,
            accuracy=float(correct[sel].mean()) if count else 0.0,
            confidence=float(confidences[sel].mean()) if count else 0.0,
        ))
    return tuple(bins)


def ece_from_bins(bins: Sequence[ReliabilityBin]) -> float:
    total = sum(b.count for b in bins)
    if total == 0:
        return 0.0
    return float(sum(b.count / total * abs(b.accuracy - b.confidence) for b in bins))


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = N_BINS) -> float:
    """ECE = sum_b (n_b / N) |acc_b - conf_b| over equal-width bins of the max probability; in [0, 1]."""
    probs = np.asarray(probs)
    labels = np.asarray(labels)
    if probs.ndim != 2 or labels.shape != (probs.shape[0],):
        raise ValueError("probs must be N x C and labels N")
    correct = probs.argmax(axis=1) == labels
    return ece_from_bins(reliability_bins(probs.max(axis=1), correct, n_bins))


def classwise_errors(probs: np.ndarray, labels: np.ndarray, classes: np.ndarray, n_bins: int = N_BINS) -> np.ndarray:
    """Per class of `classes`: the ECE of p_c against [label == c] over all images (equal-width bins of p_c)."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    errors = np.zeros(len(classes))
    for start in range(0, len(classes), 64):  # a chunk of classes at a time: N x 64 values
        chunk = classes[start:start + 64]
        p = probs[:, chunk]
        hit = (labels[:, None] == chunk[None, :]).astype(np.float64)
        which = np.clip(np.digitize(p, edges, right=True) - 1, 0, n_bins - 1)
        for j in range(len(chunk)):
            confidence = np.bincount(which[:, j], weights=p[:, j], minlength=n_bins)
            accuracy = np.bincount(which[:, j], weights=hit[:, j], minlength=n_bins)
            errors[start + j] = np.abs(accuracy - confidence).sum() / len(labels)
    return errors


def classwise_ece(probs: np.ndarray, labels: np.ndarray, classes: np.ndarray, n_bins: int = N_BINS) -> float | None:
    """Mean over `classes` of their `classwise_errors`; None without classes or images."""
    if len(classes) == 0 or len(labels) == 0:
        return None
    return float(np.mean(classwise_errors(probs, labels, classes, n_bins)))


DEFAULT_GROUPS = GroupConfig()


def class_groups(train_counts: Sequence[int], config: GroupConfig = DEFAULT_GROUPS) -> list[str]:
    """The group of each class: by the config's index slices, else by training count (the defaults:
    many > 100, few < 20)."""
    if config.slices is not None:
        groups = []
        for cls in range(len(train_counts)):
            for name, (lo, hi) in zip(GROUP_NAMES, config.slices, strict=True):
                if lo <= cls < hi:
                    groups.append(name)
                    break
            else:
                raise ValueError(f"class {cls} is in no group slice {list(config.slices)}")
        return groups
    return ["many" if n > config.many_threshold else "few" if n < config.few_threshold else "medium"
            for n in train_counts]


def evaluate_predictions(
    probs: np.ndarray, labels: np.ndarray, groups: Sequence[str], n_bins: int = N_BINS, classwise: bool = False
) -> EvaluationReport:
    """Top-1 and, overall and per group, accuracy, ECE and reliability bins; with `classwise`, the class-wise
    ECE too (a pass over every class: seconds for a thousand classes, so for the served model's reports, not
    for every epoch's evaluation).

    Group accuracy is the mean of per-class accuracies over the group's classes present in the
    evaluation set (the paper's definition); group ECE uses the samples whose true class is in it.
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    num_classes = probs.shape[1]
    if len(groups) != num_classes:
        raise ValueError(f"{len(groups)} class groups for {num_classes} classes")
    predictions = probs.argmax(axis=1)
    confidences = probs.max(axis=1)
    correct = predictions == labels
    per_class_n = np.bincount(labels, minlength=num_classes)
    per_class_correct = np.bincount(labels, weights=correct, minlength=num_classes)
    group_of_class = np.asarray(groups)
    all_classes = np.arange(num_classes)
    errors = classwise_errors(probs, labels, all_classes, n_bins) if classwise and len(labels) else None

    def mean_error(classes: np.ndarray) -> float | None:
        return float(np.mean(errors[classes])) if errors is not None and len(classes) else None

    def report(mask: np.ndarray, classes: np.ndarray) -> GroupReport:
        bins = reliability_bins(confidences[mask], correct[mask], n_bins)
        present = classes[per_class_n[classes] > 0]
        accuracy = float(np.mean(per_class_correct[present] / per_class_n[present])) if len(present) else None
        ece = ece_from_bins(bins) if mask.any() else None  # an empty group has no accuracy to report, not 0
        return GroupReport(n=int(mask.sum()), accuracy=accuracy, ece=ece, bins=bins,
                           classwise_ece=mean_error(present))

    top1 = float(correct.mean()) if len(correct) else 0.0
    overall_bins = reliability_bins(confidences, correct, n_bins)
    reports = {"overall": GroupReport(n=len(labels), accuracy=top1, ece=ece_from_bins(overall_bins), bins=overall_bins,
                                      classwise_ece=mean_error(all_classes))}
    for name in GROUP_NAMES:
        classes = all_classes[group_of_class == name]
        reports[name] = report(np.isin(labels, classes), classes)
    return EvaluationReport(top1=top1, groups=reports)
