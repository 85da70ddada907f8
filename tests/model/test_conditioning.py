"""Conditioning specs for every mode, the training mask sampler, and a spec driving the real sampler."""

from __future__ import annotations

import pytest
import torch

from model.conditioning import (
    MODES,
    ConditioningProbs,
    ConditioningSpec,
    FrameCondition,
    sample_condition_mask,
    sample_condition_masks,
    spec_for_mode,
)
from model.dit import DiT, DiTConfig
from model.rectified_flow import sample


def frames_numbered(num_frames: int, offset: float = 0.0) -> torch.Tensor:
    """(1, 2, T, 2, 2) latent whose frame i is filled with offset + i, so gathered frames are readable."""
    values = offset + torch.arange(num_frames, dtype=torch.float32)
    return values[None, None, :, None, None].expand(1, 2, num_frames, 2, 2).clone()


@pytest.mark.parametrize(
    "mode,k,expected",
    [
        ("text", 1, [0, 0, 0, 0, 0, 0]),
        ("image", 1, [1, 0, 0, 0, 0, 0]),
        ("extend", 2, [1, 1, 0, 0, 0, 0]),
        ("extend-backward", 3, [0, 0, 0, 1, 1, 1]),
        ("connect", 2, [1, 1, 0, 0, 1, 1]),
        ("edit", 1, [0, 0, 0, 0, 0, 0]),
    ],
)
def test_mode_masks(mode, k, expected):
    spec = spec_for_mode(mode, 6, k)
    assert spec.mask(6).tolist() == [bool(v) for v in expected]
    assert (spec.start_t < 1.0) == (mode == "edit")


def test_build_takes_frames_from_the_right_ends():
    video_a, video_b = frames_numbered(5), frames_numbered(4, offset=100.0)
    latents, mask = spec_for_mode("connect", 7, 2).build([video_a, video_b], 7)
    assert latents.shape == (1, 2, 7, 2, 2) and mask.shape == (1, 7)
    # A's last two frames (3, 4) open the clip, B's first two (100, 101) close it; the rest are zeros.
    assert latents[0, 0, :, 0, 0].tolist() == [3.0, 4.0, 0.0, 0.0, 0.0, 100.0, 101.0]
    assert mask[0].tolist() == [True, True, False, False, False, True, True]

    latents, _ = spec_for_mode("extend", 4, 3).build([video_a], 4)
    assert latents[0, 0, :, 0, 0].tolist() == [2.0, 3.0, 4.0, 0.0]
    latents, _ = spec_for_mode("extend-backward", 4, 2).build([video_a], 4)
    assert latents[0, 0, :, 0, 0].tolist() == [0.0, 0.0, 0.0, 1.0]
    latents, _ = spec_for_mode("image", 3).build([frames_numbered(1, offset=7.0)], 3)
    assert latents[0, 0, :, 0, 0].tolist() == [7.0, 0.0, 0.0]


def test_invalid_specs_fail_naming_the_value():
    with pytest.raises(ValueError, match="'zoom'"):
        spec_for_mode("zoom", 4)
    with pytest.raises(ValueError, match="k=3"):
        spec_for_mode("connect", 6, 3)  # 2*3 frames held of 6: nothing to generate
    with pytest.raises(ValueError, match="k=0"):
        spec_for_mode("extend", 6, 0)
    with pytest.raises(ValueError, match="needs 2 input latents"):
        spec_for_mode("connect", 6, 1).build([frames_numbered(3)], 6)
    with pytest.raises(ValueError, match="source_frame=-4"):
        spec_for_mode("extend", 6, 4).build([frames_numbered(3)], 6)
    with pytest.raises(ValueError, match="does not match"):
        spec_for_mode("connect", 6, 1).build([frames_numbered(3), torch.zeros(1, 2, 3, 4, 4)], 6)
    with pytest.raises(ValueError, match="more than once"):
        ConditioningSpec(frames=(FrameCondition(0, 0, 0), FrameCondition(0, 0, 1)))
    with pytest.raises(ValueError, match="latent_index=5"):
        ConditioningSpec(frames=(FrameCondition(5, 0, 0),)).mask(4)
    with pytest.raises(ValueError, match="start_t=2"):
        spec_for_mode("edit", 4, start_t=2.0)
    assert set(MODES) == {"text", "image", "extend", "extend-backward", "connect", "edit"}


def test_training_masks_are_seeded_and_follow_the_probabilities():
    probs = ConditioningProbs(first_frame=0.2, first_k=0.1, last_k=0.1, both_ends=0.1, random=0.1, max_k=3)
    a = sample_condition_masks(2000, 8, probs, torch.Generator().manual_seed(0))
    b = sample_condition_masks(2000, 8, probs, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == (2000, 8)
    assert not a.all(dim=1).any()  # a frame is always left to generate
    none = (~a.any(dim=1)).float().mean()
    only_first = (a[:, 0] & ~a[:, 1:].any(dim=1)).float().mean()
    # none: 0.4 (+ random's all-false draws, 0.1 / 2^8); first frame only: 0.2 + the k=1 share of
    # first_k (0.1 / 3) + random's (0.1 / 2^8). 2000 draws give a standard error of about 0.011.
    assert abs(none - 0.4004) < 0.04, none
    assert abs(only_first - 0.2337) < 0.04, only_first
    both_ends = (a[:, 0] & a[:, -1] & ~a[:, 3:5].any(dim=1)).float().mean()
    assert both_ends > 0.07  # 0.1 of both_ends plus a little from random
    assert a[:, 3:5].any(dim=1).float().mean() < 0.2  # only `random` reaches the middle frames at max_k=3


def test_training_masks_edge_cases():
    g = torch.Generator().manual_seed(0)
    always_ends = ConditioningProbs(first_frame=0, first_k=0, last_k=0, both_ends=1.0, random=0)
    assert not sample_condition_mask(1, always_ends, g).any()  # one frame: nothing may be held
    assert sample_condition_mask(2, always_ends, g).tolist() == [True, False]
    assert sample_condition_mask(3, always_ends, g).tolist() == [True, False, True]
    never = ConditioningProbs(first_frame=0, first_k=0, last_k=0, both_ends=0, random=0)
    assert not sample_condition_masks(50, 5, never, g).any()
    with pytest.raises(ValueError, match="sum to 1.34"):
        ConditioningProbs(first_frame=0.6, first_k=0.6)
    with pytest.raises(ValueError, match="random=-0.1"):
        ConditioningProbs(random=-0.1)


def test_connect_spec_drives_the_sampler():
    torch.manual_seed(0)
    model = DiT(DiTConfig(in_channels=2, text_dim=8, hidden_size=32, depth=1, num_heads=2, max_text_tokens=4))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    video_a, video_b = torch.randn(1, 2, 3, 2, 2), torch.randn(1, 2, 3, 2, 2)
    cond_latents, cond_mask = spec_for_mode("connect", 5, 1).build([video_a, video_b], 5)
    noise = torch.randn(1, 2, 5, 2, 2)
    text, text_mask = torch.randn(1, 3, 8), torch.ones(1, 3, dtype=torch.bool)
    out = sample(
        model, noise, text, text_mask, steps=2, guidance=2.0, cond_latents=cond_latents, cond_mask=cond_mask
    )
    assert torch.equal(out[:, :, 0], video_a[:, :, -1]) and torch.equal(out[:, :, 4], video_b[:, :, 0])
