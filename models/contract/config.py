"""The one definition of a training run's configuration.

Imported by the trainer, the CLI, the worker and the REST API (which validates request bodies with
these very classes), so this module must not import torch.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Annotated, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from models.contract.pretrained import PretrainedWeights, check_relative_path, check_weights_fit_backbone

BuiltinName = Literal["cifar10", "cifar100", "digits"]
BackboneName = Literal["resnet32", "resnet18", "resnet34", "resnet50", "resnet152", "resnext50_32x4d"]
Precision = Literal["auto", "fp32", "bf16"]


class _Frozen(BaseModel):
    # infinities and NaN are no learning rate, ratio or alpha, and JSON cannot carry them back out
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class BuiltinDataset(_Frozen):
    """A long-tailed subset of a builtin balanced dataset (CIFAR-LT style)."""

    kind: ClassVar[str] = "builtin"

    builtin: BuiltinName
    imbalance_factor: float = Field(0.01, gt=0, le=1, description="n_min / n_max, e.g. 0.01 for IR 100")
    profile: Literal["exp", "step"] = "exp"
    sampling_seed: int = Field(0, ge=0, description="seed of the per-class subsampling (0 as in the paper)")


ImageSize = Annotated[int, Field(ge=8, le=512, description="images are resized to this square size")]
REFERENCE_IMAGE_SIZE = 224  # the default of datasets named by reference: the paper's large-set size


# a path relative to the data root that cannot leave it by its spelling; symlinks are checked where the tree
# is read (`models.contract.pretrained.resolve_in_root`)
DataPath = Annotated[str, Field(min_length=1, max_length=1000, description="relative to H2T_DATA_ROOT"),
                     AfterValidator(check_relative_path)]


class FolderDataset(_Frozen):
    """An ImageFolder tree under the data root: `train/<class>/*`, `test/<class>/*`, optional `val/<class>/*`.

    Class names are the train folder names in sorted order. `h2t train` resolves the path against its
    `--data-root` (default `$H2T_DATA_ROOT`), as the service does."""

    kind: ClassVar[str] = "folder"

    folder: DataPath
    image_size: ImageSize = REFERENCE_IMAGE_SIZE


class ListFiles(_Frozen):
    """ImageNet-LT / Places-LT list files: one `<image path relative to root> <integer label>` per line."""

    root: DataPath = Field(description="the folder the listed image paths are relative to")
    train: DataPath = Field(description="list file of the training split, relative to root")
    test: DataPath = Field(description="list file of the held-out split, relative to root")
    val: DataPath | None = Field(None, description="list file of a validation split, relative to root")
    class_names: DataPath | None = Field(
        None, description="file relative to root: line i names label i (default: the labels as text)")


class ListFilesDataset(_Frozen):
    kind: ClassVar[str] = "list_files"

    list_files: ListFiles
    image_size: ImageSize = REFERENCE_IMAGE_SIZE


class CocoFiles(_Frozen):
    """COCO-style annotations as iNaturalist 2018 ships them: `images[]` (id, file_name relative to root),
    `annotations[]` (image_id, category_id), `categories[]` (id, name). Labels are the category ids in
    ascending numeric order, taken from the train file's `categories`."""

    root: DataPath = Field(description="the folder the images' file_name are relative to")
    train: DataPath = Field(description="annotation JSON of the training split, relative to root")
    test: DataPath = Field(description="annotation JSON of the held-out split, relative to root")


class CocoDataset(_Frozen):
    kind: ClassVar[str] = "coco"

    coco: CocoFiles
    image_size: ImageSize = REFERENCE_IMAGE_SIZE


class ArchiveDataset(_Frozen):
    """An uploaded ImageFolder archive, extracted into the artifact store by the API."""

    kind: ClassVar[str] = "archive"

    archive: str = Field(min_length=1, max_length=500, pattern=r"^[^/\\]",
                         description="its folder, relative to the artifact store")
    image_size: ImageSize = 32

    @field_validator("archive")
    @classmethod
    def _inside_the_store(cls, value: str) -> str:
        if ".." in PurePosixPath(value).parts:
            raise ValueError("the archive folder must stay inside the artifact store")
        return value


def dataset_tag(value: object) -> str | None:
    """The variant a dataset spec names by its key (a dict from JSON, or a model already built)."""
    for tag in DATASET_KINDS:
        if (tag in value) if isinstance(value, dict) else hasattr(value, tag):
            return tag
    return None


