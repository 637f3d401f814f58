import pytest
import torch

from models.contract.config import BuiltinDataset, RunConfig
from models.contract.layout import RunFolder
from models.core.backbones import build_classifier
from models.core.data import digits_long_tailed
from models.core.source import source_for
from models.core.stages import Stage2Recipe
from models.core.train import TrainingCancelled, load_checkpoint, run_stage, train_two_stage
from tests.helpers import TINY_DATASET, tiny_run_config

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def digits():
    return digits_long_tailed(BuiltinDataset.model_validate(TINY_DATASET))


def tiny_config(**overrides) -> RunConfig:
    return RunConfig.model_validate(tiny_run_config(**overrides))


def _stage2_only(digits, folder: RunFolder, shift_bn: bool):
    config = tiny_config(stage2={"shift_bn": shift_bn, "rho": 0.5})
    torch.manual_seed(0)
    model = build_classifier("resnet32", digits.num_classes)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run_stage(model, digits, source_for(digits, config, CPU), config, Stage2Recipe(config.stage2), folder.create())
    return before, model.state_dict()


def test_stage2_trains_only_the_classifier_and_shifts_bn_statistics_when_asked(digits, tmp_path):
    before, after = _stage2_only(digits, RunFolder(tmp_path), shift_bn=True)
    backbone_params = [k for k in before if k.startswith("backbone.") and k.endswith((".weight", ".bias"))]
    assert backbone_params and all(torch.equal(before[k], after[k]) for k in backbone_params)
    assert not torch.equal(before["head.fc.weight"], after["head.fc.weight"])
    assert not torch.equal(before["backbone.bn1.running_mean"], after["backbone.bn1.running_mean"])
    assert not torch.equal(before["backbone.layer3.4.bn2.running_var"], after["backbone.layer3.4.bn2.running_var"])
    assert RunFolder(tmp_path).checkpoint(2).exists() and not RunFolder(tmp_path).checkpoint(1).exists()


def test_stage2_without_shift_bn_leaves_bn_statistics_alone(digits, tmp_path):
    before, after = _stage2_only(digits, RunFolder(tmp_path), shift_bn=False)
    for key in before:
        if key.startswith("backbone."):
            assert torch.equal(before[key], after[key]), key
    assert not torch.equal(before["head.fc.weight"], after["head.fc.weight"])


@pytest.mark.parametrize("stop_at", [(1, 2), (2, 1)])
def test_resume_after_interrupt_equals_an_uninterrupted_run(digits, tmp_path, stop_at):
    config = tiny_config(seed=3)  # stage 1 with mixup: its draws are replayed too
    straight = train_two_stage(digits, config, RunFolder(tmp_path / "straight"), CPU)

    def interrupt(m):
        if (m.stage, m.epoch) == stop_at:
            raise TrainingCancelled

    with pytest.raises(TrainingCancelled):
        train_two_stage(digits, config, RunFolder(tmp_path / "resumed"), CPU, on_epoch=interrupt)
    seen = []
    resumed = train_two_stage(digits, config, RunFolder(tmp_path / "resumed"), CPU, on_epoch=seen.append)

    assert [(m.stage, m.epoch) for m in seen][0] == stop_at  # the interrupted epoch is replayed, not skipped
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    strip = lambda ms: [(m.loss, m.top1, m.ece) for m in ms]  # noqa: E731
    assert strip(straight.stage1) == strip(resumed.stage1)
    assert strip(straight.stage2) == strip(resumed.stage2)


def test_tiny_training_on_embedded_digits_beats_chance_by_a_wide_margin(digits, tmp_path):
    config = tiny_config(stage1={"epochs": 12, "schedule": "cosine", "warmup_epochs": 2, "mixup_alpha": 0},
                         stage2={"epochs": 4})
    reports = []
    result = train_two_stage(digits, config, RunFolder(tmp_path), CPU, on_epoch=reports.append)
    assert len(reports) == 16 and [m.epoch for m in reports] == [*range(1, 13), *range(1, 5)]
    assert result.report.top1 > 0.5  # chance is 0.1
    assert result.report.groups["few"].accuracy > 0.2


