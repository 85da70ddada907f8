"""One description of "which latent frames are given" for training, generation and serving.

The model has no modes. Image-to-video, extension, connection and editing are all text-to-video with
some latent frames held clean (`cond_mask`, see model/dit.py) or, for editing, with sampling started
from a noised input (`start_t`, see model/rectified_flow.py). A `ConditioningSpec` says which
generated latent frame is copied from which frame of which input; `spec_for_mode` builds the spec for
each named mode, `ConditioningSpec.build` gathers the latents for the sampler, and
`sample_condition_mask` draws the same patterns at random for training, so every mode the generator
offers is a pattern the model was trained on:

    mode             frames held clean (T latent frames, k given)     training pattern
    text             none                                             none
    image            0 <- image                                       first_frame
    extend           0..k-1 <- last k of the video                    first_k
    extend-backward  T-k..T-1 <- first k of the video                 last_k
    connect          0..k-1 <- end of video A, T-k..T-1 <- start of B  both_ends
    edit             none; start from the video noised to start_t     (plain noise path)
    (keyframes)      any subset                                       random

Source frame indices are latent frames of each source's own latent (negative counts from its end).
Imports torch only, and only once a mask is built: configs that name ConditioningProbs (every
`reelforge` command's) load without it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

MODES = ("text", "image", "extend", "extend-backward", "connect", "edit")


@dataclass(frozen=True)
class FrameCondition:
    latent_index: int  # latent frame of the generated clip that is held clean (0-based)
    source: int  # which input supplies it: 0 = the image or (first) video, 1 = the second video (connect)
    source_frame: int  # latent frame of that input's latent; negative counts from its end (-1 = last)


@dataclass(frozen=True)
class ConditioningSpec:
    frames: tuple[FrameCondition, ...] = ()
    # < 1: SDEdit; source 0 (a video as long as the output) is noised to this t and denoised from there.
    start_t: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.start_t <= 1.0:
            raise ValueError(f"start_t={self.start_t} must be in [0, 1]")
        indices = [f.latent_index for f in self.frames]
        if len(set(indices)) != len(indices):
            raise ValueError(f"latent frames {sorted(indices)} are conditioned more than once")
        for f in self.frames:
            if f.latent_index < 0 or f.source < 0:
                raise ValueError(f"{f} has a negative latent_index or source")

    @property
    def num_sources(self) -> int:
        """How many inputs `build` needs (0 for plain text-to-video)."""
        needed = max((f.source + 1 for f in self.frames), default=0)
        return max(needed, 1) if self.start_t < 1.0 else needed

    def mask(self, num_latent_frames: int) -> torch.Tensor:
        """(T,) bool, True where the latent frame is held clean."""
        import torch

        mask = torch.zeros(num_latent_frames, dtype=torch.bool)
        for f in self.frames:
            if f.latent_index >= num_latent_frames:
                raise ValueError(f"latent_index={f.latent_index} is outside a clip of {num_latent_frames} frames")
            mask[f.latent_index] = True
        if num_latent_frames > 0 and bool(mask.all()):
            raise ValueError(f"all {num_latent_frames} latent frames are conditioning: nothing left to generate")
        return mask

    def build(self, sources: Sequence[torch.Tensor], num_latent_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather the held frames from the encoded inputs, each (B, C, T_s, H, W): returns cond_latents
        (B, C, T, H, W) (zeros where not held) and cond_mask (B, T) bool, as `sample` takes them."""
        if len(sources) < self.num_sources:
            raise ValueError(f"this conditioning needs {self.num_sources} input latents, got {len(sources)}")
        if not sources:
            raise ValueError("build needs at least one input latent to take the batch and frame size from")
        B, C, _, H, W = sources[0].shape
        for i, src in enumerate(sources):
            if src.dim() != 5 or (src.shape[0], src.shape[1], src.shape[3], src.shape[4]) != (B, C, H, W):
                raise ValueError(f"input {i} latent {tuple(src.shape)} does not match (B, C, *, H, W)={(B, C, H, W)}")
        mask = self.mask(num_latent_frames)
        cond_latents = sources[0].new_zeros(B, C, num_latent_frames, H, W)
        for f in self.frames:
            src = sources[f.source]
            if not -src.shape[2] <= f.source_frame < src.shape[2]:
                raise ValueError(
                    f"source_frame={f.source_frame} is outside input {f.source} with {src.shape[2]} latent frames"
                )
            cond_latents[:, :, f.latent_index] = src[:, :, f.source_frame]
        return cond_latents, mask.to(cond_latents.device).expand(B, -1)  # (B, C, T, H, W), (B, T)


