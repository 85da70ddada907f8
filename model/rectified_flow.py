"""Rectified flow: the noise path, the training loss and the Euler ODE sampler.

Knows nothing about the network: `model` is any callable
`model(x (B, C, T, H, W), t (B,), text (B, L, Dt), text_mask (B, L), cond_mask (B, T) | None) -> velocity`
that also has `null_text(batch_size, num_tokens) -> (text, mask)` for classifier-free guidance.

Conventions (as in SD3 and Wan): t = 0 is data, t = 1 is pure noise,
    x_t = (1 - t) * x0 + t * noise,   velocity v = dx_t/dt = noise - x0,
and sampling integrates dx/dt = v from t = 1 down to t = 0 with Euler steps x <- x + (t_next - t) * v.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

# Latent positions (T*H*W) at which the timestep shift is 1. 4096 = one 64x64 latent frame (a 512x512
# image through an 8x autoencoder). With it, Wan 2.1's 480p 81-frame latent (21x60x104) gets
# sqrt(131040/4096) = 5.7, close to the shift of 5 Wan samples with.
BASE_POSITIONS = 4096


def timestep_shift(num_positions: int, base_positions: int = BASE_POSITIONS) -> float:
    """Resolution/duration-dependent shift s = max(1, sqrt(num_positions / base_positions)) (SD3, 5.3.2).

    More latent positions carry more redundant signal, so the same t destroys less of it; shifting t
    towards 1 spends more of training and sampling at the high-noise levels where layout and motion
    are decided. `num_positions` = T*H*W of the latent; the network's patching does not change how
    much signal the noise destroys, so tokens are not the right count here. Below the reference size
    the schedule stays unshifted: s < 1 would starve exactly those high-noise levels (SD3 and Wan only
    ever shift upwards), and tiny latents (CI toys, previews) would be trained almost noise-free.
    """
    if num_positions < 1 or base_positions < 1:
        raise ValueError(f"num_positions={num_positions} and base_positions={base_positions} must be >= 1")
    return max(1.0, math.sqrt(num_positions / base_positions))


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's t' = s*t / (1 + (s - 1)*t): maps [0, 1] onto itself, s > 1 moves mass towards noise."""
    return shift * t / (1 + (shift - 1) * t)


def unshift_timestep(t: float, shift: float) -> float:
    """Inverse of shift_timesteps for one value: u with shift_timesteps(u) == t."""
    return t / (shift - (shift - 1) * t)