DATASET_KINDS = (BuiltinDataset.kind, FolderDataset.kind, ListFilesDataset.kind, CocoDataset.kind,
                 ArchiveDataset.kind)
ReferenceDataset = FolderDataset | ListFilesDataset | CocoDataset  # read from under the data root, scanned first

# The one dataset union: its variant is the key a spec names (`{"builtin": ...}`, `{"folder": ...}`,
# `{"list_files": ...}`, `{"coco": ...}`, `{"archive": ...}`), read back from the store by DATASET_SPEC and
# loaded by `models.core.data.load_dataset`.
DatasetConfig = Annotated[
    Annotated[BuiltinDataset, Tag("builtin")] | Annotated[FolderDataset, Tag("folder")]
    | Annotated[ListFilesDataset, Tag("list_files")] | Annotated[CocoDataset, Tag("coco")]
    | Annotated[ArchiveDataset, Tag("archive")],
    Discriminator(dataset_tag, custom_error_type="dataset_kind",
                  custom_error_message="a dataset names one of 'builtin', 'folder', 'list_files', 'coco' or 'archive'"),
]
DatasetSpec = BuiltinDataset | ReferenceDataset | ArchiveDataset  # what DATASET_SPEC reads a stored spec into
DATASET_SPEC: TypeAdapter[DatasetSpec] = TypeAdapter(DatasetConfig)


class GroupConfig(_Frozen):
    """How classes split into many/medium/few-shot groups.

    By training counts (many > many_threshold, few < few_threshold) unless explicit index slices are
    given, as in the paper's CIFAR-100 tables: [[0, 36], [36, 71], [71, 100]].
    """

    many_threshold: int = Field(100, ge=1)
    few_threshold: int = Field(20, ge=1)
    slices: tuple[tuple[int, int], tuple[int, int], tuple[int, int]] | None = None

    @model_validator(mode="after")
    def _check(self) -> GroupConfig:
        if self.few_threshold > self.many_threshold:
            raise ValueError("few_threshold must not exceed many_threshold")
        if self.slices is not None:
            (a0, a1), (b0, b1), (c0, c1) = self.slices
            if not (a0 == 0 and a0 < a1 == b0 < b1 == c0 < c1):
                raise ValueError("slices must be contiguous, non-empty and start at 0, e.g. [[0,36],[36,71],[71,100]]")
        return self

    def check_classes(self, num_classes: int) -> None:
        """Raise ValueError where the slices do not cover exactly a dataset's classes."""
        if self.slices is not None and self.slices[2][1] != num_classes:
            raise ValueError(f"groups.slices must end at the dataset's {num_classes} classes, not {self.slices[2][1]}")


PAPER_CIFAR100_SLICES = ((0, 36), (36, 71), (71, 100))  # the many/medium/few classes of the paper's CIFAR-100 tables


def default_groups(spec: DatasetSpec) -> GroupConfig:
    """The group definition a dataset gets unless its creator gives one: the paper's index slices for builtin
    CIFAR-100 (so reports match its tables), the count thresholds (many > 100, few < 20) for any other."""
    if isinstance(spec, BuiltinDataset) and spec.builtin == "cifar100":
        return GroupConfig(slices=PAPER_CIFAR100_SLICES)
    return GroupConfig()


def validation_sentence(error: ValidationError) -> str:
    """A config's validation errors as one sentence a user reads: `stage2.rho: Input should be less than or
    equal to 1 (got 2); ...`, without pydantic's links."""
    parts = []
    for item in error.errors(include_url=False):
        where = ".".join(str(part) for part in item["loc"] if not str(part).startswith("function-"))
        given = item.get("input")
        shown = f" (got {given!r})" if isinstance(given, (int, float, str, bool)) and len(repr(given)) <= 40 else ""
        parts.append(f"{where}: {item['msg']}{shown}" if where else f"{item['msg']}{shown}")
    return "; ".join(parts)


PAPER_STAGE1_EPOCHS, PAPER_WARMUP_EPOCHS, PAPER_MILESTONES = 200, 5, (160, 180)


