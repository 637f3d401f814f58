from pathlib import Path

import pytest
import torch

from models.contract.config import AugmentConfig, BuiltinDataset, RunConfig, Stage1Config, Stage2Config
from models.core.backbones import build_classifier
from models.core.data import digits_long_tailed
from models.core.train import (
    CHECKPOINT_NAME,
    DeviceData,
    TrainingCancelled,
    load_checkpoint,
    lr_at,
    run_stage,
    train_two_stage,
)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def digits():
    return digits_long_tailed(BuiltinDataset(builtin="digits", imbalance_factor=0.05))


def tiny_config(**stage2) -> RunConfig:
    return RunConfig(
        seed=3,
        stage1=Stage1Config(epochs=3, batch_size=64, lr=0.05, warmup_epochs=1, milestones=(2,), mixup_alpha=1.0),
        stage2=Stage2Config(epochs=2, batch_size=64, **stage2),
    )


def test_stage1_schedule_warms_up_linearly_then_steps_down_at_milestones():
    config = Stage1Config()  # the paper's: lr 0.1, 5 warm-up epochs, x0.1 after 160 and 180
    assert [round(lr_at(config, e), 6) for e in range(6)] == [0.02, 0.04, 0.06, 0.08, 0.1, 0.1]
    assert lr_at(config, 159) == pytest.approx(0.1)
    assert lr_at(config, 160) == pytest.approx(0.01)
    assert lr_at(config, 180) == pytest.approx(0.001)


def test_stage2_schedule_is_per_epoch_cosine_from_the_peak():
    config = Stage2Config()  # peak 0.02 over 10 epochs
    assert lr_at(config, 0) == pytest.approx(0.02)
    assert lr_at(config, 5) == pytest.approx(0.01)
    assert lr_at(config, 9) == pytest.approx(0.01 * (1 + torch.cos(torch.tensor(0.9 * torch.pi)).item()))


@pytest.mark.parametrize("name, size", [("resnet32", 16), ("resnet18", 32)])
def test_backbones_expose_feature_maps_and_a_pooled_linear_head(name, size):
    model = build_classifier(name, num_classes=7)
    maps = model.forward_features(torch.randn(2, 3, size, size))
    assert maps.ndim == 4 and maps.shape[1] == model.feature_channels
    logits = model.forward_head(maps)
    assert logits.shape == (2, 7)
    logits.sum().backward()
    assert model.head.fc.weight.grad is not None


def test_unknown_backbone_is_rejected_with_the_known_names():
    with pytest.raises(ValueError, match="resnet32"):
        build_classifier("vgg", 10)


def _stage2_only(digits, tmp_path: Path, shift_bn: bool):
    config = tiny_config(shift_bn=shift_bn, rho=0.5)
    torch.manual_seed(0)
    model = build_classifier("resnet32", digits.num_classes)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run_stage(model, digits, DeviceData.from_dataset(digits, CPU), config, 2, tmp_path / CHECKPOINT_NAME)
    return before, model.state_dict()


def test_stage2_trains_only_the_classifier_and_shifts_bn_statistics_when_asked(digits, tmp_path):
    before, after = _stage2_only(digits, tmp_path, shift_bn=True)
    backbone_params = [k for k in before if k.startswith("backbone.") and k.endswith((".weight", ".bias"))]
    assert backbone_params and all(torch.equal(before[k], after[k]) for k in backbone_params)
    assert not torch.equal(before["head.fc.weight"], after["head.fc.weight"])
    assert not torch.equal(before["backbone.bn1.running_mean"], after["backbone.bn1.running_mean"])
    assert not torch.equal(before["backbone.layer3.4.bn2.running_var"], after["backbone.layer3.4.bn2.running_var"])


def test_stage2_without_shift_bn_leaves_bn_statistics_alone(digits, tmp_path):
    before, after = _stage2_only(digits, tmp_path, shift_bn=False)
    for key in before:
        if key.startswith("backbone."):
            assert torch.equal(before[key], after[key]), key
    assert not torch.equal(before["head.fc.weight"], after["head.fc.weight"])


