import pytest
from pydantic import ValidationError

from models.contract.config import (
    BuiltinDataset,
    FolderDataset,
    GroupConfig,
    LocalTrainConfig,
    RunConfig,
    Stage1Config,
    Stage2Config,
    default_groups,
)


def test_defaults_are_the_papers_cifar_recipe():
    config = RunConfig()
    assert (config.stage1.epochs, config.stage1.lr, config.stage1.weight_decay) == (200, 0.1, 2e-4)
    assert (config.stage1.warmup_epochs, config.stage1.milestones, config.stage1.mixup_alpha) == (5, (160, 180), 1.0)
    assert (config.stage2.method, config.stage2.rho, config.stage2.epochs, config.stage2.lr) == ("h2t", 0.25, 10, 0.02)
    assert config.stage2.shift_bn is True


def test_crt_means_rho_zero_and_refuses_a_nonzero_rho():
    assert Stage2Config(method="crt").fusion_ratio == 0.0
    with pytest.raises(ValidationError, match="crt"):
        Stage2Config(method="crt", rho=0.25)


@pytest.mark.parametrize("bad", [
    {"stage2": {"rho": 1.5}}, {"stage2": {"rho": -0.1}}, {"stage1": {"epochs": 0}}, {"stage1": {"lr": -1}},
    {"stage1": {"milestones": [180, 160]}}, {"backbone": "vgg16"}, {"precision": "fp8"}, {"unknown": 1},
    {"stage1": {"epochs": 3, "warmup_epochs": 5}}, {"groups": {"slices": [[0, 10], [20, 30], [30, 40]]}},
])
def test_invalid_run_configs_are_rejected(bad):
    with pytest.raises(ValidationError):
        RunConfig.model_validate(bad)


def test_dataset_is_a_builtin_or_a_folder():
    config = LocalTrainConfig.model_validate({"dataset": {"builtin": "cifar100", "imbalance_factor": 0.02}})
    assert isinstance(config.dataset, BuiltinDataset) and config.dataset.imbalance_factor == 0.02
    config = LocalTrainConfig.model_validate({"dataset": {"folder": "birds"}})
    assert isinstance(config.dataset, FolderDataset)
    for bad in ({"builtin": "imagenet"}, {"builtin": "cifar10", "imbalance_factor": 0}, {}):
        with pytest.raises(ValidationError):
            LocalTrainConfig.model_validate({"dataset": bad})


def test_configs_are_frozen():
    with pytest.raises(ValidationError):
        Stage1Config().epochs = 3


def test_group_slices_must_tile_the_classes_from_zero():
    assert GroupConfig(slices=((0, 36), (36, 71), (71, 100))).slices[2] == (71, 100)
    with pytest.raises(ValidationError):
        GroupConfig(slices=((1, 36), (36, 71), (71, 100)))


def test_config_module_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, models.contract.config; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_the_embedded_defaults_live_under_one_home_and_explicit_settings_win(monkeypatch, tmp_path):
    from service.store.settings import Settings

    monkeypatch.setenv("H2T_HOME", str(tmp_path / "a"))
    monkeypatch.delenv("H2T_DATABASE_URL", raising=False)
    monkeypatch.delenv("H2T_BROKER_URL", raising=False)
    monkeypatch.delenv("H2T_ARTIFACT_DIR", raising=False)
    a = Settings()
    assert (a.database_url, a.broker_url, a.artifact_dir) == (
        f"sqlite:///{tmp_path}/a/h2t.db", f"sqla+sqlite:///{tmp_path}/a/broker.db", tmp_path / "a" / "artifacts")
    monkeypatch.setenv("H2T_BROKER_URL", "redis://127.0.0.1:6379/0")
    b = Settings(home=tmp_path / "b")
    assert (b.database_url, b.broker_url) == (f"sqlite:///{tmp_path}/b/h2t.db", "redis://127.0.0.1:6379/0")


def test_a_builtin_cifar100_dataset_groups_by_the_papers_slices_and_others_by_counts():
    cifar100 = BuiltinDataset(builtin="cifar100")
    assert default_groups(cifar100).slices == ((0, 36), (36, 71), (71, 100))
    assert default_groups(BuiltinDataset(builtin="cifar10")) == GroupConfig()
    assert default_groups(FolderDataset(folder="pets")) == GroupConfig()


def test_h2t_train_uses_the_datasets_groups_unless_the_file_sets_them():
    base = {"dataset": {"builtin": "cifar100"}}
    assert LocalTrainConfig.model_validate(base).groups.slices == ((0, 36), (36, 71), (71, 100))
    explicit = LocalTrainConfig.model_validate({**base, "groups": {"many_threshold": 50}})
    assert explicit.groups == GroupConfig(many_threshold=50)


def test_group_slices_must_cover_the_datasets_classes():
    GroupConfig(slices=((0, 3), (3, 6), (6, 10))).check_classes(10)
    with pytest.raises(ValueError, match="must end at the dataset's 12 classes"):
        GroupConfig(slices=((0, 3), (3, 6), (6, 10))).check_classes(12)