def sample_timesteps(
    batch: int,
    generator: torch.Generator | None = None,
    shift: float = 1.0,
    *,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(batch,) training timesteps: logit-normal (SD3's best sampler: more weight on the middle of the
    path, where the velocity is hardest to predict), then shifted. Drawn on the generator's device."""
    if shift <= 0:
        raise ValueError(f"shift={shift} must be > 0")
    gen_device = generator.device if generator is not None else device
    u = torch.randn(batch, generator=generator, device=gen_device) * logit_std + logit_mean  # (B,)
    return shift_timesteps(torch.sigmoid(u), shift).to(device if device is not None else u.device)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t noise for x0, noise (B, C, T, H, W) and t (B,) or per-frame (B, T)."""
    t = t.to(x0.dtype)
    t = t[:, None, None, None, None] if t.dim() == 1 else t[:, None, :, None, None]  # (B, 1, T|1, 1, 1)
    return (1 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity the model regresses: d x_t / dt = noise - x0."""
    return noise - x0


def training_loss(
    model: Callable[..., torch.Tensor],
    latents: torch.Tensor,
    text: torch.Tensor,
    text_mask: torch.Tensor,
    cond_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    *,
    shift: float | None = None,
    text_dropout: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Flow-matching MSE on the velocity of the generated (non-conditioning) frames.

    latents (B, C, T, H, W) clean; cond_mask (B, T) bool marks clean conditioning frames: they are fed
    to the model un-noised and contribute nothing to the loss. `shift` defaults to
    timestep_shift(T*H*W). `text_dropout` replaces that fraction of prompts by the model's null text
    (classifier-free guidance training). Noise, timesteps and dropout come from `generator` (on the
    latents' device) when given. Returns the scalar loss and detached stats tensors (no host sync:
    call .item() only when logging).
    """
    B, C, T, H, W = latents.shape
    if cond_mask is not None and tuple(cond_mask.shape) != (B, T):
        raise ValueError(f"cond_mask {tuple(cond_mask.shape)} must be (B, T)=({B}, {T})")
    if not 0.0 <= text_dropout <= 1.0:
        raise ValueError(f"text_dropout={text_dropout} must be in [0, 1]")
    if generator is not None and generator.device.type != latents.device.type:
        # Drawing the noise on another device and copying it over would cost a transfer per step.
        raise ValueError(f"generator is on {generator.device}, latents on {latents.device}: use one device")
    if shift is None:
        shift = timestep_shift(T * H * W)

    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    t = sample_timesteps(B, generator, shift, device=latents.device)  # (B,)
    x_t = add_noise(latents, noise, t)
    if cond_mask is not None:
        x_t = torch.where(cond_mask[:, None, :, None, None], latents, x_t)  # conditioning frames stay clean

    if text_dropout > 0:
        drop = torch.rand(B, generator=generator, device=latents.device) < text_dropout  # (B,)
        null_text, null_mask = model.null_text(B, text.shape[1])
        text = torch.where(drop[:, None, None], null_text.to(text.dtype), text)
        text_mask = torch.where(drop[:, None], null_mask, text_mask)

    pred = model(x_t, t, text, text_mask, cond_mask)
    err = (pred.float() - velocity_target(latents, noise).float()).pow(2).mean(dim=(1, 3, 4))  # (B, T)
    weight = torch.ones_like(err) if cond_mask is None else (~cond_mask).to(err.dtype)  # (B, T)
    # Mean over generated frames; clamp so an all-conditioning batch gives 0, not NaN.
    loss = (err * weight).sum() / weight.sum().clamp(min=1.0)
    stats = {
        "loss": loss.detach(),
        "t_mean": t.mean().detach(),
        "cond_frame_fraction": 1.0 - weight.mean().detach(),
    }
    return loss, stats


def sampling_timesteps(steps: int, shift: float, start_t: float = 1.0) -> list[float]:
    """steps + 1 timesteps from start_t down to 0: uniform in the unshifted variable, then shifted,
    so the shifted schedule starts exactly at start_t (python floats: no device syncs in the loop)."""
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    if not 0.0 <= start_t <= 1.0:
        raise ValueError(f"start_t={start_t} must be in [0, 1]")
    u0 = unshift_timestep(start_t, shift)
    us = torch.linspace(u0, 0.0, steps + 1, dtype=torch.float64)
    ts = shift_timesteps(us, shift).tolist()
    ts[0] = start_t
    return ts


def _check_sample_inputs(
    noise: torch.Tensor,
    guidance: float,
    cond_latents: torch.Tensor | None,
    cond_mask: torch.Tensor | None,
    start_t: float,
    init_latents: torch.Tensor | None,
) -> None:
    """Shapes and ranges `sample` needs, checked before the first (expensive) model call."""
    B, _, T, _, _ = noise.shape
    if (cond_latents is None) != (cond_mask is None):
        raise ValueError("cond_latents and cond_mask must be given together")
    if cond_latents is not None and (cond_latents.shape != noise.shape or tuple(cond_mask.shape) != (B, T)):
        raise ValueError(
            f"cond_latents {tuple(cond_latents.shape)} / cond_mask {tuple(cond_mask.shape)} must be "
            f"{tuple(noise.shape)} / ({B}, {T})"
        )
    if start_t < 1.0 and (init_latents is None or init_latents.shape != noise.shape):
        raise ValueError(f"start_t={start_t} < 1 needs init_latents of shape {tuple(noise.shape)}")
    if guidance < 0:
        raise ValueError(f"guidance={guidance} must be >= 0")


@torch.no_grad()
def sample(
    model: Callable[..., torch.Tensor],
    noise: torch.Tensor,
    text: torch.Tensor,
    text_mask: torch.Tensor,
    *,
    steps: int,
    guidance: float,
    cond_latents: torch.Tensor | None = None,
    cond_mask: torch.Tensor | None = None,
    shift: float | None = None,
    start_t: float = 1.0,
    init_latents: torch.Tensor | None = None,
    progress: bool | Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Euler integration of the flow ODE from t = start_t to 0; returns latents (B, C, T, H, W).

    noise (B, C, T, H, W) is the only randomness: the same noise gives the same latents. Its dtype is
    the one the model is called with and the one returned; the ODE state itself is kept in fp32.
    guidance: classifier-free guidance scale w, v = v_null + w (v_text - v_null); w = 1 skips the
    unconditional forward; otherwise both run batched in one forward of size 2B.
    cond_latents (B, C, T, H, W) with cond_mask (B, T): those frames are re-imposed before every step
    and in the result, so they come back exactly.
    start_t < 1 with init_latents (SDEdit): start from init noised to start_t; start_t = 0 returns init.
    shift defaults to timestep_shift(T*H*W), matching training_loss.
    progress: True for a tqdm bar, or a callable(step, steps) called after each step.
    """
    B, C, T, H, W = noise.shape
    _check_sample_inputs(noise, guidance, cond_latents, cond_mask, start_t, init_latents)
    if shift is None:
        shift = timestep_shift(T * H * W)
    if start_t == 0.0:
        return init_latents.clone()  # strength 0: nothing to denoise, the input comes back exactly

    timesteps = sampling_timesteps(steps, shift, start_t)
    # The ODE state is integrated in fp32 whatever the model's dtype: 20-50 bf16 additions of small
    # steps would lose the low bits of the latent. The model sees the state in the noise's dtype.
    model_dtype = noise.dtype
    x = noise.float() if start_t == 1.0 else (1 - start_t) * init_latents.float() + start_t * noise.float()
    if cond_latents is not None:
        cond_latents = cond_latents.float()  # exact: every bf16/fp16 value is an fp32 value
    frame_mask = cond_mask[:, None, :, None, None] if cond_mask is not None else None  # (B, 1, T, 1, 1)

    use_cfg = guidance != 1.0
    if use_cfg:
        # Batch the unconditional branch with the conditional one: one forward of 2B per step.
        null_text, null_mask = model.null_text(B, text.shape[1])
        text_in = torch.cat([text, null_text.to(text.dtype)])  # (2B, L, Dt)
        text_mask_in = torch.cat([text_mask, null_mask])  # (2B, L)
        cond_mask_in = torch.cat([cond_mask, cond_mask]) if cond_mask is not None else None  # (2B, T)
    else:
        text_in, text_mask_in, cond_mask_in = text, text_mask, cond_mask

    step_iter = range(steps)
    if progress is True:
        from tqdm.auto import tqdm  # lazy: model/ must import with torch alone

        step_iter = tqdm(step_iter, desc="sampling", unit="step")

    for i in step_iter:
        t_cur, t_next = timesteps[i], timesteps[i + 1]
        if frame_mask is not None:
            x = torch.where(frame_mask, cond_latents, x)
        t_batch = torch.full((B,), t_cur, device=x.device, dtype=torch.float32)  # (B,)
        if use_cfg:
            x_in = torch.cat([x, x]).to(model_dtype)  # (2B, C, T, H, W)
            t_in = torch.cat([t_batch, t_batch])  # (2B,)
            v_text, v_null = model(x_in, t_in, text_in, text_mask_in, cond_mask_in).float().chunk(2)
            v = v_null + guidance * (v_text - v_null)
        else:
            v = model(x.to(model_dtype), t_batch, text_in, text_mask_in, cond_mask_in)
        x = x + (t_next - t_cur) * v.float()
        if callable(progress):
            progress(i + 1, steps)

    if frame_mask is not None:
        x = torch.where(frame_mask, cond_latents, x)
    return x.to(model_dtype)


def edit(
    model: Callable[..., torch.Tensor],
    latents: torch.Tensor,
    noise: torch.Tensor,
    text: torch.Tensor,
    text_mask: torch.Tensor,
    *,
    strength: float,
    steps: int,
    guidance: float,
    shift: float | None = None,
    progress: bool | Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """SDEdit: noise `latents` to t = strength and denoise towards `text`. strength 0 returns the input
    exactly, 1 ignores it. `steps` Euler steps cover [strength, 0]."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength={strength} must be in [0, 1]")
    return sample(
        model, noise, text, text_mask,
        steps=steps, guidance=guidance, shift=shift, start_t=strength, init_latents=latents, progress=progress,
    )  # fmt: skip

