"""Every registered backbone, as timm tests its registry: the feature/head seam, a training step and
the stage-2 freeze. Tiny inputs (batch 2, 32 px) keep even resnet50 fast on a CPU."""

from typing import get_args

import pytest
import torch

from models.contract.config import BackboneName, RunConfig, Stage2Config
from models.core.backbones import BACKBONES, build_classifier
from models.core.data import Dataset, ImageSet
from models.core.source import BatchSource, source_for
from models.core.stages import Stage2Recipe
from models.core.train import train_epoch

CPU = torch.device("cpu")
NUM_CLASSES = 3


def test_the_config_names_exactly_the_registered_backbones():
    # the contract layer cannot import torch, so its Literal restates the registry; this ties them
    names = get_args(BackboneName)
    assert len(names) == len(set(names)) and set(names) == set(BACKBONES)


def test_unknown_backbone_is_rejected_with_the_known_names():
    with pytest.raises(ValueError, match="resnet32"):
        build_classifier("vgg", 10)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_backbone_exposes_feature_maps_and_a_pooled_linear_head(name):
    torch.manual_seed(0)
    model = build_classifier(name, NUM_CLASSES).eval()
    x = torch.randn(2, 3, 32, 32)
    maps = model.forward_features(x)
    assert maps.ndim == 4 and maps.shape[:2] == (2, model.feature_channels)
    logits = model.forward_head(maps)
    assert logits.shape == (2, NUM_CLASSES)
    assert torch.allclose(model(x), logits)  # forward is exactly features then head


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_backbone_trains_end_to_end(name):
    torch.manual_seed(0)
    model = build_classifier(name, NUM_CLASSES).train()
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 2]))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    optimizer.step()
    assert not torch.equal(before["head.fc.weight"], model.head.fc.weight)
    assert any(not torch.equal(before[k], p) for k, p in model.named_parameters() if k.startswith("backbone."))


def _tiny_data(n: int = 4, size: int = 32) -> BatchSource:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    labels = torch.arange(n) % NUM_CLASSES
    split = ImageSet(images, labels)
    dataset = Dataset("tiny", tuple("abc"), split, split, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    return source_for(dataset, RunConfig(), CPU)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_stage2_trains_the_head_and_leaves_the_backbone_weights_unchanged(name):
    torch.manual_seed(0)
    model = build_classifier(name, NUM_CLASSES)
    recipe = Stage2Recipe(Stage2Config(rho=0.5, batch_size=2, weight_decay=5e-4))
    backbone_before = {k: p.detach().clone() for k, p in model.backbone.named_parameters()}
    head_before = model.head.fc.weight.detach().clone()
    optimizer = torch.optim.SGD(recipe.trained_parameters(model), lr=0.1, momentum=0.9, weight_decay=5e-4)
    recipe.set_modes(model)
    loss, seen = train_epoch(model, _tiny_data(), recipe, optimizer, torch.Generator().manual_seed(1), None)
    assert seen == 4 and loss > 0
    for key, param in model.backbone.named_parameters():
        assert not param.requires_grad and param.grad is None, key
        assert torch.equal(backbone_before[key], param), key
    assert not torch.equal(head_before, model.head.fc.weight)