def spec_for_mode(mode: str, num_latent_frames: int, k: int = 1, start_t: float = 0.6) -> ConditioningSpec:
    """The spec for a named mode (table in the module docstring). `k` is the number of latent frames
    taken from each given video (extend, extend-backward, connect); `start_t` is used by edit only."""
    T = num_latent_frames
    if T < 1:
        raise ValueError(f"num_latent_frames={T} must be >= 1")
    if mode in ("extend", "extend-backward", "connect"):
        ends = 2 if mode == "connect" else 1
        if k < 1 or ends * k >= T:
            raise ValueError(f"k={k} for mode {mode!r} must leave at least one of {T} latent frames to generate")
    match mode:
        case "text":
            frames = ()
        case "image":
            if T < 2:
                raise ValueError(f"mode 'image' needs at least 2 latent frames, got {T}")
            frames = (FrameCondition(0, 0, 0),)
        case "extend":
            frames = tuple(FrameCondition(i, 0, i - k) for i in range(k))
        case "extend-backward":
            frames = tuple(FrameCondition(T - k + i, 0, i) for i in range(k))
        case "connect":
            frames = tuple(FrameCondition(i, 0, i - k) for i in range(k))
            frames += tuple(FrameCondition(T - k + i, 1, i) for i in range(k))
        case "edit":
            return ConditioningSpec(start_t=start_t)
        case _:
            raise ValueError(f"unknown conditioning mode {mode!r}; choose one of {MODES}")
    return ConditioningSpec(frames=frames)


@dataclass(frozen=True)
class ConditioningProbs:
    """Per-sample probabilities of each training pattern; the rest (`none`) is plain text-to-video.
    Defaults keep 70% text-to-video, since that is the main task and the other patterns share its
    weights (they differ only in which frames are clean)."""

    first_frame: float = 0.10  # image-to-video
    first_k: float = 0.06  # extend forwards
    last_k: float = 0.04  # extend backwards
    both_ends: float = 0.05  # connect
    random: float = 0.05  # an arbitrary subset (keyframes, interpolation)
    max_k: int = 4  # k is uniform in [1, max_k], capped so a frame is always left to generate

    def __post_init__(self) -> None:
        for name in ("first_frame", "first_k", "last_k", "both_ends", "random"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"ConditioningProbs.{name}={value} must be in [0, 1]")
        if self.none < -1e-9:
            raise ValueError(f"conditioning probabilities sum to {1 - self.none:.4f} > 1")
        if self.max_k < 1:
            raise ValueError(f"ConditioningProbs.max_k={self.max_k} must be >= 1")

    @property
    def none(self) -> float:
        return 1.0 - (self.first_frame + self.first_k + self.last_k + self.both_ends + self.random)


def _randint(low: int, high: int, generator: torch.Generator | None) -> int:
    """Uniform int in [low, high] (inclusive)."""
    import torch

    return int(torch.randint(low, high + 1, (), generator=generator))


def sample_condition_mask(
    num_latent_frames: int, probs: ConditioningProbs, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(T,) bool: a random conditioning pattern for one training sample (CPU, data-loader side).

    At least one frame is always left to generate; with T = 1 that means no conditioning, and with
    T = 2 `both_ends` falls back to the first frame.
    """
    import torch

    T = num_latent_frames
    if T < 1:
        raise ValueError(f"num_latent_frames={T} must be >= 1")
    mask = torch.zeros(T, dtype=torch.bool)
    u = float(torch.rand((), generator=generator))
    if T == 1:
        return mask
    edges = (probs.first_frame, probs.first_k, probs.last_k, probs.both_ends, probs.random)
    choice, acc = "none", 0.0
    for name, p in zip(("first_frame", "first_k", "last_k", "both_ends", "random"), edges):
        acc += p
        if u < acc:
            choice = name
            break
    if choice == "both_ends" and T < 3:
        choice = "first_frame"
    match choice:
        case "first_frame":
            mask[0] = True
        case "first_k":
            mask[: _randint(1, min(probs.max_k, T - 1), generator)] = True
        case "last_k":
            mask[T - _randint(1, min(probs.max_k, T - 1), generator) :] = True
        case "both_ends":
            k = _randint(1, min(probs.max_k, (T - 1) // 2), generator)
            mask[:k] = True
            mask[T - k :] = True
        case "random":
            mask = torch.rand(T, generator=generator) < 0.5
            if bool(mask.all()):
                mask[_randint(0, T - 1, generator)] = False
    return mask


def sample_condition_masks(
    batch: int, num_latent_frames: int, probs: ConditioningProbs, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(B, T) bool: `sample_condition_mask` for each sample of a batch."""
    import torch

    return torch.stack([sample_condition_mask(num_latent_frames, probs, generator) for _ in range(batch)])
