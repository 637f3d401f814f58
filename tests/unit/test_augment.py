import pytest
import torch

from models.core.augment import (
    CropFlip,
    CutoutDraws,
    PolicyDraws,
    apply_extras,
    crop_flip,
    mix,
    mixup_lambda,
    normalize,
    with_extras,
)


def _images(n=3, size=8) -> torch.Tensor:
    return torch.randint(1, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_crop_flip_matches_slicing_a_zero_padded_image():
    images = _images()
    draws = CropFlip(top=torch.tensor([0, 4, 8]), left=torch.tensor([8, 4, 1]), flip=torch.tensor([False, True, True]))
    out = crop_flip(images, 4, draws)
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    for i in range(3):
        t, left = int(draws.top[i]), int(draws.left[i])
        expected = padded[i, :, t:t + 8, left:left + 8]
        if draws.flip[i]:
            expected = expected.flip(-1)
        assert torch.equal(out[i], expected)


def test_centre_crop_without_flip_is_the_identity():
    images = _images()
    draws = CropFlip(torch.full((3,), 4), torch.full((3,), 4), torch.zeros(3, dtype=torch.bool))
    assert torch.equal(crop_flip(images, 4, draws), images)


def test_crop_flip_draws_cover_all_offsets_and_both_flips():
    draws = CropFlip.draw(5000, 4, torch.Generator().manual_seed(0))
    assert set(draws.top.tolist()) == set(range(9)) and set(draws.left.tolist()) == set(range(9))
    assert 0.45 < draws.flip.float().mean() < 0.55


def test_normalize_scales_uint8_to_standardised_floats():
    out = normalize(torch.full((1, 3, 2, 2), 255, dtype=torch.uint8), torch.tensor([0.5] * 3), torch.tensor([0.25] * 3))
    assert torch.allclose(out, torch.full((1, 3, 2, 2), 2.0))


def test_mixup_lambda_is_in_unit_interval_and_mix_is_a_convex_combination():
    gen = torch.Generator().manual_seed(0)
    lams = [mixup_lambda(1.0, gen) for _ in range(200)]
    assert all(0 <= lam <= 1 for lam in lams) and 0.4 < sum(lams) / len(lams) < 0.6
    x = torch.randn(4, 3, 2, 2)
    perm = torch.tensor([1, 0, 3, 2])
    assert torch.allclose(mix(x, perm, 0.3), 0.3 * x + 0.7 * x[perm])


def test_crop_and_flip_can_each_be_turned_off():
    draws = CropFlip.draw(100, 2, torch.Generator().manual_seed(0), crop=False, flip=False)
    assert set(draws.top.tolist()) == {2} and set(draws.left.tolist()) == {2} and not draws.flip.any()
    images = _images(size=8)[:1].expand(100, -1, -1, -1)
    assert torch.equal(crop_flip(images, 2, draws), images)


@pytest.mark.parametrize("policy", ["autoaugment_cifar", "randaugment"])
def test_a_policy_on_a_batch_keeps_dtype_shape_and_range_and_is_a_pure_function_of_the_generator(policy):
    images = _images(n=64, size=32)
    first = PolicyDraws.draw(64, policy, torch.Generator().manual_seed(3)).apply(images)
    again = PolicyDraws.draw(64, policy, torch.Generator().manual_seed(3)).apply(images)
    other = PolicyDraws.draw(64, policy, torch.Generator().manual_seed(4)).apply(images)
    assert first.dtype == torch.uint8 and first.shape == images.shape
    assert torch.equal(first, again) and not torch.equal(first, other)
    changed = (first != images).flatten(1).any(1)
    assert 0 < int(changed.sum()) <= 64  # some images changed (AutoAugment may draw no operation for some)


def test_each_image_gets_exactly_torchvisions_operation_for_its_own_draw():
    """The batched application equals torchvision's operation applied to each image alone with its draw."""
    from torchvision.transforms import v2

    images = _images(n=32, size=32)
    draws = PolicyDraws.draw(32, "randaugment", torch.Generator().manual_seed(1), ops=1, magnitude=9)
    out = draws.apply(images)
    transform = v2.RandAugment()
    for i in range(32):
        name, bin_ = draws.table[int(draws.ops[i, 0])]
        levels, signed = transform._AUGMENTATION_SPACE[name]
        magnitudes = levels(31, 32, 32)
        size = float(magnitudes[bin_]) if magnitudes is not None and magnitudes.ndim > 0 else 0.0
        size = -size if signed and bool(draws.negative[i, 0]) else size
        alone = transform._apply_image_or_video_transform(images[i:i + 1], name, size, transform.interpolation,
                                                          transform._fill)
        assert torch.equal(out[i:i + 1], alone), name


def test_cutout_zeroes_one_clipped_square_per_image_and_nothing_else():
    images = _images(n=16, size=32)  # values 1..255: a zero can only come from Cutout
    draws = CutoutDraws.draw(16, 8, torch.Generator().manual_seed(0))
    out = draws.apply(images)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    for i in range(16):
        cy, cx = int(draws.centre_y[i] * 32), int(draws.centre_x[i] * 32)
        hole = torch.zeros(32, 32, dtype=torch.bool)
        hole[max(cy - 4, 0):cy + 4, max(cx - 4, 0):cx + 4] = True
        assert torch.equal(out[i] == 0, hole.expand(3, 32, 32))
        assert torch.equal(out[i][~hole.expand(3, 32, 32)], images[i][~hole.expand(3, 32, 32)])
    assert torch.equal(CutoutDraws.draw(16, 8, torch.Generator().manual_seed(0)).apply(images), out)


def test_extras_follow_their_images_through_split_take_and_apply():
    images = _images(n=6, size=16)
    generator = torch.Generator().manual_seed(0)
    draws = with_extras(CropFlip.draw(6, 2, generator), (CutoutDraws.draw(6, 4, generator),))
    whole = apply_extras(images, draws)
    parts = draws.split([4, 2])
    assert torch.equal(torch.cat([apply_extras(images[:4], parts[0]), apply_extras(images[4:], parts[1])]), whole)
    picked = torch.tensor([5, 1])
    assert torch.equal(apply_extras(images[picked], draws.take(picked)), whole[picked])