def scaled_schedule(epochs_from: int, epochs_to: int, warmup_epochs: int,
                    milestones: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
    """A stage-1 warm-up and lr milestones meant for `epochs_from` epochs, at the same fractions of
    `epochs_to` (a warm-up keeps at least one epoch; milestones stay inside the run and distinct)."""
    scale = epochs_to / epochs_from
    warmup = min(epochs_to, max(1 if warmup_epochs else 0, round(warmup_epochs * scale)))
    steps = tuple(sorted({min(epochs_to, max(1, round(m * scale))) for m in milestones}))
    return warmup, steps


class Stage1Config(_Frozen):
    """End-to-end training of backbone and linear classifier (the paper's CIFAR recipe by default).

    Given `epochs` but neither `warmup_epochs` nor `milestones`, the paper's warm-up and milestones (for 200
    epochs) are scaled to `epochs`, so a shorter run keeps the paper's schedule shape."""

    epochs: int = Field(200, ge=1, le=2000)
    batch_size: int = Field(128, ge=2, le=4096)
    lr: float = Field(0.1, gt=0, le=10)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(2e-4, ge=0, le=1)
    schedule: Literal["multistep", "cosine"] = "multistep"
    warmup_epochs: int = Field(5, ge=0)
    milestones: tuple[int, ...] = PAPER_MILESTONES  # lr x gamma after each of these (1-based) epochs
    gamma: float = Field(0.1, gt=0, le=1)
    mixup_alpha: float = Field(1.0, ge=0, description="input mixup Beta(alpha, alpha); 0 disables it")
    loss: Literal["ce", "logit_adjusted", "balanced_softmax"] = Field(
        "ce", description="ce: cross-entropy (the paper); logit_adjusted: cross-entropy of the logits plus "
        "tau * log(class prior) (Menon et al., ICLR 2021); balanced_softmax: the same with tau 1 (Ren et al., "
        "NeurIPS 2020). The prior is the training split's class frequencies; predictions use the plain logits")
    logit_adjust_tau: float = Field(1.0, ge=0, le=10, description="tau of the logit-adjusted loss")
    augment_policy: Literal["none", "autoaugment_cifar", "randaugment"] = Field(
        "none", description="after the crop and flip, per image: AutoAugment's CIFAR-10 policy or RandAugment "
        "(torchvision's operations, applied to whole batches on the training device)")
    randaugment_ops: int = Field(2, ge=1, le=8, description="operations per image of RandAugment")
    randaugment_magnitude: int = Field(9, ge=0, le=30, description="magnitude bin (of 31) of RandAugment")
    cutout: int = Field(0, ge=0, le=1024, description="side in pixels of the Cutout square, last of the "
                        "augmentations (16 for CIFAR in PaCo's recipe); 0: none")
    sam_rho: float = Field(0.0, ge=0, le=2, description="sharpness-aware minimisation (Foret et al., ICLR 2021): "
                           "the radius of the weight perturbation, 0.05-0.2 typical; 0: plain SGD. Doubles the "
                           "cost of a step")

    @model_validator(mode="before")
    @classmethod
    def _schedule_follows_epochs(cls, data: object) -> object:
        if (isinstance(data, dict) and isinstance(data.get("epochs"), int) and data["epochs"] != PAPER_STAGE1_EPOCHS
                and "warmup_epochs" not in data and "milestones" not in data and data["epochs"] >= 1):
            warmup, milestones = scaled_schedule(PAPER_STAGE1_EPOCHS, data["epochs"], PAPER_WARMUP_EPOCHS,
                                                 PAPER_MILESTONES)
            return {**data, "warmup_epochs": warmup, "milestones": milestones}
        return data

    @model_validator(mode="after")
    def _check(self) -> Stage1Config:
        if list(self.milestones) != sorted(self.milestones):
            raise ValueError("milestones must be increasing")
        if self.warmup_epochs > self.epochs:
            raise ValueError("warmup_epochs must not exceed epochs")
        return self


class Stage2Config(_Frozen):
    """Classifier re-training on a frozen backbone: H2T, or cRT/DR when rho is 0."""

    method: Literal["h2t", "crt"] = "h2t"
    rho: float = Field(0.25, ge=0, le=1, description="fraction of channels fused from the instance branch")
    epochs: int = Field(10, ge=1, le=1000)
    batch_size: int = Field(128, ge=2, le=4096)
    lr: float = Field(0.02, gt=0, le=10, description="peak lr of the per-epoch cosine decay")
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0, le=1)
    shift_bn: bool = Field(True, description="keep updating BatchNorm running statistics of the frozen backbone")
    max_norm: float | None = Field(
        None, gt=0, le=1000, description="after every step, each class's classifier weight vector is scaled down "
        "to at most this L2 norm (MaxNorm, Alshammari et al., CVPR 2022); none: no cap")

    @model_validator(mode="after")
    def _check(self) -> Stage2Config:
        if self.method == "crt" and self.rho != 0:
            raise ValueError("method 'crt' is H2T without fusion: leave rho out or set it to 0")
        return self

    @model_validator(mode="before")
    @classmethod
    def _crt_defaults_to_rho_zero(cls, data: object) -> object:
        if isinstance(data, dict) and data.get("method") == "crt" and "rho" not in data:
            return {**data, "rho": 0.0}
        return data

    @property
    def fusion_ratio(self) -> float:
        return self.rho if self.method == "h2t" else 0.0


