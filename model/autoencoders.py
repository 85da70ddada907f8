"""Video autoencoders: pixels `(B, 3, T, H, W)` in [-1, 1] <-> latents `(B, C, t, h, w)`.

Every autoencoder here honours one small duck-typed contract (`Autoencoder` below), so the
DiT, the trainer and the generation pipeline never ask which one they hold:

    spec                   the string it was loaded from ("pixel", "wan:/models/wan2.1", ...)
    latent_channels        C of the latent
    temporal_factor        pixel frames per latent frame (after the first, for causal VAEs)
    spatial_factor         pixels per latent row/column
    encode(video)          (B, 3, T, H, W) in [-1, 1] -> (B, C, t, h, w), normalised to ~unit variance
    decode(latent)         the inverse, back to [-1, 1]
    latent_frames(T)       t for a valid T
    pixel_frames(t)        T that decodes from t latent frames
    check_frames(T)        ValueError naming T when it is not a valid clip length
    check_size(H, W)       ValueError naming the size when it is not divisible

Two implementations:

* `PixelAutoencoder` ("pixel", "pixel:s=2,t=1", "pixel:s=2,t=1,scale=4"): parameter-free
  space-to-depth, optionally times a power-of-two scale, exactly lossless. It keeps tiny runs and
  tests honest: anything the DiT is conditioned on comes back bit-for-bit, and there are no weights
  to download.
* `DiffusersAutoencoder` ("wan:<dir or id>", "cogvideox:<...>", "kl:<...>"): a pretrained
  diffusers VAE. Wan 2.x and CogVideoX are causal 3D VAEs (the first frame is encoded alone,
  then `temporal_factor` frames per latent frame); "kl" is a per-frame image VAE (SD/SDXL/Flux
  style `AutoencoderKL`) with the frames folded into the batch.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Protocol

import torch

from model.specs import split_spec

logger = logging.getLogger(__name__)

AUTOENCODER_KINDS = ("pixel", "wan", "cogvideox", "kl")


class Autoencoder(Protocol):
    """What the rest of reelforge relies on; see the module docstring."""

    spec: str
    latent_channels: int
    temporal_factor: int
    spatial_factor: int

    def encode(self, video: torch.Tensor) -> torch.Tensor: ...
    def decode(self, latent: torch.Tensor) -> torch.Tensor: ...
    def latent_frames(self, num_frames: int) -> int: ...
    def pixel_frames(self, num_latent_frames: int) -> int: ...
    def check_frames(self, num_frames: int) -> None: ...
    def check_size(self, height: int, width: int) -> None: ...


def _check_size(spec: str, spatial_factor: int, height: int, width: int) -> None:
    if height < 1 or width < 1 or height % spatial_factor or width % spatial_factor:
        raise ValueError(
            f"size {width}x{height} is not divisible by {spatial_factor}, the spatial factor of autoencoder {spec!r}"
        )


def _check_video(video: torch.Tensor) -> None:
    if video.ndim != 5 or video.shape[1] != 3:
        raise ValueError(f"video must be (B, 3, T, H, W), got {tuple(video.shape)}")


class PixelAutoencoder:
    """Lossless space-to-depth: each `t x s x s` block of RGB pixels becomes `3*t*s*s` channels,
    multiplied by `scale`.

    Pixels in [-1, 1] spread less than rectified flow's unit-variance noise (the demo suite: std
    0.57 over all clips, ~0.3 within one clip), so the network's input and velocity target are
    dominated by the noise. `scale` brings the latents to ~unit variance, as the latent scaling
    factors of SD3 / Wan VAEs do (scale 2 on the demo suite: std 1.14; measured in docs/training.md
    "The demo preset"). It must be a power of two, so encode and decode only change the float
    exponent and decode(encode(x)) == x stays exact, bit for bit.
    """

    def __init__(
        self, spatial_factor: int = 4, temporal_factor: int = 1, spec: str | None = None, *, scale: float = 1.0
    ) -> None:
        if spatial_factor < 1 or temporal_factor < 1:
            raise ValueError(f"pixel autoencoder factors must be >= 1, got s={spatial_factor} t={temporal_factor}")
        if not _is_power_of_two(scale):
            raise ValueError(
                f"pixel autoencoder scale={scale!r} must be a power of two (0.5, 1, 2, 4, ...) to stay exactly invertible"
            )
        self.spatial_factor = spatial_factor
        self.temporal_factor = temporal_factor
        self.scale = float(scale)
        self.latent_channels = 3 * temporal_factor * spatial_factor**2
        self.spec = spec or f"pixel:s={spatial_factor},t={temporal_factor}" + (f",scale={scale:g}" if scale != 1 else "")

    def latent_frames(self, num_frames: int) -> int:
        self.check_frames(num_frames)
        return num_frames // self.temporal_factor

    def pixel_frames(self, num_latent_frames: int) -> int:
        return num_latent_frames * self.temporal_factor

    def check_frames(self, num_frames: int) -> None:
        if num_frames < 1 or num_frames % self.temporal_factor:
            raise ValueError(
                f"num_frames {num_frames} must be a positive multiple of {self.temporal_factor} "
                f"for autoencoder {self.spec!r}"
            )

    def check_size(self, height: int, width: int) -> None:
        _check_size(self.spec, self.spatial_factor, height, width)

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        _check_video(video)
        b, c, frames, height, width = video.shape
        self.check_frames(frames)
        self.check_size(height, width)
        s, t = self.spatial_factor, self.temporal_factor
        x = video.reshape(b, c, frames // t, t, height // s, s, width // s, s)
        x = x.permute(0, 1, 3, 5, 7, 2, 4, 6)  # (B, 3, t, s, s, T/t, H/s, W/s)
        latent = x.reshape(b, self.latent_channels, frames // t, height // s, width // s)  # (B, C, T/t, H/s, W/s)
        return latent * self.scale if self.scale != 1 else latent

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        b, channels, frames, h, w = latent.shape
        if channels != self.latent_channels:
            raise ValueError(f"latent has {channels} channels, {self.spec!r} expects {self.latent_channels}")
        s, t = self.spatial_factor, self.temporal_factor
        if self.scale != 1:
            latent = latent / self.scale  # exact: a power of two only changes the exponent
        x = latent.reshape(b, 3, t, s, s, frames, h, w)
        x = x.permute(0, 1, 5, 2, 6, 3, 7, 4)  # (B, 3, T/t, t, H/s, s, W/s, s)
        return x.reshape(b, 3, frames * t, h * s, w * s)  # (B, 3, T, H, W)


class DiffusersAutoencoder:
    """A pretrained diffusers VAE behind the reelforge contract.

    Latents are the posterior mode (not a sample), so pre-encoded training latents and
    conditioning latents are reproducible, then normalised per channel as
    `(z - latent_mean) / latent_std` with the VAE's own statistics.

    Long and large clips: diffusers tiling (spatial tiles, blended) and slicing (one batch item
    at a time) are enabled where the VAE supports them. Wan and CogVideoX stream over time
    internally with a causal convolution cache, so their memory is bounded in T already;
    the per-frame "kl" VAE gets our own chunking, `frames_per_chunk` frames per forward pass.
    """

    def __init__(
        self,
        vae: torch.nn.Module,
        *,
        kind: str,
        spec: str,
        latent_mean: torch.Tensor,
        latent_std: torch.Tensor,
        temporal_factor: int,
        spatial_factor: int,
        frames_per_chunk: int = 16,
    ) -> None:
        self.vae = vae.eval().requires_grad_(False)
        self.kind = kind
        self.spec = spec
        param = next(vae.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.latent_channels = int(latent_mean.numel())
        # (1, C, 1, 1, 1) so they broadcast over (B, C, T, H, W)
        self.latent_mean = latent_mean.to(self.device, torch.float32).view(1, -1, 1, 1, 1)
        self.latent_std = latent_std.to(self.device, torch.float32).view(1, -1, 1, 1, 1)
        self.temporal_factor = temporal_factor
        self.spatial_factor = spatial_factor
        self.frames_per_chunk = frames_per_chunk

    def latent_frames(self, num_frames: int) -> int:
        self.check_frames(num_frames)
        return 1 + (num_frames - 1) // self.temporal_factor

    def pixel_frames(self, num_latent_frames: int) -> int:
        return 1 + (num_latent_frames - 1) * self.temporal_factor

    def check_frames(self, num_frames: int) -> None:
        factor = self.temporal_factor
        if num_frames < 1 or (num_frames - 1) % factor:
            raise ValueError(
                f"num_frames {num_frames} must be 1 + a multiple of {factor} for autoencoder {self.spec!r}"
            )
        # CogVideoX decodes latent frames in pairs after an odd first group of three (see
        # AutoencoderKLCogVideoX.num_latent_frames_batch_size), so an even latent count decodes
        # to the wrong number of frames.
        if self.kind == "cogvideox" and ((num_frames - 1) // factor) % 2:
            raise ValueError(
                f"num_frames {num_frames} must be 1 + a multiple of {2 * factor} for autoencoder {self.spec!r} "
                "(CogVideoX needs an odd number of latent frames)"
            )

    def check_size(self, height: int, width: int) -> None:
        _check_size(self.spec, self.spatial_factor, height, width)

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        _check_video(video)
        b, _, frames, height, width = video.shape
        self.check_frames(frames)
        self.check_size(height, width)
        video = video.to(self.device, self.dtype)
        match self.kind:
            case "kl":
                images = video.transpose(1, 2).reshape(b * frames, 3, height, width)  # (B*T, 3, H, W)
                z = torch.cat([self.vae.encode(chunk).latent_dist.mode() for chunk in images.split(self.frames_per_chunk)])
                z = z.reshape(b, frames, *z.shape[1:]).transpose(1, 2)  # (B, C, T, h, w)
            case _:
                z = self.vae.encode(video).latent_dist.mode()  # (B, C, t, h, w)
        z = (z.float() - self.latent_mean) / self.latent_std
        return z.to(self.dtype)

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        if latent.ndim != 5 or latent.shape[1] != self.latent_channels:
            raise ValueError(f"latent must be (B, {self.latent_channels}, t, h, w), got {tuple(latent.shape)}")
        z = latent.to(self.device, torch.float32) * self.latent_std + self.latent_mean
        z = z.to(self.dtype)
        b, c, frames, h, w = z.shape
        match self.kind:
            case "kl":
                flat = z.transpose(1, 2).reshape(b * frames, c, h, w)  # (B*T, C, h, w)
                video = torch.cat([self.vae.decode(chunk).sample for chunk in flat.split(self.frames_per_chunk)])
                video = video.reshape(b, frames, *video.shape[1:]).transpose(1, 2)  # (B, 3, T, H, W)
            case _:
                video = self.vae.decode(z).sample  # (B, 3, T, H, W)
        return video.clamp(-1.0, 1.0)


def parse_autoencoder_spec(spec: str) -> tuple[str, str]:
    """"wan:/models/wan" -> ("wan", "/models/wan"); "pixel" / "pixel:s=2,t=1,scale=4" -> ("pixel", options)."""
    expected = "pixel[:s=S,t=T,scale=K] or one of wan|cogvideox|kl:<dir or hub id>"
    return split_spec(spec, AUTOENCODER_KINDS, "pixel", "autoencoder", expected)


def _is_power_of_two(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0 and math.frexp(value)[0] == 0.5


def _pixel_from_options(spec: str, options: str) -> PixelAutoencoder:
    """"s=2,t=1,scale=4" -> PixelAutoencoder(2, 1, scale=4.0); a bad item raises naming it."""
    factors = {"s": 4, "t": 1}  # 32x32 frames -> 8x8 latents with 48 channels
    scale = 1.0
    for item in filter(None, options.split(",")):
        key, _, value = item.partition("=")
        if key in factors and value.isdigit():
            factors[key] = int(value)
            continue
        if key == "scale":
            try:
                scale = float(value)
            except ValueError:
                scale = math.nan  # reported below, with the spec
            if _is_power_of_two(scale):
                continue
        raise ValueError(
            f"bad pixel autoencoder option {item!r} in {spec!r}: expected s=N, t=N or scale=<power of two>"
        )
    return PixelAutoencoder(spatial_factor=factors["s"], temporal_factor=factors["t"], spec=spec, scale=scale)


def _load_vae(cls: type, location: str, dtype: torch.dtype, weights: bool = True) -> torch.nn.Module:
    """from_pretrained on a VAE folder, a full diffusers pipeline folder (subfolder "vae") or a hub id.
    Without `weights`: the architecture from config.json alone, on the meta device (no memory)."""

    def build(where: str, subfolder: str | None) -> torch.nn.Module:
        if weights:
            return cls.from_pretrained(where, subfolder=subfolder, torch_dtype=dtype)
        with torch.device("meta"):
            return cls.from_config(cls.load_config(where, subfolder=subfolder))

    path = Path(location).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"autoencoder location {location!r} is a file; expected a folder with config.json")
        subfolder = "vae" if (path / "vae" / "config.json").is_file() and not (path / "config.json").is_file() else None
        try:
            return build(str(path), subfolder)
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot load {cls.__name__} from {location!r}: {exc}".splitlines()[0]) from exc
    # A hub id: the VAE of a full pipeline repo lives in its "vae" subfolder.
    try:
        return build(location, "vae")
    except (OSError, ValueError):
        try:
            return build(location, None)
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot load {cls.__name__} from {location!r}: {exc}".splitlines()[0]) from exc


def load_autoencoder(
    spec: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    tiling: bool = True,
) -> PixelAutoencoder | DiffusersAutoencoder:
    """Build the autoencoder a spec names: "pixel[:s=S,t=T,scale=K]", "wan:<loc>", "cogvideox:<loc>", "kl:<loc>".

    <loc> is a local folder (a VAE folder, or a diffusers pipeline folder with a "vae" subfolder)
    or a hub id. diffusers is imported only here, so `model/` imports with torch alone.
    On `device="meta"` a VAE is built from its config without reading weights: its factors and
    latent geometry are right, it cannot encode (what checking requests needs, e.g. a server's ingress).
    """
    kind, location = parse_autoencoder_spec(spec)
    if kind == "pixel":
        return _pixel_from_options(spec, location)

    from diffusers import AutoencoderKL, AutoencoderKLCogVideoX, AutoencoderKLWan

    weights = torch.device(device).type != "meta"
    match kind:
        case "wan":
            vae = _load_vae(AutoencoderKLWan, location, dtype, weights)
            cfg = vae.config
            # Factors follow the architecture, not the scale_factor_* config fields, which keep
            # their defaults (4, 8) in configs that change the number of down blocks.
            temporal_factor = 2 ** sum(cfg.temperal_downsample)
            spatial_factor = 2 ** len(cfg.temperal_downsample) * (cfg.patch_size or 1)
            if cfg.latents_mean is None or len(cfg.latents_mean) != cfg.z_dim:
                raise ValueError(f"Wan VAE at {location!r} has no latents_mean/std for its {cfg.z_dim} channels")
            mean, std = torch.tensor(cfg.latents_mean), torch.tensor(cfg.latents_std)
        case "cogvideox":
            vae = _load_vae(AutoencoderKLCogVideoX, location, dtype, weights)
            cfg = vae.config
            num_down = len(cfg.block_out_channels) - 1
            # The encoder compresses time in its first log2(ratio) down blocks only.
            temporal_factor = 2 ** min(int(cfg.temporal_compression_ratio).bit_length() - 1, num_down)
            spatial_factor = 2**num_down
            mean, std = _scale_shift_stats(cfg.latent_channels, cfg.scaling_factor, cfg.shift_factor)
        case "kl":
            vae = _load_vae(AutoencoderKL, location, dtype, weights)
            cfg = vae.config
            temporal_factor = 1
            spatial_factor = 2 ** (len(cfg.block_out_channels) - 1)
            mean, std = _scale_shift_stats(cfg.latent_channels, cfg.scaling_factor, cfg.shift_factor)
    if tiling:
        vae.enable_tiling()
        vae.enable_slicing()
    if weights:
        vae = vae.to(device)
    logger.info(
        "loaded %s autoencoder %r: %d latent channels, factors t=%d s=%d",
        kind, spec, mean.numel(), temporal_factor, spatial_factor,
    )
    return DiffusersAutoencoder(
        vae,
        kind=kind,
        spec=spec,
        latent_mean=mean,
        latent_std=std,
        temporal_factor=temporal_factor,
        spatial_factor=spatial_factor,
    )


def _scale_shift_stats(channels: int, scaling_factor: float, shift_factor: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' `(z - shift) * scale` as per-channel (mean, std) = (shift, 1 / scale)."""
    mean = torch.full((channels,), float(shift_factor or 0.0))
    std = torch.full((channels,), 1.0 / float(scaling_factor))
    return mean, std


def min_valid_frames(autoencoder: Autoencoder, num_frames: int) -> int:
    """The smallest clip length >= num_frames that the autoencoder accepts (for trimming after decode)."""
    num_latent = 1
    while True:
        frames = autoencoder.pixel_frames(num_latent)
        if frames >= num_frames:
            try:
                autoencoder.check_frames(frames)
                return frames
            except ValueError:
                pass
        num_latent += 1
