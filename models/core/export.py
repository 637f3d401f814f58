"""Export a trained classifier to ONNX (softmax out, normalisation inside) with a parity check."""

from __future__ import annotations

import copy
import json
import warnings
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from models.contract.config import ValidationConfig
from models.contract.metrics import CalibrationFit, EvaluationReport, evaluate_predictions, summaries
from models.contract.onnx_model import (
    INPUT_NAME,
    OUTPUT_NAME,
    ModelSpec,
    load_session,
    run_probabilities,
    sha256_file,
    uint8_to_input,
)
from models.contract.temperature import class_log_prior, fit_logit_adjustment, fit_temperatures, softmax
from models.core.backbones import ImageClassifier
from models.core.data import Dataset
from models.core.source import held_out_batches

OPSET = 17
TEMPERATURES_KEY = "h2t.temperatures"  # metadata of a calibrated export: the temperature per predicted class
LOGIT_OFFSETS_KEY = "h2t.logit_offsets"  # metadata of a logit-adjusted export: what is subtracted from each logit
LOWEST_PROBABILITY = float(np.finfo(np.float32).tiny)  # log(p) stands for the logits; p never underflows to 0 here


class _Exportable(torch.nn.Module):
    """[0, 1] RGB in, softmax probabilities out; with `logit_offsets` (one per class), those are subtracted from
    the logits first (post-hoc logit adjustment: may change the argmax); with `temperatures` (one per class), the
    logits of an image are then divided by the temperature of its predicted class (temperature scaling: same
    argmax)."""

    def __init__(self, model: ImageClassifier, mean: tuple[float, ...], std: tuple[float, ...],
                 temperatures: np.ndarray | None = None, logit_offsets: np.ndarray | None = None) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.calibrated = temperatures is not None
        if temperatures is not None:
            self.register_buffer("temperatures", torch.tensor(temperatures, dtype=torch.float32))
        self.adjusted = logit_offsets is not None
        if logit_offsets is not None:
            self.register_buffer("logit_offsets", torch.tensor(logit_offsets, dtype=torch.float32).unsqueeze(0))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        logits = self.model((image - self.mean) / self.std)
        if self.adjusted:
            logits = logits - self.logit_offsets
        if self.calibrated:
            logits = logits / self.temperatures[logits.argmax(dim=1)].unsqueeze(1)
        return torch.softmax(logits, dim=1)


@dataclass(frozen=True)
class ExportResult:
    path: Path
    sha256: str
    size_bytes: int
    parity_max_abs_diff: float  # max |p_onnx - p_torch| over the parity images, probabilities
    parity_images: int


