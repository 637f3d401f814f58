import pytest
import torch

from models.core.h2t import class_balanced_indices, fuse


def _maps(seed: int, shape=(4, 16, 3, 3)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _channels_from_fusing(out, fused, fusing) -> list[int]:
    """Channels of `out` that equal `fusing` everywhere in the batch (and not `fused`)."""
    chosen = []
    for c in range(out.shape[1]):
        if torch.equal(out[:, c], fusing[:, c]):
            chosen.append(c)
        else:
            assert torch.equal(out[:, c], fused[:, c]), f"channel {c} is neither branch's"
    return chosen


@pytest.mark.parametrize("rho, expected", [(0.25, 4), (0.5, 8), (0.3, 4), (0.9, 14)])
def test_fuse_takes_exactly_int_rho_c_channels_from_fusing(rho, expected):
    fused, fusing = _maps(0), _maps(1)
    out = fuse(fused, fusing, rho, torch.Generator().manual_seed(2))
    assert len(_channels_from_fusing(out, fused, fusing)) == expected


def test_fuse_uses_the_same_channels_for_every_sample_of_the_batch():
    fused, fusing = _maps(0, (32, 64, 2, 2)), _maps(1, (32, 64, 2, 2))
    out = fuse(fused, fusing, 0.25, torch.Generator().manual_seed(3))
    # _channels_from_fusing compares whole-batch slices, so a per-sample choice would fail it
    assert len(_channels_from_fusing(out, fused, fusing)) == 16


def test_fuse_leaves_both_inputs_untouched():
    fused, fusing = _maps(0), _maps(1)
    before = fused.clone(), fusing.clone()
    out = fuse(fused, fusing, 0.5)
    assert torch.equal(fused, before[0]) and torch.equal(fusing, before[1])
    assert out.data_ptr() != fused.data_ptr()


def test_fuse_with_rho_zero_is_the_fused_maps_and_with_rho_one_the_fusing_maps():
    fused, fusing = _maps(0), _maps(1)
    assert torch.equal(fuse(fused, fusing, 0.0), fused)
    assert torch.equal(fuse(fused, fusing, 1.0), fusing)


def test_fuse_draws_different_channel_subsets_across_calls():
    fused, fusing = _maps(0, (2, 64, 1, 1)), _maps(1, (2, 64, 1, 1))
    gen = torch.Generator().manual_seed(0)
    subsets = {tuple(_channels_from_fusing(fuse(fused, fusing, 0.25, gen), fused, fusing)) for _ in range(5)}
    assert len(subsets) > 1


@pytest.mark.parametrize("rho", [-0.1, 1.5, float("nan")])
def test_fuse_rejects_rho_outside_unit_interval(rho):
    with pytest.raises(ValueError, match="rho must be in"):
        fuse(_maps(0), _maps(1), rho)


def test_fuse_rejects_maps_of_different_shapes():
    with pytest.raises(ValueError, match="same shape|one shape"):
        fuse(_maps(0), _maps(1, (4, 8, 3, 3)), 0.5)


def test_class_balanced_sampler_draws_classes_uniformly_whatever_their_size():
    counts = [500, 100, 20, 5]
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    drawn = class_balanced_indices(labels, 40_000, torch.Generator().manual_seed(0))
    freq = torch.bincount(labels[drawn], minlength=4).float() / 40_000
    assert torch.allclose(freq, torch.full((4,), 0.25), atol=0.01)


def test_class_balanced_sampler_draws_samples_uniformly_within_a_class():
    labels = torch.tensor([0] * 4 + [1] * 1000)
    drawn = class_balanced_indices(labels, 40_000, torch.Generator().manual_seed(1))
    within = torch.bincount(drawn[labels[drawn] == 0], minlength=4).float()
    assert torch.allclose(within / within.sum(), torch.full((4,), 0.25), atol=0.02)


def test_class_balanced_sampler_ignores_absent_class_ids():
    labels = torch.tensor([0, 0, 2, 2, 2])  # class 1 has no images
    drawn = class_balanced_indices(labels, 1000, torch.Generator().manual_seed(0))
    assert set(labels[drawn].tolist()) == {0, 2}
