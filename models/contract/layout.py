"""Where files live: a run's folder and the artifact store. One definition for the trainer, the
worker, the API and the CLI. Stored rows hold paths relative to the artifact store, so a worker
with another mount point, or a restore on another host, finds the same files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

CHECKPOINT_NAME = "checkpoint.pt"
STAGES = (1, 2)


@dataclass(frozen=True)
class RunFolder:
    """One run's files: a checkpoint per stage, the exported model, and what `h2t train` writes."""

    root: Path

    def stage_dir(self, stage: int) -> Path:
        return self.root / f"stage{stage}"

    def checkpoint(self, stage: int) -> Path:
        return self.stage_dir(stage) / CHECKPOINT_NAME

    @property
    def onnx(self) -> Path:
        return self.root / "model.onnx"

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics_log(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def log(self) -> Path:
        """The run's own log lines, written by the workers that trained it (GET /v1/runs/{id}/logs)."""
        return self.root / "log.txt"

    def create(self) -> RunFolder:
        for stage in STAGES:
            self.stage_dir(stage).mkdir(parents=True, exist_ok=True)
        return self


def checkpoint_kind(stage: int) -> str:
    """The artifact kind recorded for a stage's checkpoint."""
    return f"stage{stage}_checkpoint"


ONNX_KIND = "onnx"


@dataclass(frozen=True)
class ArtifactLayout:
    """The artifact store: runs, extracted dataset uploads and upload scratch space under one root."""

    root: Path

    def run(self, run_id: str) -> RunFolder:
        return RunFolder(self.root / "runs" / run_id)

    def imported_model(self, model_id: str) -> Path:
        """The ONNX file of a model imported without a run (a run's model lives in its run folder)."""
        return self.root / "models" / model_id / "model.onnx"

    def dataset(self, dataset_id: str) -> Path:
        return self.root / "datasets" / dataset_id

    def incoming_dataset(self, dataset_id: str) -> Path:
        """Where an upload is checked and extracted before it is moved to `dataset(dataset_id)`."""
        return self.root / "datasets" / f".incoming-{dataset_id}"

    @property
    def uploads(self) -> Path:
        return self.root / "uploads"

    def relative(self, path: Path) -> str:
        """The stored form of a path inside the store."""
        return path.relative_to(self.root).as_posix()

    def resolve(self, relative: str) -> Path:
        """A stored relative path on this host; refuses paths that would leave the store."""
        parts = PurePosixPath(relative)
        if parts.is_absolute() or ".." in parts.parts or not parts.parts:
            raise ValueError(f"{relative!r} is not a path inside the artifact store")
        return self.root.joinpath(*parts.parts)
