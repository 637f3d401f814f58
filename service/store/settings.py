"""One settings class for the API, the worker and the CLI, read from `H2T_*` environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from models.contract.config import MAX_RUN_DEVICES
from models.contract.layout import ArtifactLayout

DEFAULT_HOME = Path("./h2t-data")


class Settings(BaseSettings):
    """Defaults are the embedded single-machine setup: SQLite store, SQLite broker, local disk."""

    model_config = SettingsConfigDict(env_prefix="H2T_", frozen=True)

    home: Path = Field(DEFAULT_HOME, description="the embedded setup's folder: the store, broker and artifacts "
                       "default to files under it, so two setups with two homes never share a queue")
    database_url: str = Field("", description="SQLAlchemy URL of the store (default: SQLite in the home)")
    broker_url: str = Field("", description="Celery broker: redis://... in production; the default, SQLite in the "
                            "home, needs no server")
    artifact_dir: Path = Field(Path(), description="checkpoints, uploaded datasets, ONNX files "
                               "(default: HOME/artifacts)")
    data_root: Path = Field(Path("./data"), description="where the builtin CIFAR python files and the datasets "
                           "by reference live")
    allow_weight_download: bool = Field(
        False, description="let workers download torchvision weights a run names that are missing from the torch hub "
        "cache ($TORCH_HOME/hub/checkpoints); off: such a run fails with the path the file is expected at")
    api_keys: Annotated[tuple[str, ...], NoDecode] = Field(
        (), description="comma-separated keys accepted in the X-API-Key header; at least one is required")
    queue_name: str = Field("training", description="Celery queue the workers consume")

    max_upload_bytes: int = Field(512 * 2**20, gt=0, description="largest accepted request body (archive)")
    max_json_body_bytes: int = Field(64 * 2**10, gt=0, description="largest body of the other JSON endpoints (runs)")
    max_archive_members: int = Field(200_000, gt=0)
    max_archive_bytes: int = Field(4 * 2**30, gt=0, description="largest total uncompressed archive size")
    max_archive_member_bytes: int = Field(64 * 2**20, gt=0, description="largest uncompressed file in an archive")
    max_image_pixels: int = Field(4096 * 4096, gt=0, description="largest width x height of one image")

    predict_max_images: int = Field(64, gt=0, description="images in one predict request")
    predict_max_image_bytes: int = Field(10 * 2**20, gt=0, description="encoded size of one predicted image")
    infer_max_bytes: int = Field(64 * 2**20, gt=0, description="body of one Open Inference Protocol infer request "
                                 "(tensors as JSON numbers or binary)")
    predict_batching: bool = Field(True, description="combine concurrent predict requests into one inference")
    predict_max_batch: int = Field(64, gt=0, description="images per combined inference")
    predict_max_wait_ms: float | None = Field(
        None, ge=0, description="longest extra wait for requests to join a batch, taken only while requests arrive "
        "concurrently; 0 takes only what queued while the last batch ran; default: 2 ms for a model on a GPU, 0 on "
        "the CPU")
    model_cache_size: int = Field(4, gt=0, description="onnxruntime sessions kept loaded (per API process)")
    api_processes: int = Field(1, ge=1, le=64, description="processes `h2t serve` runs the API in, sharing its port: "
                               "one per core the host can give to serving; each keeps its own model cache and "
                               "request batcher")
    inference_threads: int = Field(
        0, ge=0, le=1024, description="CPU threads of one onnxruntime inference in the API; 0: onnxruntime's "
        "default, every core. With several API processes on a host of many cores, cores / processes keeps them from "
        "fighting over the cores")

    heartbeat_interval_s: float = Field(10.0, gt=0, description="how often a training worker proves it is alive")
    heartbeat_timeout_s: float = Field(120.0, gt=0, description="a running run silent this long is requeued")
    resend_after_s: float = Field(
        900.0, gt=0, description="a run still queued this long after it was sent to the broker is sent again "
        "(a broker restart or a failed claim may have lost its message; one claim wins, extra messages are skipped)")
    max_attempts: int = Field(3, ge=1, description="claims of one run before a lost worker marks it failed")
    sweep_interval_s: float = Field(30.0, gt=0, description="how often stale runs are looked for")

    worker_devices: int | None = Field(
        None, ge=1, le=MAX_RUN_DEVICES, description="devices one worker process owns: it takes runs asking for up "
        "to this many and trains them data-parallel; default: the GPUs it sees (CUDA_VISIBLE_DEVICES), or 1 without "
        "CUDA (set it to train a run on several CPU processes)")
    worker_processes: int = Field(
        1, ge=1, le=64, description="worker processes `h2t worker` starts on this host's devices, each taking its own "
        "runs: above 1, small runs share a GPU (each process must fit its runs in the GPU's memory)")
    worker_seen_within_s: float = Field(
        86400.0, gt=0, description="a worker not heard of for this long no longer counts when a run asks for devices")

    @model_validator(mode="before")
    @classmethod
    def _defaults_under_home(cls, data: object) -> object:
        if not isinstance(data, dict):
            return data
        home = Path(data.get("home") or DEFAULT_HOME)
        defaults = {"database_url": f"sqlite:///{home}/h2t.db", "broker_url": f"sqla+sqlite:///{home}/broker.db",
                    "artifact_dir": home / "artifacts"}
        return {**data, **{key: value for key, value in defaults.items() if not data.get(key)}}

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(k.strip() for k in value.split(",") if k.strip())
        return value

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.heartbeat_timeout_s <= 2 * self.heartbeat_interval_s:
            raise ValueError("H2T_HEARTBEAT_TIMEOUT_S must exceed twice H2T_HEARTBEAT_INTERVAL_S")
        return self

    @property
    def artifacts(self) -> ArtifactLayout:
        """The artifact store's layout; stored paths are relative to it."""
        return ArtifactLayout(self.artifact_dir)

    def require_api_keys(self) -> None:
        if not self.api_keys:
            raise ValueError("set H2T_API_KEYS to at least one key (comma-separated) before serving")

    def ensure_local_dirs(self) -> None:
        """Create the artifact dir and the folders of SQLite files named by the URLs."""
        self.artifact_dir.mkdir(parents=True, exist_ok=True)
        for url in (self.database_url, self.broker_url):
            if "sqlite:///" in url:
                path = url.split("sqlite:///", 1)[1].split("?", 1)[0]
                if path and path != ":memory:":
                    Path(path).parent.mkdir(parents=True, exist_ok=True)


@lru_cache
def get_settings() -> Settings:
    return Settings()
