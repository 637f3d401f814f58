"""The recipes under configs/: each is a valid `h2t train` config, and each large-set recipe, scaled down
(one epoch per stage, small batches, an eighth of the embedded long-tailed digits instead of its dataset)
trains to completion with its own backbone, optimiser settings, mixup, fusion and pretrained weights."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torchvision
import yaml

from h2t.cli import load_train_config
from models.contract.config import BuiltinDataset
from models.contract.layout import RunFolder
from models.core.data import Dataset, ImageSet, digits_long_tailed
from models.core.pretrained import WeightSource, torchvision_cache_file
from models.core.train import train_two_stage
from tests.conftest import REPO
from tests.helpers import TINY_DATASET

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
LARGE_SET_RECIPES = [p for p in CONFIGS if not p.name.startswith("cifar")]


def test_the_papers_large_set_recipes_are_all_there():
    assert {p.name for p in LARGE_SET_RECIPES} == {
        "imagenet_lt_resnet50.yaml", "imagenet_lt_resnext50.yaml", "inat2018_resnet50.yaml", "places_lt_resnet152.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_is_a_valid_train_config(path):
    config = load_train_config(path)
    assert config.stage1.epochs > 1 and config.stage2.epochs > 1  # the full recipe, not a scaled-down one


def test_the_docs_name_the_hub_cache_files_torchvision_uses():
    docs = (REPO / "docs" / "recipes.md").read_text()
    for name in ("ResNet50_Weights", "ResNeXt50_32X4D_Weights", "ResNet152_Weights"):
        for member in ("IMAGENET1K_V1", "IMAGENET1K_V2"):
            path, _ = torchvision_cache_file(f"{name}.{member}")
            assert f"`{path.name}`" in docs, path.name


def test_every_recipe_value_says_where_it_comes_from():
    for path in LARGE_SET_RECIPES:
        for line in path.read_text().splitlines():
            if ":" in line and not line.lstrip().startswith("#") and not line.rstrip().endswith(":"):
                assert "#" in line, f"{path.name}: {line}"


def _scaled_down(path: Path) -> dict:
    """The recipe with its dataset, epochs and batch sizes shrunk; everything else as the recipe says."""
    raw = yaml.safe_load(path.read_text())
    raw["dataset"] = dict(TINY_DATASET)  # real 16 px digits in 10 classes, long-tailed
    raw["augment"]["horizontal_flip"] = False  # mirroring changes what a digit is
    raw["stage1"].update(epochs=1, batch_size=32, warmup_epochs=0)
    raw["stage2"].update(epochs=1, batch_size=32)
    return raw


@pytest.fixture(scope="module")
def few_digits() -> Dataset:
    """Every eighth image of the tiny long-tailed digits (62 train, 38 test): small enough for a ResNet-152
    epoch on two CPU cores, still long-tailed and still real pictures."""
    full = digits_long_tailed(BuiltinDataset.model_validate(TINY_DATASET))
    train, test = full.train, full.test
    return replace(full, train=ImageSet(train.images[::8].clone(), train.labels[::8].clone()),
                   test=ImageSet(test.images[::8].clone(), test.labels[::8].clone()))


@pytest.fixture
def hub_with_random_weights(tmp_path, monkeypatch):
    """A torch hub cache holding, under torchvision's file name, randomly initialised weights of the right
    architecture (the real ones are not needed to exercise the path); downloading fails the test."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.delenv("H2T_ALLOW_WEIGHT_DOWNLOAD", raising=False)

    def no_download(*args, **kwargs):
        raise AssertionError("a test must never download weights")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)

    def put(name: str, architecture: str) -> None:
        path, _ = torchvision_cache_file(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(getattr(torchvision.models, architecture)(weights=None).state_dict(), path)

    return put


@pytest.mark.parametrize("path", LARGE_SET_RECIPES, ids=lambda p: p.stem)
def test_a_scaled_down_recipe_trains_to_completion(path, tmp_path, hub_with_random_weights, few_digits):
    raw = _scaled_down(path)
    if "pretrained" in raw:
        hub_with_random_weights(raw["pretrained"]["torchvision"], raw["backbone"])
    config_file = tmp_path / "recipe.yaml"
    config_file.write_text(yaml.safe_dump(raw))
    config = load_train_config(config_file)  # as `h2t train --config` reads it

    result = train_two_stage(few_digits, config, RunFolder(tmp_path / "out"), torch.device("cpu"),
                             weights=WeightSource(tmp_path / "data"))

    assert [(m.stage, m.epoch) for m in result.stage1 + result.stage2] == [(1, 1), (2, 1)]
    assert result.stage1[0].lr == raw["stage1"]["lr"]  # cosine without warm-up starts at the peak
    assert result.stage2[0].lr == raw["stage2"]["lr"]
    assert all(math.isfinite(m.loss) for m in result.stage1 + result.stage2)
    assert result.report.groups["overall"].n == len(few_digits.test)
    if "pretrained" in raw:
        assert result.pretrained is not None and not result.pretrained.head_loaded
        assert result.pretrained.source == f"pretrained weights {raw['pretrained']['torchvision']}"
    else:
        assert result.pretrained is None
