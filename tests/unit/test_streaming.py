"""The streaming data path against the in-memory one, over real image files the tests write.

CIFAR-100-LT images (digits where CIFAR is absent) saved as PNG files in an ImageFolder tree: PNG is
lossless, so the in-memory path holds exactly the pixels the streaming path decodes per batch, and for
the same draws both must give the same batches, bit for bit, and train the same model.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.contract.config import (
    AugmentConfig,
    BuiltinDataset,
    FolderDataset,
    LoaderConfig,
    LocalTrainConfig,
    RunConfig,
)
from models.contract.layout import RunFolder
from models.contract.onnx_model import fit_box, read_rgb
from models.contract.reference import FileList
from models.core.augment import Augmentation, ResizedCropFlip
from models.core.backbones import build_classifier
from models.core.data import Dataset, FileSet, ImageSet, cifar_long_tailed, digits_long_tailed, load_dataset
from models.core.source import (
    MemorySource,
    StreamingSource,
    decode_on_device,
    held_out_batches,
    read_augmented,
    read_bytes,
    source_for,
)
from models.core.stages import Stage1Recipe, Stage2Recipe
from models.core.train import TrainingCancelled, epoch_generator, run_stage, train_two_stage
from tests.conftest import SHARED_DATA
from tests.helpers import tiny_run_config

CPU = torch.device("cpu")
CLASSES = (0, 20, 40, 60, 80, 99)  # of CIFAR-100-LT (IR 100): 500, 197, 78, 31, 12 and 5 training images
PER_CLASS_CAP, TEST_PER_CLASS = 40, 8
STREAMING = LoaderConfig(mode="streaming", workers=2)
MEMORY = LoaderConfig(mode="memory")


def _lt_source() -> tuple[Dataset, tuple[int, ...]]:
    if (SHARED_DATA / "cifar-100-python" / "train").exists():
        return cifar_long_tailed(SHARED_DATA, BuiltinDataset(builtin="cifar100")), CLASSES
    return digits_long_tailed(BuiltinDataset(builtin="digits", imbalance_factor=0.1)), (0, 2, 4, 6, 8, 9)


def _write_png_tree(root: Path) -> tuple[Dataset, tuple[int, ...]]:
    """root/pngs/{train,test}/<class>/<n>.png from a long-tailed builtin; returns it and the classes kept."""
    source, classes = _lt_source()
    for split_name, split, cap in (("train", source.train, PER_CLASS_CAP), ("test", source.test, TEST_PER_CLASS)):
        for rank, cls in enumerate(classes):
            folder = root / "pngs" / split_name / f"{rank}_{source.class_names[cls]}"
            folder.mkdir(parents=True)
            for n, i in enumerate((split.labels == cls).nonzero().flatten()[:cap].tolist()):
                Image.fromarray(split.images[i].permute(1, 2, 0).numpy()).save(folder / f"{n:04d}.png")
    return source, classes


@pytest.fixture(scope="module")
def png_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("streaming")
    _write_png_tree(root)
    return root


def _spec(root: Path) -> FolderDataset:
    return FolderDataset(folder="pngs", image_size=_image_size(root))


def _image_size(root: Path) -> int:
    first = next((root / "pngs" / "train").glob("*/*.png"))
    with Image.open(first) as image:
        return image.size[0]


def _load(root: Path, loader: LoaderConfig, augment: AugmentConfig | None = None) -> Dataset:
    return load_dataset(_spec(root), root, augment=augment or AugmentConfig(), loader=loader)


def _config(**overrides) -> RunConfig:
    return RunConfig.model_validate(tiny_run_config(**{"augment": {"horizontal_flip": True}, **overrides}))


def test_the_png_tree_holds_exactly_the_builtin_pixels(png_root):
    memory = _load(png_root, MEMORY)
    assert isinstance(memory.train, ImageSet) and memory.train.images.shape[0] > 0
    source, classes = _lt_source()
    first = (source.train.labels == classes[0]).nonzero().flatten()[:PER_CLASS_CAP]
    assert torch.equal(memory.train.images[:len(first)], source.train.images[first])


def test_a_streamed_dataset_keeps_file_names_packed_not_as_a_python_object_per_image(png_root):
    streamed = _load(png_root, STREAMING)
    assert isinstance(streamed.train, FileSet) and isinstance(streamed.test, FileSet)
    assert isinstance(streamed.train.files, FileList) and len(streamed.train) == len(_load(png_root, MEMORY).train)
    assert streamed.streams and not _load(png_root, MEMORY).streams


def _epoch_batches(dataset: Dataset, config: RunConfig, recipe, epoch: int) -> list:
    source = source_for(dataset, config, CPU)
    steps = recipe.draw_epoch(source.train_labels, source.augmentation, 64, epoch_generator(config.seed, recipe.stage,
                                                                                          epoch), CPU)
    return [[(b.images.clone(), b.labels.clone()) for b in batches]
            for batches in source.steps([s.requests for s in steps])]


@pytest.mark.parametrize("stage", [1, 2])
def test_streaming_batches_from_png_files_are_bit_identical_to_in_memory_batches_for_the_same_draws(png_root, stage):
    config = _config(stage1={"batch_size": 24, "mixup_alpha": 1.0}, stage2={"batch_size": 24, "rho": 0.5})
    recipe = Stage1Recipe(config.stage1) if stage == 1 else Stage2Recipe(config.stage2)
    memory, streamed = _load(png_root, MEMORY), _load(png_root, STREAMING)
    for epoch in (0, 1):
        expected = _epoch_batches(memory, config, recipe, epoch)
        actual = _epoch_batches(streamed, config, recipe, epoch)
        assert len(actual) == len(expected) > 3
        # stage 2 asks for two batches per step: the class-balanced x1 and the instance-sampled x2 it fuses
        assert {len(step) for step in actual} == {1 if stage == 1 else 2}
        for got, want in zip(actual, expected, strict=True):
            for (x, y), (x0, y0) in zip(got, want, strict=True):
                assert torch.equal(x, x0) and torch.equal(y, y0)


def test_both_paths_train_the_same_model_and_report_the_same_metrics(png_root, tmp_path):
    config = _config()
    memory = train_two_stage(_load(png_root, MEMORY), config, RunFolder(tmp_path / "memory"), CPU)
    streamed = train_two_stage(_load(png_root, STREAMING), config, RunFolder(tmp_path / "streamed"), CPU)
    for key, value in memory.model.state_dict().items():
        assert torch.equal(value, streamed.model.state_dict()[key]), key
    strip = lambda ms: [(m.loss, m.top1, m.ece) for m in ms]  # noqa: E731
    assert strip(memory.stage1) == strip(streamed.stage1) and strip(memory.stage2) == strip(streamed.stage2)


@pytest.mark.parametrize("stop_at", [(1, 2), (2, 1)])
def test_resume_after_interrupt_equals_an_uninterrupted_run_on_the_streaming_path(png_root, tmp_path, stop_at):
    config = _config(seed=5)
    dataset = _load(png_root, STREAMING)
    straight = train_two_stage(dataset, config, RunFolder(tmp_path / "straight"), CPU)

    def interrupt(m):
        if (m.stage, m.epoch) == stop_at:
            raise TrainingCancelled

    with pytest.raises(TrainingCancelled):
        train_two_stage(dataset, config, RunFolder(tmp_path / "resumed"), CPU, on_epoch=interrupt)
    resumed = train_two_stage(dataset, config, RunFolder(tmp_path / "resumed"), CPU)
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    assert [m.loss for m in straight.stage2] == [m.loss for m in resumed.stage2]


@pytest.mark.parametrize("shift_bn", [False, True])
def test_stage2_on_the_streaming_path_trains_the_head_and_leaves_backbone_weights_unchanged(png_root, tmp_path,
                                                                                             shift_bn):
    config = _config(stage2={"rho": 0.5, "shift_bn": shift_bn})
    dataset = _load(png_root, STREAMING)
    torch.manual_seed(0)
    model = build_classifier("resnet32", dataset.num_classes).to(memory_format=torch.channels_last)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run_stage(model, dataset, source_for(dataset, config, CPU), config, Stage2Recipe(config.stage2),
              RunFolder(tmp_path).create())
    after = model.state_dict()
    params = {k for k, _ in model.backbone.named_parameters(prefix="backbone")}
    assert params and all(torch.equal(before[k], after[k]) for k in params)
    buffers = [k for k in before if k.startswith("backbone.") and "running" in k]
    # BatchNorm statistics follow the re-sampled batches only when asked to
    assert all(torch.equal(before[k], after[k]) for k in buffers) is (not shift_bn)
    assert not torch.equal(before["head.fc.weight"], after["head.fc.weight"])


# --- large images: resized crops, centre-crop evaluation -------------------------------------------------------

def test_resized_crop_boxes_follow_torchvision_rules_for_any_image_shape():
    draws = ResizedCropFlip.draw(500, torch.Generator().manual_seed(0))
    for width, height in ((500, 375), (64, 320), (1000, 40), (224, 224)):
        for i in range(500):
            left, top, w, h = draws.crop_box(i, width, height)
            assert left >= 0 and left + w <= width and top >= 0 and top + h <= height and w > 0 and h > 0
    # an image within the ratio range always finds a box on some attempt: area 8..100 %, aspect 3/4..4/3
    boxes = [draws.crop_box(i, 500, 375) for i in range(500)]
    areas = np.array([w * h / (500 * 375) for _, _, w, h in boxes])
    ratios = np.array([w / h for _, _, w, h in boxes])
    assert areas.min() >= 0.07 and areas.max() <= 1.0 and ratios.min() >= 0.74 and ratios.max() <= 1.34
    assert areas.std() > 0.15  # spread over the range, not collapsed on the fallback
    # a 25:1 strip never fits an attempt: the fallback keeps the full height and clamps the aspect to 4/3
    assert draws.crop_box(0, 1000, 40) == ((1000 - 53) // 2, 0, 53, 40)
    whole = ResizedCropFlip.draw(3, torch.Generator(), crop=False)
    assert whole.crop_box(0, 300, 280) == (0, 0, 300, 280)


def test_centre_crop_fit_resizes_the_short_side_to_size_over_0_875_and_keeps_the_aspect():
    size, box = fit_box(500, 375, 224, "center_crop")
    assert size == (341, 256) and box == (58, 16, 282, 240)
    assert fit_box(500, 375, 224, "squash") == ((224, 224), (0, 0, 224, 224))


def _reference_files(reference_root) -> tuple[Dataset, Path]:
    root, tree = reference_root
    spec = FolderDataset(folder=tree.folder, image_size=48)
    return load_dataset(spec, root, augment=AugmentConfig(crop="resized"), loader=STREAMING), root


def test_streaming_resized_crops_of_jpegs_decode_at_reduced_scale_close_to_a_full_decode(reference_root):
    dataset, _ = _reference_files(reference_root)
    files = dataset.train
    draws = ResizedCropFlip.draw(len(files), torch.Generator().manual_seed(3))
    indices = torch.arange(len(files))
    fast = read_augmented(files, indices, draws, Augmentation("resized", 48))
    full = torch.empty_like(fast)
    for k in range(len(files)):  # the whole JPEG decoded, then the same box resized
        with Image.open(files.path(k)) as image:
            left, top, w, h = draws.crop_box(k, *image.size)
            rgb = np.asarray(image.convert("RGB").resize((48, 48), Image.BILINEAR, box=(left, top, left + w, top + h)))
        full[k] = torch.from_numpy((rgb[:, ::-1] if draws.flip[k] else rgb).transpose(2, 0, 1).copy())
    assert fast.shape == (len(files), 3, 48, 48)
    assert (fast.float() - full.float()).abs().mean() < 4  # DCT scaling changes a few levels, not the picture


def test_decoding_on_the_training_device_gives_the_same_crops_as_the_worker_path(reference_root):
    # the nvJPEG path on a GPU; run here on the CPU through the same code
    dataset, _ = _reference_files(reference_root)
    files = dataset.train
    indices = torch.arange(0, len(files), 3)
    draws = ResizedCropFlip.draw(len(indices), torch.Generator().manual_seed(4))
    on_device = decode_on_device(*read_bytes(files, indices), draws, 48, CPU)
    in_workers = read_augmented(files, indices, draws, Augmentation("resized", 48))
    assert on_device.shape == in_workers.shape and on_device.dtype == torch.uint8
    assert (on_device.float() - in_workers.float()).abs().mean() < 6


def test_resized_runs_evaluate_and_export_centre_crops_exactly_as_serving_decodes(reference_root):
    dataset, root = _reference_files(reference_root)
    assert dataset.eval_fit == "center_crop"
    first = next(held_out_batches(dataset.test, dataset.eval_fit, 4))
    assert torch.equal(first[0], torch.from_numpy(np.array(read_rgb(dataset.test.path(0), 48, fit="center_crop"))))
    memory = load_dataset(FolderDataset(folder=reference_root[1].folder, image_size=48), root,
                          augment=AugmentConfig(crop="resized"), loader=MEMORY)
    assert torch.equal(memory.test.images[:4], first)  # in memory too: test images are held fitted


def test_a_streaming_run_on_large_jpegs_trains_with_resized_crops(reference_root, tmp_path):
    dataset, _ = _reference_files(reference_root)
    config = _config(augment={"crop": "resized"}, loader={"mode": "streaming", "workers": 2})
    source = source_for(dataset, config, CPU)
    assert isinstance(source, StreamingSource) and source.augmentation.kind == "resized"
    result = train_two_stage(dataset, config, RunFolder(tmp_path), CPU)
    assert len(result.stage1) == 3 and np.isfinite([m.loss for m in result.stage1 + result.stage2]).all()


def test_memory_source_holds_resized_crops_of_the_held_squares(png_root):
    dataset = _load(png_root, MEMORY, AugmentConfig(crop="resized"))
    source = source_for(dataset, _config(augment={"crop": "resized"}), CPU)
    assert isinstance(source, MemorySource)
    draws = source.augmentation.draw(4, torch.Generator().manual_seed(0))
    (batch,) = next(source.steps([[(torch.arange(4), draws)]]))
    assert batch.images.shape == (4, 3, dataset.image_size, dataset.image_size)


# --- choosing the path ----------------------------------------------------------------------------------------

def test_auto_holds_a_dataset_in_memory_until_its_decoded_size_passes_the_limit():
    auto = LoaderConfig(memory_limit_mb=400)
    assert not auto.streams(100_000, 32, by_reference=True)  # 307 MB decoded
    assert auto.streams(100_000, 64, by_reference=True)  # 1.2 GB
    assert not LoaderConfig(mode="memory").streams(10**7, 224, by_reference=True)
    assert LoaderConfig(mode="streaming").streams(1, 8, by_reference=True)
    assert not auto.streams(10**7, 224, by_reference=False)  # builtins and archives have no files to stream


def test_streaming_a_dataset_without_files_is_refused_up_front():
    with pytest.raises(ValueError, match="only a dataset by reference"):
        LocalTrainConfig.model_validate({"dataset": {"builtin": "digits"}, "loader": {"mode": "streaming"}})
    with pytest.raises(ValueError, match="only a dataset by reference"):
        load_dataset(BuiltinDataset(builtin="digits"), loader=LoaderConfig(mode="streaming"))


def test_auto_crop_is_cifars_pad_crop_for_small_images_and_resized_crop_for_large_ones():
    assert AugmentConfig().crop_kind(32) == "pad" and AugmentConfig().crop_kind(224) == "resized"
    assert AugmentConfig(crop="resized").crop_kind(32) == "resized"


def test_a_streamed_dataset_normalises_with_the_statistics_of_the_images_it_samples(png_root):
    memory, streamed = _load(png_root, MEMORY), _load(png_root, STREAMING)
    assert streamed.mean == memory.mean and streamed.std == memory.std  # the same sample, the same bits
    held = memory.train.images.float() / 255  # this small set is sampled whole
    assert memory.mean == pytest.approx(held.mean(dim=(0, 2, 3)).tolist(), abs=1e-5)
    assert memory.std == pytest.approx(held.std(dim=(0, 2, 3)).tolist(), abs=1e-4)


def test_a_streamed_cpu_batch_stays_valid_while_its_step_and_the_next_one_train(png_root):
    # the trainer normalises into two reused buffers per request, alternating by step
    dataset = _load(png_root, STREAMING)
    config = _config(stage1={"batch_size": 16})
    source = source_for(dataset, config, CPU)
    steps = Stage1Recipe(config.stage1).draw_epoch(source.train_labels, source.augmentation, 64,
                                                   epoch_generator(0, 1, 0), CPU)
    batches = source.steps([s.requests for s in steps])
    first = next(batches)[0]
    kept = first.images.clone()
    second = next(batches)[0]
    assert torch.equal(first.images, kept) and second.images.data_ptr() != first.images.data_ptr()
    third = next(batches)[0]
    assert third.images.data_ptr() == first.images.data_ptr()  # the buffer comes back two steps later


def _children() -> set[int]:
    import multiprocessing

    return {child.pid for child in multiprocessing.active_children()}


def test_a_file_that_stops_decoding_mid_epoch_fails_the_run_naming_it_and_leaves_no_worker_running(
        reference_root, tmp_path):
    root, tree = reference_root
    copy = tmp_path / "root"
    shutil.copytree(root / tree.folder, copy / "lt")
    dataset = load_dataset(FolderDataset(folder="lt", image_size=32), copy, loader=STREAMING)
    victim = dataset.train.name(len(dataset.train) - 1)
    (copy / victim).write_bytes((copy / victim).read_bytes()[:300])  # truncated after its header
    before = _children()
    with pytest.raises(ValueError) as failure:
        train_two_stage(dataset, _config(), RunFolder(tmp_path / "run"), CPU)
    assert str(failure.value).startswith(f"{victim} could not be decoded: ") and "Traceback" not in str(failure.value)
    assert _children() <= before  # the decoding workers were stopped with the error, not left to the collector


def test_the_normalisation_sample_names_a_file_that_does_not_decode(reference_root, tmp_path):
    root, tree = reference_root
    copy = tmp_path / "root"
    shutil.copytree(root / tree.folder, copy / "lt")
    spec = FolderDataset(folder="lt", image_size=32)
    first = load_dataset(spec, copy, loader=STREAMING).train.name(0)  # a small set is sampled whole
    data = (copy / first).read_bytes()
    (copy / first).write_bytes(data[:len(data) // 2])  # the header stays: the scan keeps it
    with pytest.raises(ValueError, match=f"{first} could not be decoded"):
        load_dataset(spec, copy, loader=STREAMING)
