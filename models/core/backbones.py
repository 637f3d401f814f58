"""Classifiers with a `forward_features` (maps before pooling) / `forward_head` (pool + linear) seam."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class LinearHead(nn.Module):
    """Global average pooling followed by a linear layer: what stage 2 re-trains."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return self.fc(maps.mean(dim=(2, 3)))


class ImageClassifier(nn.Module):
    """`backbone` maps images to N x C x H x W features; `head` maps those to logits."""

    def __init__(self, backbone: nn.Module, feature_channels: int, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = LinearHead(feature_channels, num_classes)
        self.feature_channels = feature_channels

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    def forward_head(self, maps: torch.Tensor) -> torch.Tensor:
        return self.head(maps)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))


class _BasicBlockA(nn.Module):
    """CIFAR ResNet block with the parameter-free 'option A' shortcut (subsample + zero-pad channels)."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride = stride
        self.pad_channels = (planes - in_planes) // 2

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1 and self.pad_channels == 0:
            return x
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_channels, self.pad_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNetFeatures(nn.Module):
    """The CIFAR ResNet of He et al. (6n+2 layers) up to the last feature maps, 64 channels."""

    def __init__(self, blocks_per_stage: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(blocks_per_stage):
                blocks.append(_BasicBlockA(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(out)))


def _kaiming_init(module: nn.Module) -> None:
    # as the official code: kaiming-normal weights for every conv and linear layer
    if isinstance(module, nn.Conv2d | nn.Linear):
        nn.init.kaiming_normal_(module.weight)


def resnet32(num_classes: int) -> ImageClassifier:
    model = ImageClassifier(CifarResNetFeatures(blocks_per_stage=5), 64, num_classes)
    model.apply(_kaiming_init)
    return model


class _TorchvisionFeatures(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layers = nn.Sequential(net.layer1, net.layer2, net.layer3, net.layer4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.stem(x))


# Where the modules of a torchvision ResNet's state dict live in an ImageClassifier built from it, so
# torchvision's own weight files load into our split (models.core.pretrained).
TORCHVISION_KEY_PREFIXES: tuple[tuple[str, str], ...] = (
    ("conv1.", "backbone.stem.0."), ("bn1.", "backbone.stem.1."),
    *((f"layer{i + 1}.", f"backbone.layers.{i}.") for i in range(4)),
    ("fc.", "head.fc."),
)


def _torchvision_resnet(name: str, feature_channels: int) -> Callable[[int], ImageClassifier]:
    def build(num_classes: int) -> ImageClassifier:
        import torchvision

        net = getattr(torchvision.models, name)(weights=None)  # random init: nothing is downloaded
        return ImageClassifier(_TorchvisionFeatures(net), feature_channels, num_classes)

    return build


BACKBONES: dict[str, Callable[[int], ImageClassifier]] = {
    "resnet32": resnet32,
    "resnet18": _torchvision_resnet("resnet18", 512),
    "resnet34": _torchvision_resnet("resnet34", 512),
    "resnet50": _torchvision_resnet("resnet50", 2048),
    "resnet152": _torchvision_resnet("resnet152", 2048),  # the paper's Places-LT backbone
    "resnext50_32x4d": _torchvision_resnet("resnext50_32x4d", 2048),  # the paper's second ImageNet-LT backbone
}


def build_classifier(name: str, num_classes: int) -> ImageClassifier:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; expected one of {sorted(BACKBONES)}")
    return BACKBONES[name](num_classes)
