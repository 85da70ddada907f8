"""Rectified flow on a real toy DiT: noise path, schedule, loss masking, sampler behaviour."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from model.dit import DiT, DiTConfig
from model.rectified_flow import (
    add_noise,
    edit,
    sample,
    sample_timesteps,
    sampling_timesteps,
    shift_timesteps,
    timestep_shift,
    training_loss,
    unshift_timestep,
    velocity_target,
)

TEXT_DIM = 16


def toy_dit(seed: int = 0) -> DiT:
    """2-block DiT with its zero-initialised (adaLN-Zero) weights perturbed so it predicts non-zero."""
    torch.manual_seed(seed)
    model = DiT(DiTConfig(in_channels=4, text_dim=TEXT_DIM, hidden_size=32, depth=2, num_heads=2, max_text_tokens=8))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


class Recording(nn.Module):
    """The toy DiT, keeping the inputs and (grad-retaining) output of its last forward."""

    def __init__(self, inner: DiT) -> None:
        super().__init__()
        self.inner = inner
        self.calls: list[dict] = []

    def null_text(self, batch_size, num_tokens=None):
        return self.inner.null_text(batch_size, num_tokens)

    def forward(self, x, t, text, text_mask, cond_mask=None):
        out = self.inner(x, t, text, text_mask, cond_mask)
        if out.requires_grad:
            out.retain_grad()
        self.calls.append(dict(x=x, t=t, text=text, text_mask=text_mask, cond_mask=cond_mask, out=out))
        return out


def toy_batch(B=2, T=4, seed=100):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(B, 4, T, 4, 4, generator=g)
    text = torch.randn(B, 5, TEXT_DIM, generator=g)
    return latents, text, torch.ones(B, 5, dtype=torch.bool)


def test_noise_path_endpoints_and_velocity():
    x0, noise = torch.randn(2, 3, 4, 2, 2), torch.randn(2, 3, 4, 2, 2)
    assert torch.equal(add_noise(x0, noise, torch.zeros(2)), x0)
    assert torch.equal(add_noise(x0, noise, torch.ones(2)), noise)
    # The velocity is the time derivative of the path.
    t, dt = torch.full((2,), 0.3), 1e-3
    fd = (add_noise(x0, noise, t + dt) - add_noise(x0, noise, t)) / dt
    torch.testing.assert_close(fd, velocity_target(x0, noise), rtol=1e-2, atol=1e-2)
    # Per-frame t: frame 0 clean, the rest pure noise.
    per_frame = add_noise(x0, noise, torch.tensor([[0.0, 1.0, 1.0, 1.0]] * 2))
    assert torch.equal(per_frame[:, :, 0], x0[:, :, 0]) and torch.equal(per_frame[:, :, 1:], noise[:, :, 1:])


def test_timestep_shift():
    assert timestep_shift(4096) == 1.0
    assert timestep_shift(64) == 1.0  # never shifted towards clean
    assert timestep_shift(21 * 60 * 104) == pytest.approx(math.sqrt(21 * 60 * 104 / 4096))
    t = torch.linspace(0, 1, 11)
    shifted = shift_timesteps(t, 3.0)
    assert shifted[0] == 0 and shifted[-1] == 1 and (shifted[1:-1] > t[1:-1]).all()
    assert unshift_timestep(float(shifted[4]), 3.0) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="num_positions=0"):
        timestep_shift(0)


def test_sample_timesteps_logit_normal_shifted_and_seeded():
    a = sample_timesteps(4096, torch.Generator().manual_seed(0), 1.0)
    b = sample_timesteps(4096, torch.Generator().manual_seed(0), 1.0)
    assert torch.equal(a, b) and a.shape == (4096,)
    assert ((a > 0) & (a < 1)).all()
    assert abs(a.mean() - 0.5) < 0.02  # logit-normal(0, 1) is symmetric around 1/2
    shifted = sample_timesteps(4096, torch.Generator().manual_seed(0), 4.0)
    assert shifted.mean() > 0.7


def test_loss_ignores_conditioning_frames():
    model = Recording(toy_dit())
    latents, text, mask = toy_batch(T=4)
    cond = torch.tensor([[True, False, False, True], [False, False, False, False]])
    loss, stats = training_loss(model, latents, text, mask, cond, torch.Generator().manual_seed(0))
    loss.backward()
    call = model.calls[-1]
    # The model saw the clean latents on conditioning frames and noisy ones elsewhere.
    assert torch.equal(call["x"][0, :, [0, 3]], latents[0, :, [0, 3]])
    assert not torch.allclose(call["x"][0, :, 1], latents[0, :, 1])
    # The loss's gradient w.r.t. the prediction (= w.r.t. the target) is zero on conditioning frames.
    grad = call["out"].grad
    assert grad[0, :, [0, 3]].abs().sum() == 0
    assert grad[0, :, [1, 2]].abs().sum() > 0 and grad[1].abs().sum() > 0
    assert stats["cond_frame_fraction"] == pytest.approx(2 / 8)
    # Gradients reach the network.
    assert model.inner.final_layer.linear.weight.grad.abs().sum() > 0


def test_loss_is_seeded_and_matches_a_manual_computation():
    model = Recording(toy_dit())
    latents, text, mask = toy_batch()
    l1, _ = training_loss(model, latents, text, mask, None, torch.Generator().manual_seed(7), shift=2.0)
    l2, _ = training_loss(model, latents, text, mask, None, torch.Generator().manual_seed(7), shift=2.0)
    assert torch.equal(l1, l2)
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(latents.shape, generator=g)
    t = sample_timesteps(2, g, 2.0)
    with torch.no_grad():
        pred = model.inner(add_noise(latents, noise, t), t, text, mask)
    torch.testing.assert_close(l1.detach(), (pred - (noise - latents)).pow(2).mean())


def test_loss_rejects_bad_arguments():
    model = toy_dit()
    latents, text, mask = toy_batch()
    with pytest.raises(ValueError, match=r"cond_mask \(2, 3\)"):
        training_loss(model, latents, text, mask, torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="text_dropout=1.5"):
        training_loss(model, latents, text, mask, text_dropout=1.5)
    # (a CPU generator with latents elsewhere; "meta" stands in for a GPU here)
    with pytest.raises(ValueError, match="generator is on cpu, latents on meta"):
        training_loss(model, latents.to("meta"), text, mask, generator=torch.Generator())


def test_text_dropout_swaps_in_null_text():
    model = Recording(toy_dit())
    latents, text, mask = toy_batch()
    training_loss(model, latents, text, mask, None, torch.Generator().manual_seed(0), text_dropout=1.0)
    null, _ = model.null_text(2, 5)
    assert torch.equal(model.calls[-1]["text"], null)
    training_loss(model, latents, text, mask, None, torch.Generator().manual_seed(0), text_dropout=0.0)
    assert torch.equal(model.calls[-1]["text"], text)


def test_sampling_timesteps_schedule():
    ts = sampling_timesteps(10, 3.0)
    assert len(ts) == 11 and ts[0] == 1.0 and ts[-1] == 0.0
    assert all(a > b for a, b in zip(ts, ts[1:]))
    assert sampling_timesteps(4, 3.0, start_t=0.6)[0] == 0.6
    with pytest.raises(ValueError, match="steps=0"):
        sampling_timesteps(0, 1.0)


def test_sampler_is_deterministic_for_a_seed():
    model = toy_dit()
    _, text, mask = toy_batch()

    def run(seed):
        noise = torch.randn(2, 4, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
        return sample(model, noise, text, mask, steps=4, guidance=3.0)

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_one_guided_euler_step_matches_manual_cfg():
    model = toy_dit()
    _, text, mask = toy_batch()
    noise = torch.randn(2, 4, 2, 4, 4, generator=torch.Generator().manual_seed(3))
    out = sample(model, noise, text, mask, steps=1, guidance=4.0, shift=1.0)
    with torch.no_grad():
        t = torch.ones(2)
        v_text = model(noise, t, text, mask)
        null, null_mask = model.null_text(2, 5)
        v_null = model(noise, t, null, null_mask)
    torch.testing.assert_close(out, noise - (v_null + 4.0 * (v_text - v_null)), rtol=1e-4, atol=1e-5)


def test_conditioning_frames_come_back_exactly():
    model = toy_dit()
    _, text, mask = toy_batch()
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(2, 4, 4, 4, 4, generator=g)
    cond_latents = torch.randn(2, 4, 4, 4, 4, generator=g)
    cond = torch.tensor([[True, False, False, False], [False, True, False, True]])
    out = sample(model, noise, text, mask, steps=3, guidance=2.0, cond_latents=cond_latents, cond_mask=cond)
    assert torch.equal(out[0, :, 0], cond_latents[0, :, 0])
    assert torch.equal(out[1, :, [1, 3]], cond_latents[1, :, [1, 3]])
    assert not torch.allclose(out[0, :, 1], cond_latents[0, :, 1])


def test_bf16_model_samples_close_to_fp32_and_keeps_conditioning_exact():
    model = toy_dit()
    _, text, mask = toy_batch()
    g = torch.Generator().manual_seed(4)
    noise = torch.randn(2, 4, 3, 4, 4, generator=g)
    cond_latents = torch.randn(2, 4, 3, 4, 4, generator=g).bfloat16()
    cond = torch.tensor([[True, False, False]] * 2)
    ref = sample(model, noise, text, mask, steps=6, guidance=3.0, cond_latents=cond_latents.float(), cond_mask=cond)
    low = sample(
        model.to(torch.bfloat16), noise.bfloat16(), text.bfloat16(), mask,
        steps=6, guidance=3.0, cond_latents=cond_latents, cond_mask=cond,
    )  # fmt: skip
    assert low.dtype == torch.bfloat16
    assert torch.equal(low[:, :, 0], cond_latents[:, :, 0])
    # bf16 weights and activations (8 mantissa bits) over 6 guided steps: a few percent, not more.
    assert (low.float() - ref).norm() / ref.norm() < 0.05


def test_edit_strength_zero_returns_input_and_strength_controls_distance():
    model = toy_dit()
    latents, text, mask = toy_batch(T=2)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(5))
    assert torch.equal(edit(model, latents, noise, text, mask, strength=0.0, steps=4, guidance=1.0), latents)
    near = edit(model, latents, noise, text, mask, strength=0.2, steps=4, guidance=1.0)
    far = edit(model, latents, noise, text, mask, strength=0.9, steps=4, guidance=1.0)
    assert 0 < (near - latents).norm() < (far - latents).norm()
    with pytest.raises(ValueError, match="strength=1.5"):
        edit(model, latents, noise, text, mask, strength=1.5, steps=4, guidance=1.0)


def test_progress_callback_and_input_checks():
    model = toy_dit()
    latents, text, mask = toy_batch(T=2)
    seen = []
    sample(model, latents, text, mask, steps=3, guidance=1.0, progress=lambda i, n: seen.append((i, n)))
    assert seen == [(1, 3), (2, 3), (3, 3)]
    with pytest.raises(ValueError, match="together"):
        sample(model, latents, text, mask, steps=3, guidance=1.0, cond_latents=latents)
    with pytest.raises(ValueError, match="start_t=0.5"):
        sample(model, latents, text, mask, steps=3, guidance=1.0, start_t=0.5)