def export_onnx(model: ImageClassifier, spec: ModelSpec, path: Path, parity_images: np.ndarray,
                temperatures: np.ndarray | None = None, logit_offsets: np.ndarray | None = None) -> ExportResult:
    """Write `path` (fp32, CPU graph, dynamic batch) and compare it with the torch model on
    `parity_images` (uint8 N x 3 x H x W, real test images); with `logit_offsets` and `temperatures` (per
    class), the graph answers adjusted, temperature-scaled probabilities, and the parity is of those."""
    wrapper = _Exportable(copy.deepcopy(model), spec.mean, spec.std, temperatures,
                          logit_offsets).to("cpu").float().eval()
    example = torch.zeros(2, 3, spec.image_size, spec.image_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
        torch.onnx.export(wrapper, (example,), str(tmp), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                          opset_version=OPSET, dynamo=False)
    graph = onnx.load(str(tmp))
    metadata = spec.to_metadata()
    if temperatures is not None:
        metadata[TEMPERATURES_KEY] = json.dumps([float(t) for t in temperatures])
    if logit_offsets is not None:
        metadata[LOGIT_OFFSETS_KEY] = json.dumps([float(o) for o in logit_offsets])
    for key, value in metadata.items():
        graph.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(graph)
    onnx.save(graph, str(tmp))
    tmp.replace(path)

    inputs = uint8_to_input(parity_images)
    with torch.no_grad():
        expected = wrapper(torch.from_numpy(inputs)).numpy()
    actual = run_probabilities(load_session(path), inputs)
    diff = float(np.abs(actual - expected).max()) if len(inputs) else 0.0
    return ExportResult(path, sha256_file(path), path.stat().st_size, diff, len(inputs))


PARITY_IMAGES = 256
CALIBRATION_BATCH = 500


@dataclass(frozen=True)
class ServedModel:
    export: ExportResult
    spec: ModelSpec
    calibration: EvaluationReport  # of the ONNX model itself on the test split


def _served_probabilities(path: Path, split, fit: str, workers: int) -> np.ndarray:
    session = load_session(path)
    with closing(held_out_batches(split, fit, CALIBRATION_BATCH, workers)) as batches:
        probs = [run_probabilities(session, uint8_to_input(images.numpy())) for images in batches]
    return np.concatenate(probs)


def export_and_calibrate(model: ImageClassifier, dataset: Dataset, groups: list[str], path: Path,
                         workers: int = 0, validation: ValidationConfig | None = None) -> ServedModel:
    """Export, check parity on real test images, and measure the served artifact itself (through
    onnxruntime) on the whole test split, read batch by batch: accuracy, ECE and reliability bins,
    overall and per group.

    Where the run's `validation` asks for calibration and the dataset holds a validation split, the exported
    model's outputs on that split (log-probabilities: the logits up to a constant per image, which softmax and
    the argmax ignore) are what is fitted: first the logit adjustment where asked for, then the temperatures on
    the adjusted logits. The model is exported again applying them, and the report measures that artifact,
    with the test figures before and the validation figures before and after beside."""
    spec = ModelSpec(dataset.image_size, tuple(dataset.mean), tuple(dataset.std), tuple(dataset.class_names),
                     tuple(groups), dataset.eval_fit)
    with closing(held_out_batches(dataset.test, dataset.eval_fit, PARITY_IMAGES)) as first:
        parity = next(first, None)
    parity_images = parity.numpy() if parity is not None else np.zeros((0, 3, 1, 1), np.uint8)
    result = export_onnx(model, spec, path, parity_images)
    test_labels = dataset.test.labels.numpy()
    report = evaluate_predictions(_served_probabilities(path, dataset.test, dataset.eval_fit, workers), test_labels,
                                  groups, classwise=True)
    level = validation.calibration if validation is not None else "none"
    adjust = validation is not None and validation.logit_adjustment
    if (level == "none" and not adjust) or dataset.val is None:
        return ServedModel(result, spec, report)

    val_labels = dataset.val.labels.numpy()
    val_probs = _served_probabilities(path, dataset.val, dataset.eval_fit, workers)
    val_logits = np.log(np.maximum(val_probs, LOWEST_PROBABILITY))
    tau = offsets = None
    if adjust:
        prior = class_log_prior(dataset.train_counts())
        tau = fit_logit_adjustment(val_logits, val_labels, prior)
        offsets = (tau * prior).astype(np.float32)
        val_logits = val_logits - offsets
    fitted = fit_temperatures(val_logits, val_labels, groups, level) if level != "none" else None
    temperatures = np.asarray(fitted.per_class, dtype=np.float32) if fitted is not None else None
    result = export_onnx(model, spec, path, parity_images, temperatures, offsets)
    calibrated = evaluate_predictions(_served_probabilities(path, dataset.test, dataset.eval_fit, workers),
                                      test_labels, groups, classwise=True)
    val_before = evaluate_predictions(val_probs, val_labels, groups, classwise=True)
    val_after = evaluate_predictions(fitted.apply(val_logits) if fitted is not None else softmax(val_logits),
                                     val_labels, groups, classwise=True)
    fit = CalibrationFit(
        level=level, validation=dataset.val_source, validation_images=len(val_labels),
        temperatures={"overall": fitted.overall, **fitted.groups} if fitted is not None else {},
        logit_adjustment_tau=tau,
        test_before=summaries(report), validation_before=summaries(val_before), validation_after=summaries(val_after))
    return ServedModel(result, spec, calibrated.model_copy(update={"calibration_fit": fit}))


def export_finished_folder(folder_root: Path, config, dataset: Dataset, path: Path) -> ServedModel:
    """Export and calibrate the final stage-2 model of a folder `h2t train` finished, exactly as a worker does
    for a service run (`export_and_calibrate`); a folder whose stage 2 has not finished is refused."""
    from models.contract.layout import RunFolder
    from models.core.backbones import build_classifier
    from models.core.stages import Stage2Recipe
    from models.core.train import finished_checkpoint, run_groups

    try:
        state = finished_checkpoint(RunFolder(folder_root), Stage2Recipe.stage, config.backbone, dataset.num_classes)
    except (FileNotFoundError, ValueError) as exc:
        hint = f"; run `h2t train --out {folder_root}` with its config (again) to finish it"
        raise type(exc)(f"{exc}{hint}") from exc
    model = build_classifier(config.backbone, dataset.num_classes)
    model.load_state_dict(state["model"])
    return export_and_calibrate(model.eval(), dataset, run_groups(dataset, config), path,
                                validation=config.validation)