def test_stage1_from_reuses_a_finished_stage1_and_refuses_an_unfinished_one(digits, tmp_path):
    config = tiny_config()
    first = train_two_stage(digits, config, RunFolder(tmp_path / "first"), CPU)
    reports = []
    second = train_two_stage(digits, tiny_config(stage2={"epochs": 1, "method": "crt"}), RunFolder(tmp_path / "second"),
                             CPU, on_epoch=reports.append, stage1_from=RunFolder(tmp_path / "first"))
    assert [m.stage for m in reports] == [2]  # stage 1 was not trained again
    assert [m.loss for m in second.stage1] == [m.loss for m in first.stage1]

    def stop(m):
        raise TrainingCancelled

    unfinished = RunFolder(tmp_path / "unfinished")
    with pytest.raises(TrainingCancelled):
        train_two_stage(digits, config, unfinished, CPU, on_epoch=stop)
    torch.save(load_checkpoint(RunFolder(tmp_path / "first").checkpoint(1)) | {"epoch": 1}, unfinished.checkpoint(1))
    with pytest.raises(ValueError, match="stopped at epoch 1"):
        train_two_stage(digits, config, RunFolder(tmp_path / "third"), CPU, stage1_from=unfinished)
    with pytest.raises(ValueError, match="resnet32 for 10"):
        train_two_stage(digits, tiny_config(backbone="resnet18"), RunFolder(tmp_path / "fourth"), CPU,
                        stage1_from=RunFolder(tmp_path / "first"))
    with pytest.raises(FileNotFoundError, match="no stage-1 checkpoint"):
        train_two_stage(digits, config, RunFolder(tmp_path / "fifth"), CPU, stage1_from=RunFolder(tmp_path / "none"))


def test_checkpoints_keep_their_keys(digits, tmp_path):
    # resuming a run, and reusing its stage 1, read these: a run saved before a change must stay readable
    folder = RunFolder(tmp_path)
    train_two_stage(digits, tiny_config(stage1={"epochs": 1, "warmup_epochs": 1}, stage2={"epochs": 1}), folder, CPU)
    for stage in (1, 2):
        state = load_checkpoint(folder.checkpoint(stage))
        assert set(state) == {"epoch", "model", "optimizer", "torch_rng", "history", "meta"}
        assert state["meta"] == {"backbone": "resnet32", "num_classes": 10, "dataset": "digits-lt", "stage": stage,
                                 "epochs": 1}
        assert state["epoch"] == 1 and [h["stage"] for h in state["history"]] == [stage]
        assert set(state["model"]) == set(build_classifier("resnet32", 10).state_dict())


class _Payload:
    def __reduce__(self):
        return (print, ("unpickled an arbitrary object",))


def test_loading_a_checkpoint_never_unpickles_arbitrary_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"epoch": 1, "payload": _Payload()}, path)
    with pytest.raises(Exception, match="[Ww]eights only"):
        load_checkpoint(path)


def test_the_strong_recipe_trains_to_the_same_weights_when_resumed_and_caps_the_classifier(digits, tmp_path):
    """Logit-adjusted loss, RandAugment, Cutout and SAM in stage 1, MaxNorm in stage 2: every draw of the
    augmentation after the crop is replayed on resume, and every class vector ends within the cap."""
    config = tiny_config(seed=1, stage1={"loss": "logit_adjusted", "augment_policy": "randaugment", "cutout": 4,
                                         "sam_rho": 0.05}, stage2={"max_norm": 2.0})
    straight = train_two_stage(digits, config, RunFolder(tmp_path / "straight"), CPU)

    def interrupt(m):
        if (m.stage, m.epoch) == (1, 2):
            raise TrainingCancelled

    with pytest.raises(TrainingCancelled):
        train_two_stage(digits, config, RunFolder(tmp_path / "resumed"), CPU, on_epoch=interrupt)
    resumed = train_two_stage(digits, config, RunFolder(tmp_path / "resumed"), CPU)
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    assert all(torch.isfinite(torch.tensor([m.loss for m in straight.stage1 + straight.stage2])))
    assert float(straight.model.head.fc.weight.detach().norm(dim=1).max()) <= 2.0 + 1e-5
