"""Each stage recipe on its own: learning rates, modes, trained parameters and per-epoch draws."""

import math

import pytest
import torch

from models.contract.config import Stage1Config, Stage2Config
from models.core.augment import Augmentation, CropFlip, mixup_lambda
from models.core.backbones import build_classifier
from models.core.h2t import class_balanced_indices, fusion_channels
from models.core.stages import Stage1Recipe, Stage2Recipe

CPU = torch.device("cpu")
LABELS = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 1, 2])  # long-tailed: 6, 3, 1
PADDING, CHANNELS = 2, 64
AUGMENTATION = Augmentation("pad", image_size=16)  # pads by 16 / 8 = PADDING


def stage1(**fields) -> Stage1Recipe:
    return Stage1Recipe(Stage1Config(**fields))


def stage2(**fields) -> Stage2Recipe:
    return Stage2Recipe(Stage2Config(**fields))


def draw(recipe, seed: int = 0):
    return recipe.draw_epoch(LABELS, AUGMENTATION, CHANNELS, torch.Generator().manual_seed(seed), CPU)


def test_stage1_schedule_warms_up_linearly_then_steps_down_at_milestones():
    recipe = stage1()  # the paper's: lr 0.1, 5 warm-up epochs, x0.1 after 160 and 180
    assert [round(recipe.lr_at(e), 6) for e in range(6)] == [0.02, 0.04, 0.06, 0.08, 0.1, 0.1]
    assert recipe.lr_at(159) == pytest.approx(0.1)
    assert recipe.lr_at(160) == pytest.approx(0.01)
    assert recipe.lr_at(180) == pytest.approx(0.001)


def test_stage1_cosine_schedule_decays_from_the_end_of_warm_up():
    recipe = stage1(epochs=10, lr=0.1, warmup_epochs=2, schedule="cosine")
    assert [recipe.lr_at(e) for e in (0, 1, 2)] == pytest.approx([0.05, 0.1, 0.1])
    assert recipe.lr_at(6) == pytest.approx(0.05)  # half-way through the 8 cosine epochs
    assert recipe.lr_at(9) == pytest.approx(0.05 * (1 + math.cos(math.pi * 7 / 8)))


def test_stage2_schedule_is_per_epoch_cosine_from_the_peak():
    recipe = stage2()  # peak 0.02 over 10 epochs
    assert recipe.lr_at(0) == pytest.approx(0.02)
    assert recipe.lr_at(5) == pytest.approx(0.01)
    assert recipe.lr_at(9) == pytest.approx(0.01 * (1 + math.cos(0.9 * math.pi)))


def _modes(model) -> tuple[bool, bool]:
    backbone = {m.training for m in model.backbone.modules()}
    head = {m.training for m in model.head.modules()}
    assert len(backbone) == 1 and len(head) == 1  # every submodule of a part in one mode
    return backbone.pop(), head.pop()


@pytest.mark.parametrize("recipe, modes", [
    (stage1(), (True, True)),
    (stage2(shift_bn=True), (True, True)),  # BatchNorm statistics follow the re-sampled data
    (stage2(shift_bn=False), (False, True)),
])
def test_each_recipe_sets_the_modes_of_backbone_and_head(recipe, modes):
    model = build_classifier("resnet32", 3).eval()
    recipe.set_modes(model)
    assert _modes(model) == modes


def test_stage1_trains_every_parameter():
    model = build_classifier("resnet32", 3)
    trained = stage1().trained_parameters(model)
    assert {id(p) for p in trained} == {id(p) for p in model.parameters()}
    assert all(p.requires_grad for p in model.parameters())


def test_stage2_trains_the_head_only_and_freezes_the_backbone():
    model = build_classifier("resnet32", 3)
    trained = stage2().trained_parameters(model)
    assert [id(p) for p in trained] == [id(p) for p in model.head.parameters()]
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.head.parameters())


