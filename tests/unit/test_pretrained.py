"""Pretrained initial weights of stage 1: files under the data root (safetensors or a plain torch state
dict), torchvision names from the torch hub cache, the head choice, confinement, and resume winning
over the pretrained init. Nothing is downloaded: the hub cache is a folder the test writes."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
import torchvision
from pydantic import ValidationError
from safetensors.torch import save_file

import models.core.train as train_module
from models.contract.config import BuiltinDataset, RunConfig
from models.contract.layout import RunFolder
from models.contract.pretrained import TORCHVISION_WEIGHTS, PretrainedFile, TorchvisionWeights
from models.core.backbones import BACKBONES, build_classifier
from models.core.data import digits_long_tailed
from models.core.pretrained import (
    PretrainedMismatch,
    WeightSource,
    initialise_from,
    load_pretrained,
    read_state_dict,
    torchvision_cache_file,
)
from models.core.train import TrainingCancelled, train_two_stage
from tests.helpers import TINY_DATASET, tiny_run_config

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def digits():
    return digits_long_tailed(BuiltinDataset.model_validate(TINY_DATASET))


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty torch hub cache of the test's own (TORCH_HOME), and no way to download."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))

    def no_download(*args, **kwargs):
        raise AssertionError("a test must never download weights")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    return tmp_path / "torch-home" / "hub" / "checkpoints"


def _source_model(num_classes: int = 10, seed: int = 7):
    torch.manual_seed(seed)
    return build_classifier("resnet32", num_classes)


def _save(state: dict[str, torch.Tensor], path, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], prefix: str = "") -> bool:
    keys = [k for k in a if k.startswith(prefix)]
    return bool(keys) and all(torch.equal(a[k], b[k]) for k in keys)


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_a_weights_file_under_the_data_root_initialises_the_model(tmp_path, fmt):
    source = _source_model().state_dict()
    _save(source, tmp_path / "weights" / f"r32.{fmt}", fmt)
    model = _source_model(seed=0)
    report = initialise_from(model, PretrainedFile(file=f"weights/r32.{fmt}", head="load"), WeightSource(tmp_path))
    assert _equal(source, model.state_dict()) and report.head_loaded and not report.ignored


def test_a_checkpoint_of_this_service_is_a_weights_file_too(tmp_path):
    source = _source_model().state_dict()
    torch.save({"epoch": 3, "model": source, "history": []}, tmp_path / "stage1.pt")
    model = _source_model(seed=0)
    initialise_from(model, PretrainedFile(file="stage1.pt", head="load"), WeightSource(tmp_path))
    assert _equal(source, model.state_dict())


class _Payload:
    def __reduce__(self):
        return os.system, ("touch pwned",)


def test_a_pickle_of_arbitrary_objects_is_refused_and_never_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"backbone.x": _Payload()}, f, protocol=2)
    torch.save({"model": _source_model().state_dict(), "extra": _Payload()}, tmp_path / "evil2.pt")
    for name in ("evil.pt", "evil2.pt"):
        with pytest.raises(ValueError, match="weights_only"):
            read_state_dict(tmp_path / name)
    assert not (tmp_path / "pwned").exists()


def test_a_head_of_another_shape_is_reinitialised_and_reported_or_refused_when_asked_for(tmp_path):
    source = _source_model(num_classes=10).state_dict()
    _save(source, tmp_path / "w.safetensors", "safetensors")
    for head in ("auto", "reinit"):
        model = _source_model(num_classes=4, seed=0)
        head_before = model.head.fc.weight.detach().clone()
        report = initialise_from(model, PretrainedFile(file="w.safetensors", head=head), WeightSource(tmp_path))
        assert _equal(source, model.state_dict(), "backbone.")
        assert torch.equal(model.head.fc.weight, head_before) and not report.head_loaded
        assert sorted(report.ignored) == ["head.fc.bias", "head.fc.weight"]
        assert "head re-initialised; ignored head.fc." in report.summary()
    with pytest.raises(PretrainedMismatch, match="head.load"):
        initialise_from(_source_model(num_classes=4), PretrainedFile(file="w.safetensors", head="load"),
                        WeightSource(tmp_path))


def test_the_backbone_must_match_exactly(tmp_path):
    source = _source_model().state_dict()
    for change, match in ((lambda s: s.update({"backbone.extra.weight": torch.zeros(1)}), "unexpected"),
                          (lambda s: s.pop("backbone.layer3.4.conv2.weight"), "missing"),
                          (lambda s: s.update({"backbone.conv1.weight": torch.zeros(16, 3, 5, 5)}), "shape")):
        state = dict(source)
        change(state)
        with pytest.raises(PretrainedMismatch, match=match):
            load_pretrained(_source_model(), state, "reinit")
    wrong_net = torchvision.models.resnet34(weights=None).state_dict()  # more blocks than a resnet18
    with pytest.raises(PretrainedMismatch, match="unexpected: backbone.layers.0.2"):
        load_pretrained(build_classifier("resnet18", 10), wrong_net, "reinit")


def test_a_torchvision_name_is_read_from_the_hub_cache(hub):
    path, url = torchvision_cache_file("ResNet18_Weights.IMAGENET1K_V1")
    assert path == hub / os.path.basename(url)  # the name torch.hub gives the file it downloads
    torch.manual_seed(1)
    net = torchvision.models.resnet18(weights=None)  # real weights are not needed: same format, same names
    _save(net.state_dict(), path, "pt")
    model = build_classifier("resnet18", 5)
    report = initialise_from(model, TorchvisionWeights(torchvision="ResNet18_Weights.IMAGENET1K_V1", head="auto"),
                             WeightSource())
    assert torch.equal(model.backbone.stem[0].weight, net.conv1.weight)
    assert torch.equal(model.backbone.layers[3][1].bn2.running_var, net.layer4[1].bn2.running_var)
    assert not report.head_loaded  # 1000 classes in the file, 5 here
    assert sorted(report.ignored) == ["head.fc.bias", "head.fc.weight"]


def test_missing_torchvision_weights_without_download_permission_are_a_clear_error(hub):
    expected, _ = torchvision_cache_file("ResNet50_Weights.IMAGENET1K_V2")
    spec = TorchvisionWeights(torchvision="ResNet50_Weights.IMAGENET1K_V2")
    with pytest.raises(FileNotFoundError, match="H2T_ALLOW_WEIGHT_DOWNLOAD") as error:
        WeightSource(allow_download=False).path_of(spec)
    assert str(expected) in str(error.value) and not expected.exists()


def test_a_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found under the data root"):
        WeightSource(tmp_path).path_of(PretrainedFile(file="weights/none.safetensors"))


@pytest.mark.parametrize("path", ["/etc/passwd.pt", "../outside.pt", "weights/../../outside.pt", "C:/w.pt",
                                  "weights\\w.pt", "weights/w.txt", "a" * 256 + ".pt"])
def test_weights_paths_that_leave_the_data_root_are_refused_by_the_config(path):
    with pytest.raises(ValidationError, match="pretrained"):
        RunConfig.model_validate({"pretrained": {"file": path}})


def test_a_symlink_out_of_the_data_root_is_refused_when_the_weights_are_read(tmp_path):
    root, outside = tmp_path / "data", tmp_path / "outside"
    _save(_source_model().state_dict(), outside / "w.pt", "pt")
    root.mkdir()
    (root / "link.pt").symlink_to(outside / "w.pt")
    (root / "dir").symlink_to(outside)
    for name in ("link.pt", "dir/w.pt"):
        with pytest.raises(ValueError, match="leaves the data root"):
            WeightSource(root).path_of(PretrainedFile(file=name))


def test_torchvision_weights_must_be_those_of_the_backbone():
    RunConfig.model_validate({"backbone": "resnet152",
                              "pretrained": {"torchvision": "ResNet152_Weights.IMAGENET1K_V2"}})
    for backbone, name in (("resnet50", "ResNet152_Weights.IMAGENET1K_V1"), ("resnet32", "ResNet18_Weights.X")):
        with pytest.raises(ValidationError):
            RunConfig.model_validate({"backbone": backbone, "pretrained": {"torchvision": name}})


@pytest.mark.parametrize("name", sorted(TORCHVISION_WEIGHTS))
def test_torchvision_state_dicts_load_into_every_torchvision_backbone(name):
    # the enum the contract names is the one torchvision gives this architecture, and every key maps
    assert torchvision.models.get_model_weights(name).__name__ == TORCHVISION_WEIGHTS[name]
    net = getattr(torchvision.models, name)(weights=None)
    model = build_classifier(name, 1000)
    report = load_pretrained(model, net.state_dict(), "load")
    assert report.head_loaded and not report.ignored
    assert torch.equal(model.head.fc.weight, net.fc.weight)


@pytest.mark.parametrize("name", ["resnet152", "resnext50_32x4d"])
def test_the_papers_large_set_backbones_give_2048_channel_feature_maps(name):
    assert name in BACKBONES
    model = build_classifier(name, 7).eval()
    with torch.no_grad():
        maps = model.forward_features(torch.randn(1, 3, 64, 64))
    assert maps.shape == (1, 2048, 2, 2) and model.feature_channels == 2048


def _pretrained_run(tmp_path, **overrides) -> RunConfig:
    _save(_source_model().state_dict(), tmp_path / "data" / "w.safetensors", "safetensors")
    return RunConfig.model_validate(tiny_run_config(pretrained={"file": "w.safetensors", "head": "load"},
                                                    **overrides))


def test_stage_1_starts_from_the_pretrained_weights(digits, tmp_path, monkeypatch):
    config = _pretrained_run(tmp_path)
    entered: list[dict[str, torch.Tensor]] = []

    class Seen(Exception):
        pass

    def spy(model, *args, **kwargs):
        entered.append({k: v.clone() for k, v in model.state_dict().items()})
        raise Seen

    monkeypatch.setattr(train_module, "run_stage", spy)
    with pytest.raises(Seen):
        train_two_stage(digits, config, RunFolder(tmp_path / "run"), CPU, weights=WeightSource(tmp_path / "data"))
    assert _equal(_source_model().state_dict(), entered[0])


def test_resume_wins_over_the_pretrained_weights(digits, tmp_path):
    config = _pretrained_run(tmp_path, seed=2, stage1={"epochs": 2}, stage2={"epochs": 1})
    weights = WeightSource(tmp_path / "data")
    straight = train_two_stage(digits, config, RunFolder(tmp_path / "straight"), CPU, weights=weights)
    assert straight.pretrained is not None and straight.pretrained.head_loaded

    def interrupt(m):
        if (m.stage, m.epoch) == (1, 2):  # reported before its checkpoint: epoch 1's is the last
            raise TrainingCancelled

    with pytest.raises(TrainingCancelled):
        train_two_stage(digits, config, RunFolder(tmp_path / "resumed"), CPU, on_epoch=interrupt, weights=weights)
    # other weights under the same name now: a resume must not read them
    _save(_source_model(seed=99).state_dict(), tmp_path / "data" / "w.safetensors", "safetensors")
    resumed = train_two_stage(digits, config, RunFolder(tmp_path / "resumed"), CPU, weights=weights)
    assert resumed.pretrained is None
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
