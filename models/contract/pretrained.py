"""Where a run's stage 1 takes its initial weights from: a file under the data root, or a torchvision
weights name resolved from the torch hub cache. Torch-free, so the API validates a run's weights with
the same definition the worker loads them by."""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator

# Whether the classifier head comes from the weights too: "reinit" keeps the run's own random head
# (the label sets differ, as ImageNet weights for Places-LT); "load" requires a head of this run's shape;
# "auto" loads the head when its shape fits and re-initialises it otherwise.
HeadInit = Literal["reinit", "load", "auto"]

# The torchvision weights enum of each backbone that has one (resnet32, the CIFAR ResNet, has none).
TORCHVISION_WEIGHTS: dict[str, str] = {
    "resnet18": "ResNet18_Weights",
    "resnet34": "ResNet34_Weights",
    "resnet50": "ResNet50_Weights",
    "resnet152": "ResNet152_Weights",
    "resnext50_32x4d": "ResNeXt50_32X4D_Weights",
}

WEIGHT_FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def check_relative_path(value: str) -> str:
    """A path relative to the data root that cannot leave it by its spelling: no absolute path, drive,
    backslash or `..`. Symlinks are checked against the real file system by `resolve_in_root`."""
    if "\x00" in value or "\\" in value:
        raise ValueError("must be a POSIX path relative to the data root")
    if value.startswith("/") or (len(value) > 1 and value[1] == ":"):
        raise ValueError("must be relative to the data root, not an absolute path")
    parts = PurePosixPath(value).parts
    if ".." in parts:
        raise ValueError("must stay inside the data root ('..' is refused)")
    if not [p for p in parts if p != "."]:
        raise ValueError("must name a file under the data root")
    if any(len(p.encode()) > 255 for p in parts):
        raise ValueError("has a file or folder name longer than 255 bytes")
    return value


def resolve_in_root(root: Path, relative: str) -> Path:
    """`relative` under `root` on this host, with every symlink followed; refuses a path that ends
    outside the root (absolute, `..`, or a link that leaves it)."""
    check_relative_path(relative)
    real_root = Path(root).resolve()
    try:
        path = (real_root / relative).resolve()
    except (RuntimeError, OSError) as exc:  # a loop of symbolic links (RuntimeError before Python 3.13)
        raise ValueError(f"{relative!r} cannot be resolved: {exc}") from exc
    if not path.is_relative_to(real_root):
        raise ValueError(f"{relative!r} leaves the data root (a symbolic link points outside it)")
    return path


class PretrainedFile(_Frozen):
    """A safetensors file or a torch state dict (read with `weights_only=True`) under the data root, in
    this service's layout (`backbone.*`, `head.*`, as a checkpoint's `model`) or torchvision's
    (`conv1.*`, `layer1.*`, ..., `fc.*`)."""

    file: str = Field(min_length=1, max_length=1000, description="path relative to H2T_DATA_ROOT")
    head: HeadInit = "reinit"

    @field_validator("file")
    @classmethod
    def _inside_the_data_root(cls, value: str) -> str:
        check_relative_path(value)
        if not value.endswith(WEIGHT_FILE_SUFFIXES):
            raise ValueError(f"must be a weights file ending in one of {', '.join(WEIGHT_FILE_SUFFIXES)}")
        return value


class TorchvisionWeights(_Frozen):
    """A torchvision weights enum member, e.g. `ResNet152_Weights.IMAGENET1K_V1`, read from the torch hub
    cache (`$TORCH_HOME/hub/checkpoints/<the file name of its URL>`); downloaded only when the operator
    sets H2T_ALLOW_WEIGHT_DOWNLOAD."""

    torchvision: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9]*_Weights\.[A-Z][A-Z0-9_]*$", max_length=100)
    head: HeadInit = "reinit"

    @property
    def enum_name(self) -> str:
        return self.torchvision.split(".", 1)[0]


def _weights_tag(value: object) -> str | None:
    for tag in ("file", "torchvision"):
        if (tag in value) if isinstance(value, dict) else hasattr(value, tag):
            return tag
    return None


PretrainedWeights = Annotated[
    Annotated[PretrainedFile, Tag("file")] | Annotated[TorchvisionWeights, Tag("torchvision")],
    Discriminator(_weights_tag, custom_error_type="pretrained_kind",
                  custom_error_message="pretrained weights name one of 'file' or 'torchvision'"),
]


def check_weights_fit_backbone(weights: PretrainedFile | TorchvisionWeights | None, backbone: str) -> None:
    """A torchvision weights name must be the enum of the run's backbone."""
    if not isinstance(weights, TorchvisionWeights):
        return
    expected = TORCHVISION_WEIGHTS.get(backbone)
    if expected is None:
        raise ValueError(f"backbone {backbone!r} has no torchvision weights; name a file instead")
    if weights.enum_name != expected:
        raise ValueError(f"backbone {backbone!r} takes {expected}.*, not {weights.torchvision}")
