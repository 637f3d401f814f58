from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from models.contract.metrics import EvaluationReport, GroupSummary


class Parity(BaseModel):
    max_abs_diff: float = Field(description="max |p_onnx - p_torch| of probabilities on real test images")
    images: int


class ModelPublic(BaseModel):
    id: str = Field(description="a run's model has the run's id")
    run_id: str | None = Field(description="the run that trained it; null for a model imported from `h2t train`")
    dataset_id: str | None = Field(description="the dataset its run trained on; null for an imported model")
    origin: dict | None = Field(None, description="an imported model's provenance: its folder, config and figures")
    num_classes: int
    class_names: list[str]
    groups: list[str] = Field(description="many/medium/few of each class")
    input: dict = Field(description="the preprocessing contract: size, range, layout, normalisation")
    onnx_sha256: str
    size_bytes: int
    parity: Parity
    calibration: dict[str, GroupSummary] = Field(description="overall, many, medium, few on the test split")
    created_at: datetime


class ModelsPublic(BaseModel):
    data: list[ModelPublic]
    count: int


class CalibrationPublic(EvaluationReport):
    model_id: str
    measured_on: str = "the held-out test split, through the served ONNX model"


class PredictOptions(BaseModel):
    """The fields beside the `images` files of a multipart predict request."""

    top_k: int = Field(5, ge=1, le=1000, description="classes returned per image")


class PredictJSON(PredictOptions):
    images: list[str] = Field(min_length=1, description="base64-encoded image files (PNG, JPEG, ...)")


class ClassProbability(BaseModel):
    class_index: int
    label: str
    probability: float


class PredictedClass(ClassProbability):
    group: str
    group_calibration: GroupSummary


class Prediction(BaseModel):
    index: int
    top_k: list[ClassProbability]
    predicted: PredictedClass


class PredictResponse(BaseModel):
    model_id: str
    predictions: list[Prediction]


class ImportManifest(BaseModel):
    """The `manifest` field (JSON text) beside the `onnx` file of POST /v1/models: what `h2t models import`
    measured of the exported file, as a worker measures a run's model."""

    model_config = ConfigDict(extra="forbid")

    calibration: EvaluationReport = Field(description="the ONNX model on the held-out test split, through "
                                          "onnxruntime: accuracy, ECE and bins overall and per group")
    parity: Parity = Field(description="max |p_onnx - p_torch| on real test images")
    origin: dict = Field(default_factory=dict, description="provenance: the folder, its config, its figures")
