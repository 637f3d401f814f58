"""Each stage recipe on its own: learning rates, modes, trained parameters and per-epoch draws."""

import math

import pytest
import torch

from models.contract.config import Stage1Config, Stage2Config
from models.core.augment import Augmentation, CropFlip, mixup_lambda
from models.core.backbones import build_classifier
from models.core.h2t import class_balanced_indices, fusion_channels
from models.core.stages import Stage1Recipe, Stage2Recipe, sam_perturb, sam_restore

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


def test_logit_adjusted_and_balanced_softmax_losses_equal_hand_computed_values():
    counts = (6, 3, 1)  # prior 0.6, 0.3, 0.1
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.5, 1.5]])
    labels = torch.tensor([0, 2])

    def by_hand(tau: float) -> float:  # -log softmax(z + tau log pi)[y], averaged
        total = 0.0
        for z, y in zip(logits.tolist(), labels.tolist(), strict=True):
            adjusted = [v + tau * math.log(p) for v, p in zip(z, (0.6, 0.3, 0.1), strict=True)]
            total += -(adjusted[y] - math.log(sum(math.exp(a) for a in adjusted)))
        return total / 2

    la = Stage1Recipe(Stage1Config(loss="logit_adjusted", logit_adjust_tau=2.0), counts)
    bs = Stage1Recipe(Stage1Config(loss="balanced_softmax", logit_adjust_tau=2.0), counts)  # tau ignored: 1
    assert float(la.loss(logits, labels, None)) == pytest.approx(by_hand(2.0), abs=1e-5)
    assert float(bs.loss(logits, labels, None)) == pytest.approx(by_hand(1.0), abs=1e-5)
    assert float(stage1().loss(logits, labels, None)) == pytest.approx(by_hand(0.0), abs=1e-5)
    with pytest.raises(ValueError, match="class counts"):
        Stage1Recipe(Stage1Config(loss="balanced_softmax"))


def test_augmentation_after_the_crop_is_drawn_last_and_only_when_configured():
    plain, cut = draw(stage1(batch_size=4)), draw(stage1(batch_size=4, cutout=4, augment_policy="randaugment"))
    for a, b in zip(plain, cut, strict=True):  # everything else drawn exactly as without them
        assert torch.equal(a.indices, b.indices) and torch.equal(a.crops.top, b.crops.top)
        assert a.mixup.lam == b.mixup.lam and torch.equal(a.mixup.perm, b.mixup.perm)
        assert a.crops.extras == () and [type(e).__name__ for e in b.crops.extras] == ["PolicyDraws", "CutoutDraws"]
    assert sum(len(s.crops.extras[1].centre_y) for s in cut) == len(LABELS)


def test_sam_perturbs_along_the_normalised_gradient_and_restores_the_weights_exactly():
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in layer.parameters()]
    layer(torch.randn(4, 3)).pow(2).sum().backward()
    grads = [p.grad.clone() for p in layer.parameters()]
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
    kept = sam_perturb(list(layer.parameters()), rho=0.1)
    for p, b, g in zip(layer.parameters(), before, grads, strict=True):
        assert torch.allclose(p - b, 0.1 * g / norm, atol=1e-7)
    moved = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(layer.parameters(), before, strict=True)))
    assert float(moved) == pytest.approx(0.1, rel=1e-5)
    sam_restore(list(layer.parameters()), kept)
    assert all(torch.equal(p, b) for p, b in zip(layer.parameters(), before, strict=True))


def test_stage2_max_norm_caps_each_class_weight_vector_and_leaves_shorter_ones():
    model = build_classifier("resnet32", 3)
    with torch.no_grad():
        model.head.fc.weight.copy_(torch.tensor([[3.0, 4.0] + [0.0] * 62, [0.3, 0.4] + [0.0] * 62,
                                                 [0.0] * 63 + [10.0]]))
    stage2(max_norm=1.0).after_step(model)
    norms = model.head.fc.weight.norm(dim=1)
    assert norms.tolist() == pytest.approx([1.0, 0.5, 1.0])
    assert model.head.fc.weight[0, :2].tolist() == pytest.approx([0.6, 0.8])  # scaled, direction kept
    stage2().after_step(model)  # no cap configured: unchanged
    assert model.head.fc.weight.norm(dim=1).tolist() == pytest.approx([1.0, 0.5, 1.0])