@pytest.mark.parametrize("stop_at", [(1, 2), (2, 1)])
def test_resume_after_interrupt_equals_an_uninterrupted_run(digits, tmp_path, stop_at):
    config = tiny_config()
    straight = train_two_stage(digits, config, tmp_path / "straight", CPU)

    def interrupt(m):
        if (m.stage, m.epoch) == stop_at:
            raise TrainingCancelled

    with pytest.raises(TrainingCancelled):
        train_two_stage(digits, config, tmp_path / "resumed", CPU, on_epoch=interrupt)
    seen = []
    resumed = train_two_stage(digits, config, tmp_path / "resumed", CPU, on_epoch=seen.append)

    assert [(m.stage, m.epoch) for m in seen][0] == stop_at  # the interrupted epoch is replayed, not skipped
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    strip = lambda ms: [(m.loss, m.top1, m.ece) for m in ms]  # noqa: E731
    assert strip(straight.stage1) == strip(resumed.stage1)
    assert strip(straight.stage2) == strip(resumed.stage2)


def test_tiny_training_on_embedded_digits_beats_chance_by_a_wide_margin(digits, tmp_path):
    config = RunConfig(
        augment=AugmentConfig(horizontal_flip=False),  # a mirrored digit is another digit
        stage1=Stage1Config(epochs=12, batch_size=32, lr=0.02, schedule="cosine", warmup_epochs=2, mixup_alpha=0),
        stage2=Stage2Config(epochs=4, batch_size=32),
    )
    reports = []
    result = train_two_stage(digits, config, tmp_path, CPU, on_epoch=reports.append)
    assert len(reports) == 16 and [m.epoch for m in reports] == [*range(1, 13), *range(1, 5)]
    assert result.report.top1 > 0.5  # chance is 0.1
    assert result.report.groups["few"].accuracy > 0.2


def test_stage1_from_reuses_a_finished_stage1_and_refuses_an_unfinished_one(digits, tmp_path):
    config = tiny_config()
    first = train_two_stage(digits, config, tmp_path / "first", CPU)
    reports = []
    second = train_two_stage(digits, config.model_copy(update={"stage2": Stage2Config(epochs=1, rho=0.0,
                                                                                        method="crt")}),
                             tmp_path / "second", CPU, on_epoch=reports.append, stage1_from=tmp_path / "first")
    assert [m.stage for m in reports] == [2]  # stage 1 was not trained again
    assert [m.loss for m in second.stage1] == [m.loss for m in first.stage1]

    def stop(m):
        raise TrainingCancelled

    with pytest.raises(TrainingCancelled):
        train_two_stage(digits, config, tmp_path / "unfinished", CPU, on_epoch=stop)
    (tmp_path / "unfinished" / "stage1").mkdir(exist_ok=True)
    torch.save(load_checkpoint(tmp_path / "first" / "stage1" / CHECKPOINT_NAME) | {"epoch": 1},
               tmp_path / "unfinished" / "stage1" / CHECKPOINT_NAME)
    with pytest.raises(ValueError, match="stopped at epoch 1"):
        train_two_stage(digits, config, tmp_path / "third", CPU, stage1_from=tmp_path / "unfinished")
    with pytest.raises(ValueError, match="resnet32 for 10"):
        train_two_stage(digits, config.model_copy(update={"backbone": "resnet18"}), tmp_path / "fourth", CPU,
                        stage1_from=tmp_path / "first")


class _Payload:
    def __reduce__(self):
        return (print, ("unpickled an arbitrary object",))


def test_loading_a_checkpoint_never_unpickles_arbitrary_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"epoch": 1, "payload": _Payload()}, path)
    with pytest.raises(Exception, match="[Ww]eights only"):
        load_checkpoint(path)
