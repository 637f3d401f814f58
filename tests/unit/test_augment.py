import torch

from models.core.augment import CropFlip, crop_flip, mix, mixup_lambda, normalize


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