def _same(a, b) -> bool:
    """Two lists of per-step draws hold equal values (tensors compared exactly)."""
    def flat(steps) -> list:
        out = []
        for s in steps:
            out += [s.indices, s.crops.top, s.crops.left, s.crops.flip]
            if getattr(s, "mixup", None) is not None:
                out += [torch.tensor(s.mixup.lam), s.mixup.perm]
            if getattr(s, "fusion", None) is not None:
                out += [s.fusion.indices, s.fusion.crops.top, s.fusion.channels]
        return out
    fa, fb = flat(a), flat(b)
    return len(fa) == len(fb) and all(torch.equal(x, y) for x, y in zip(fa, fb, strict=True))


@pytest.mark.parametrize("recipe", [stage1(batch_size=4), stage1(batch_size=4, mixup_alpha=0),
                                    stage2(batch_size=4), stage2(batch_size=4, method="crt")])
def test_draws_are_a_function_of_the_generator(recipe):
    assert _same(draw(recipe, seed=1), draw(recipe, seed=1))
    assert not _same(draw(recipe, seed=1), draw(recipe, seed=2))


def test_stage1_draws_cover_the_training_set_once_in_batches_with_mixup_per_batch():
    steps = draw(stage1(batch_size=4, mixup_alpha=1.0))
    assert [s.size for s in steps] == [4, 4, 2]  # the last batch is smaller: no drop_last
    assert sorted(torch.cat([s.indices for s in steps]).tolist()) == list(range(10))
    for s in steps:
        assert 0 <= s.mixup.lam <= 1 and sorted(s.mixup.perm.tolist()) == list(range(s.size))
        assert s.crops.top.shape == (s.size,) and s.crops.flip.dtype == torch.bool
    assert all(s.mixup is None for s in draw(stage1(batch_size=4, mixup_alpha=0)))


def test_stage1_draws_keep_the_order_of_the_generator():
    # resumed and earlier runs replay exactly only while this order holds
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(10, generator=g)
    crops = CropFlip.draw(10, PADDING, g)
    lams = [mixup_lambda(1.0, g) for _ in range(3)]
    perms = [torch.randperm(size, generator=g) for size in (4, 4, 2)]
    steps = draw(stage1(batch_size=4, mixup_alpha=1.0))
    assert torch.equal(torch.cat([s.indices for s in steps]), order)
    assert torch.equal(torch.cat([s.crops.top for s in steps]), crops.top)
    assert [s.mixup.lam for s in steps] == lams
    assert all(torch.equal(s.mixup.perm, p) for s, p in zip(steps, perms, strict=True))


def test_stage2_draws_class_balanced_batches_and_fusion_channels_per_batch():
    steps = draw(stage2(batch_size=4, rho=0.25))
    assert [s.size for s in steps] == [4, 4, 2]
    for s in steps:
        assert s.fusion.channels.shape == (int(0.25 * CHANNELS),) and len(set(s.fusion.channels.tolist())) == 16
        assert s.fusion.indices.shape == s.indices.shape
    assert sorted(torch.cat([s.fusion.indices for s in steps]).tolist()) == list(range(10))  # the shuffle
    assert all(s.fusion is None for s in draw(stage2(batch_size=4, method="crt")))


def test_stage2_draws_keep_the_order_of_the_generator():
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(10, generator=g)
    CropFlip.draw(10, PADDING, g)  # the instance branch's crops
    balanced = class_balanced_indices(LABELS, 10, g)
    balanced_crops = CropFlip.draw(10, PADDING, g)
    channels = [fusion_channels(CHANNELS, 0.25, g) for _ in range(3)]
    steps = draw(stage2(batch_size=4, rho=0.25))
    assert torch.equal(torch.cat([s.indices for s in steps]), balanced)
    assert torch.equal(torch.cat([s.crops.left for s in steps]), balanced_crops.left)
    assert torch.equal(torch.cat([s.fusion.indices for s in steps]), order)
    assert all(torch.equal(s.fusion.channels, c) for s, c in zip(steps, channels, strict=True))
    # without fusion, the fused branch sees the very same draws
    assert torch.equal(torch.cat([s.indices for s in draw(stage2(batch_size=4, method="crt"))]), balanced)
