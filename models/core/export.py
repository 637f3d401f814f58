"""Export a trained classifier to ONNX (softmax out, normalisation inside) with a parity check."""

from __future__ import annotations

import copy
import warnings
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from models.contract.metrics import EvaluationReport, evaluate_predictions
from models.contract.onnx_model import (
    INPUT_NAME,
    OUTPUT_NAME,
    ModelSpec,
    load_session,
    run_probabilities,
    sha256_file,
    uint8_to_input,
)
from models.core.backbones import ImageClassifier
from models.core.data import Dataset
from models.core.source import held_out_batches

OPSET = 17


class _Exportable(torch.nn.Module):
    """[0, 1] RGB in, softmax probabilities out."""

    def __init__(self, model: ImageClassifier, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model((image - self.mean) / self.std), dim=1)


@dataclass(frozen=True)
class ExportResult:
    path: Path
    sha256: str
    size_bytes: int
    parity_max_abs_diff: float  # max |p_onnx - p_torch| over the parity images, probabilities
    parity_images: int


def export_onnx(model: ImageClassifier, spec: ModelSpec, path: Path, parity_images: np.ndarray) -> ExportResult:
    """Write `path` (fp32, CPU graph, dynamic batch) and compare it with the torch model on
    `parity_images` (uint8 N x 3 x H x W, real test images)."""
    wrapper = _Exportable(copy.deepcopy(model), spec.mean, spec.std).to("cpu").float().eval()
    example = torch.zeros(2, 3, spec.image_size, spec.image_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
        torch.onnx.export(wrapper, (example,), str(tmp), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                          opset_version=OPSET, dynamo=False)
    graph = onnx.load(str(tmp))
    for key, value in spec.to_metadata().items():
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


def export_and_calibrate(model: ImageClassifier, dataset: Dataset, groups: list[str], path: Path,
                         workers: int = 0) -> ServedModel:
    """Export, check parity on real test images, and measure the served artifact itself (through
    onnxruntime) on the whole test split, read batch by batch: accuracy, ECE and reliability bins,
    overall and per group."""
    spec = ModelSpec(dataset.image_size, tuple(dataset.mean), tuple(dataset.std), tuple(dataset.class_names),
                     tuple(groups), dataset.eval_fit)
    with closing(held_out_batches(dataset.test, dataset.eval_fit, PARITY_IMAGES)) as first:
        parity = next(first, None)
    result = export_onnx(model, spec, path, parity.numpy() if parity is not None else np.zeros((0, 3, 1, 1), np.uint8))
    session = load_session(path)
    with closing(held_out_batches(dataset.test, dataset.eval_fit, CALIBRATION_BATCH, workers)) as batches:
        probs = [run_probabilities(session, uint8_to_input(images.numpy())) for images in batches]
    report = evaluate_predictions(np.concatenate(probs), dataset.test.labels.numpy(), groups)
    return ServedModel(result, spec, report)


def export_finished_folder(folder_root: Path, config, dataset: Dataset, path: Path) -> ServedModel:
    """Export and calibrate the final stage-2 model of a folder `h2t train` finished, exactly as a worker does
    for a service run (`export_and_calibrate`); a folder whose stage 2 has not finished is refused."""
    from models.contract.layout import RunFolder
    from models.core.backbones import build_classifier
    from models.core.train import load_checkpoint, run_groups

    checkpoint = RunFolder(folder_root).checkpoint(2)
    if not checkpoint.exists():
        raise FileNotFoundError(f"{folder_root} holds no stage-2 checkpoint; train it with `h2t train --out "
                                f"{folder_root}` first")
    state = load_checkpoint(checkpoint)
    if state["epoch"] < state["meta"]["epochs"]:
        raise ValueError(f"stage 2 in {folder_root} stopped at epoch {state['epoch']} of {state['meta']['epochs']}; "
                         f"run the same `h2t train --out {folder_root}` again to finish it")
    model = build_classifier(config.backbone, dataset.num_classes)
    model.load_state_dict(state["model"])
    return export_and_calibrate(model.eval(), dataset, run_groups(dataset, config), path)