CropKind = Literal["pad", "resized"]
PAD_CROP_MAX_SIZE = 64  # "auto" crops CIFAR-scale images (up to this size) the CIFAR way, larger ones ImageNet's


class AugmentConfig(_Frozen):
    """Training-time augmentation of both stages (the paper's CIFAR recipe by default)."""

    crop: Literal["auto", "pad", "resized"] = Field(
        "auto", description="pad: random crop after zero padding by image_size / 8 (CIFAR); resized: "
        "RandomResizedCrop (area 8-100 %, aspect 3/4-4/3) to image_size, and evaluation and serving resize the "
        f"short side to image_size / 0.875 then centre-crop (ImageNet); auto: pad up to {PAD_CROP_MAX_SIZE} px, "
        "resized above")
    random_crop: bool = Field(True, description="draw random crops; off: the centred crop of the chosen kind")
    horizontal_flip: bool = Field(True, description="turn off where mirroring changes the class, e.g. digits")

    def crop_kind(self, image_size: int) -> CropKind:
        if self.crop != "auto":
            return self.crop
        return "pad" if image_size <= PAD_CROP_MAX_SIZE else "resized"


class LoaderConfig(_Frozen):
    """Where training images come from: held decoded in memory (on the training device), or streamed from
    their files and decoded per batch. Both give the same batches for the same draws."""

    mode: Literal["auto", "memory", "streaming"] = Field(
        "auto", description="auto: in memory when the decoded train and test splits fit memory_limit_mb, else "
        "streaming; streaming needs a dataset by reference (files under the data root)")
    memory_limit_mb: int = Field(2048, ge=0, le=1_000_000,
                                 description="largest decoded dataset (N x 3 x S x S bytes) auto holds in memory")
    workers: int | None = Field(None, ge=0, le=64, description="decoding processes of the streaming path; "
                                "default: the CPU count, at most 16; 0 decodes in the training process")
    decode_on_device: bool = Field(True, description="on a CUDA device, decode JPEGs on the GPU (nvJPEG); "
                                   "worker processes then only read the files")

    def streams(self, images: int, image_size: int, by_reference: bool) -> bool:
        """Whether a dataset of `images` at `image_size` goes through the streaming path."""
        if not by_reference:
            if self.mode == "streaming":
                raise ValueError("the streaming path reads image files: only a dataset by reference "
                                 "('folder', 'list_files' or 'coco') can stream")
            return False
        if self.mode == "memory":
            return False
        if self.mode == "streaming":
            return True
        return images * 3 * image_size * image_size > self.memory_limit_mb * 2**20


MAX_RUN_DEVICES = 64  # one host's GPUs, with room


UNUSED_VALIDATION_PER_CLASS = 20


class ValidationConfig(_Frozen):
    """A validation split held out for post-hoc calibration; never the test split, never trained on."""

    source: Literal["auto", "unused", "carve", "dataset"] = Field(
        "auto", description="unused: for builtin long-tailed sets, images of the balanced training set that the "
        "long-tailed subset left out (extra labelled data, which the report says); carve: a per-class fraction "
        "of the training images, removed from training; dataset: the dataset's own val split; auto: unused for "
        "builtin sets, else the dataset's val split where it has one, else carve")
    per_class: int = Field(UNUSED_VALIDATION_PER_CLASS, ge=1, le=10_000,
                           description="unused: images per class (fewer where fewer are left)")
    fraction: float = Field(0.1, gt=0, lt=1, description="carve: fraction of each class's training images, at "
                            "least one (a class with a single training image keeps it)")
    calibration: Literal["none", "overall", "group", "class"] = Field(
        "class", description="the temperature scaling fitted on the split after stage 2 and applied by the exported "
        "model: one temperature, one per group of the predicted class, or one per predicted class shrunk "
        "towards its group's; none: measure only")
    logit_adjustment: bool = Field(
        False, description="also fit a post-hoc logit adjustment on the split before the temperatures: the logits "
        "minus tau x log of the training class frequencies, tau (from -1 to 2) chosen for the best mean per-class "
        "accuracy on the split; unlike the temperatures it changes predictions (tau 0 when nothing helps)")

    def fitted(self) -> str:
        """What is fitted on the split, in words."""
        parts = (["a logit adjustment"] if self.logit_adjustment else []) + (
            [] if self.calibration == "none" else [f"temperatures ({self.calibration})"])
        return " then ".join(parts) or "nothing (calibration none): it measures the model on them"

    def check_for(self, spec: object) -> None:
        """Refuse a source the dataset cannot give (ValueError)."""
        if self.source == "unused" and not isinstance(spec, BuiltinDataset):
            raise ValueError("source 'unused' is for builtin long-tailed datasets; use 'carve' or 'dataset'")
        if self.source == "dataset" and not isinstance(spec, FolderDataset | ListFilesDataset | CocoDataset):
            raise ValueError("only a dataset by reference can have its own val split; use source 'carve'")

    def may_carve(self, spec: object) -> bool:
        """Whether the split may be taken out of the training images (`auto` carves where a dataset by reference
        has no val split), so that a stage 1 trained without the same split saw its images."""
        return self.source == "carve" or (self.source == "auto" and not isinstance(spec, BuiltinDataset))


class RunConfig(_Frozen):
    """Everything that determines a two-stage run, except the dataset it runs on."""

    seed: int = Field(0, ge=0, le=2**31 - 1)
    backbone: BackboneName = "resnet32"
    precision: Precision = Field("auto", description="auto: bf16 autocast where the hardware has it, else fp32")
    groups: GroupConfig | None = Field(
        None, description="many/medium/few classes; default: the dataset's group definition (the service refuses "
        "another, so every run and report on a dataset uses the same groups)")
    augment: AugmentConfig = AugmentConfig()
    loader: LoaderConfig = LoaderConfig()
    devices: int = Field(
        1, ge=1, le=MAX_RUN_DEVICES, description="GPUs of one worker host the run trains on, data-parallel "
        "(torch.distributed, one process per GPU); on a worker without GPUs, CPU processes. The global batch and "
        "the sample order are those of one device; a run asking for more than any worker owns is refused")
    sync_batchnorm: bool = Field(
        False, description="with devices > 1: BatchNorm statistics over the global batch while training "
        "(SyncBatchNorm, CUDA only), as on one device; off: each device normalises its own share")
    stage1: Stage1Config = Stage1Config()
    stage2: Stage2Config = Stage2Config()
    validation: ValidationConfig | None = Field(
        None, description="hold out a validation split and calibrate the final model's probabilities on it; "
        "none: the paper's protocol (train and test splits only)")
    pretrained: PretrainedWeights | None = Field(
        None, description="initial weights of stage 1 (a file under the data root or a torchvision weights name); "
        "a stage-1 checkpoint to resume from wins over them")

    @model_validator(mode="after")
    def _weights_fit_the_backbone(self) -> RunConfig:
        check_weights_fit_backbone(self.pretrained, self.backbone)
        return self


class LocalTrainConfig(RunConfig):
    """The YAML file of `h2t train`: a run plus the dataset it runs on."""

    dataset: DatasetConfig

    @model_validator(mode="after")
    def _streaming_needs_files(self) -> LocalTrainConfig:
        self.loader.streams(0, 1, isinstance(self.dataset, ReferenceDataset))
        return self

    @model_validator(mode="after")
    def _groups_default_to_the_datasets(self) -> LocalTrainConfig:
        if self.groups is None:
            object.__setattr__(self, "groups", default_groups(self.dataset))
        return self
