"""The generation pipeline: a request (prompt, mode, inputs, length, size) -> uint8 video frames.

Every mode is text-to-video with some latent frames held clean (model/conditioning.py):

    text             prompt only
    image            the image is the first frame
    extend           the output starts with the last frames of `video` and continues it
    extend-backward  the output ends with the first frames of `video` and leads into it
    connect          the output starts with the end of `video` and ends with the start of `video2`
    edit             the first frames of `video`, noised to `strength` and denoised towards the prompt

Outputs always contain their anchor frames, so `video + output[overlap:]` is the extended video.

Any length: a request for more frames than the bundle was trained on (`seconds`) is generated in
overlapping windows of the trained length, in latent space. Each window holds clean every latent
frame it shares with what is already generated (at least `overlap` frames of the previous window),
so it continues the motion instead of starting over; the whole latent is decoded once at the end and
trimmed to the exact frame count. The noise is drawn once from the seed, frame by frame, so the
result is deterministic and a longer request starts with exactly the first window of a shorter one.
With a causal VAE (Wan, CogVideoX) a later window starts on an ordinary latent frame, while training
clips start on the single-frame "image" latent; windows still share their frames, but continuity is
weaker than with the pixel autoencoder, and extend-backward anchors align only approximately.

The loop is written out in `generate`; the denoising itself is `rectified_flow.sample`, stepped
inside one tqdm bar over all windows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from model.autoencoders import min_valid_frames
from model.bundle import Bundle, load_bundle
from model.card import MODE_INPUTS, card_from_bundle_config
from model.conditioning import spec_for_mode
from model.rectified_flow import sample
from model.video_io import from_model, read_image, read_video, to_model

logger = logging.getLogger(__name__)

# How long a request may be, and how large, is the bundle's card's to say (model/card.py).
MAX_STEPS = 1000
# Classifier-free guidance saturates well below this; larger is a typo (or inf, which would give NaNs).
MAX_GUIDANCE = 100.0


@dataclass
class GenerationRequest:
    """One video to generate. None means the bundle's default (trained size/length, sampling defaults)."""

    prompt: str = ""
    mode: str = "text"  # text | image | extend | extend-backward | connect | edit
    image: str | Path | None = None  # mode image: the first frame
    video: str | Path | None = None  # extend / extend-backward / connect (first clip) / edit
    video2: str | Path | None = None  # connect: the clip to lead into
    num_frames: int | None = None  # one window: at most the trained length, a length the autoencoder produces
    seconds: float | None = None  # any duration: overlapped windows, trimmed to round(seconds * fps) frames
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int = 0
    strength: float = 0.6  # edit: 0 returns the input, 1 ignores it
    overlap_frames: int | None = None  # pixel frames taken from inputs and shared between windows
    # Run a mode the card says was never trained (e.g. image on a text-only model) instead of
    # refusing it; the result's metadata["warnings"] says so.
    allow_untrained_mode: bool = False


@dataclass
class GeneratedVideo:
    frames: torch.Tensor  # (T, H, W, 3) uint8
    fps: float
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class GenerationPlan:
    """A validated request with every default resolved, in pixel and latent units."""

    mode: str
    prompt: str
    width: int
    height: int
    num_frames: int  # exact output length
    num_latent_frames: int  # the whole latent; decodes to >= num_frames, trimmed after decoding
    window_latent_frames: int  # latent frames per denoising window (the trained length)
    overlap_latent_frames: int  # k: latent frames taken from each input and shared between windows
    steps: int
    guidance: float
    seed: int
    strength: float
    image: Path | None
    video: Path | None
    video2: Path | None
    # What this request asks that training never showed the model (model/card.py); it runs anyway.
    # Always present in GeneratedVideo.metadata, possibly empty.
    warnings: list[str] = field(default_factory=list)

    @property
    def trim_start(self) -> bool:
        """extend-backward is anchored at its end, so extra decoded frames come off the start."""
        return self.mode == "extend-backward"


def plan_windows(known: torch.Tensor, window: int, overlap: int, forward: bool = True) -> list[tuple[int, int]]:
    """Latent frame ranges [start, end) to denoise, in order, until no frame of `known` (T,) is unknown.

    Each window includes the first (forward) or last (backward) unknown frame plus `overlap` frames
    before (after) it, so it always generates something and always sees what it continues. The
    last window is pulled back to keep the full length rather than shrinking.
    """
    known = known.clone()
    total = known.numel()
    if total <= window:  # one window: nothing to overlap
        return [] if bool(known.all()) else [(0, total)]
    if not 0 <= overlap < window:
        raise ValueError(f"overlap {overlap} must be in [0, window {window})")
    windows = []
    while not bool(known.all()):
        unknown = (~known).nonzero().flatten()
        if forward:
            start = max(0, min(int(unknown[0]) - overlap, total - window))
            end = min(start + window, total)
        else:
            end = min(total, max(int(unknown[-1]) + 1 + overlap, window))
            start = max(0, end - window)
        windows.append((start, end))
        known[start:end] = True
    return windows


class VideoPipeline:
    """Generates videos from a loaded bundle (model/bundle.py); plain single-device PyTorch."""

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle
        self.dit = bundle.dit
        self.autoencoder = bundle.autoencoder
        self.text_encoder = bundle.text_encoder
        config = bundle.config
        self.fps = config.fps
        self.window_frames = config.num_frames
        self.default_size = (config.width, config.height)
        self.generation = config.generation  # steps, guidance and the timestep shift training used
        self.card = card_from_bundle_config(config)  # what it was trained for; what a request may ask
        param = next(self.dit.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.patch_size = tuple(self.dit.config.patch_size)
        self.window_latent_frames = self.autoencoder.latent_frames(self.window_frames)
        if self.window_latent_frames % self.patch_size[0]:
            raise ValueError(
                f"bundle {str(bundle.path)!r}: {self.window_frames} frames = {self.window_latent_frames} latent frames, "
                f"not divisible by the temporal patch {self.patch_size[0]}"
            )

    # -- validation ---------------------------------------------------------------------------

    def check_request(self, request: GenerationRequest) -> GenerationPlan:
        """Resolve defaults and validate everything that can be checked without decoding inputs.
        The bundle's card (model/card.py) checks first: the mode, size, length, pixels x frames budget
        and the inputs' headers; then what the autoencoder and DiT need. Raises ValueError, one line
        naming the field."""
        ae, card = self.autoencoder, self.card
        mode = request.mode
        warnings = card.check_request(request)
        paths = self._check_inputs(request, mode)
        if not isinstance(request.prompt, str):
            raise ValueError(f"prompt must be a string, got {type(request.prompt).__name__}")
        if mode == "text" and not request.prompt.strip():
            raise ValueError("an empty prompt needs an image or video to condition on (mode text)")

        width = request.width if request.width is not None else self.default_size[0]
        height = request.height if request.height is not None else self.default_size[1]
        cell_h, cell_w = ae.spatial_factor * self.patch_size[1], ae.spatial_factor * self.patch_size[2]
        if width < 1 or height < 1 or width % cell_w or height % cell_h:
            raise ValueError(
                f"size {width}x{height} must be positive multiples of {cell_w}x{cell_h} "
                f"(autoencoder factor {ae.spatial_factor} x DiT patch {self.patch_size[2]}x{self.patch_size[1]})"
            )

        num_frames, num_latent = self._check_length(request)
        window = min(self.window_latent_frames, num_latent)
        # A quarter of a window: enough motion context while 3/4 of each window is new; and no more
        # frames than training ever held clean at one end.
        most_held = window if card.max_k is None else card.max_k
        k = self._overlap_latent_frames(request, default=max(1, min(window // 4, most_held)))
        self._check_mode_fits(mode, num_frames, num_latent, k)

        steps = request.steps if request.steps is not None else self.generation.steps
        guidance = request.guidance if request.guidance is not None else self.generation.guidance
        if not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
            raise ValueError(f"steps {steps!r} must be an integer in [1, {MAX_STEPS}]")
        if not 0 <= guidance <= MAX_GUIDANCE:  # also refuses NaN
            raise ValueError(f"guidance {guidance!r} must be >= 0 and at most {MAX_GUIDANCE:g}")
        if not 0.0 <= request.strength <= 1.0:
            raise ValueError(f"strength {request.strength!r} must be in [0, 1]")
        if not isinstance(request.seed, int) or not 0 <= request.seed < 2**63:
            raise ValueError(f"seed {request.seed!r} must be an integer in [0, 2^63)")
        return GenerationPlan(
            mode=mode, prompt=request.prompt, width=width, height=height,
            num_frames=num_frames, num_latent_frames=num_latent,
            window_latent_frames=window, overlap_latent_frames=k,
            steps=steps, guidance=float(guidance), seed=request.seed, strength=float(request.strength),
            **paths,
            warnings=warnings + card.sampling_warnings(mode, float(guidance), k, num_latent > self.window_latent_frames),
        )  # fmt: skip

    def _check_inputs(self, request: GenerationRequest, mode: str) -> dict[str, Path | None]:
        """The input files a mode needs, present (the card has checked their headers), and no others."""
        paths: dict[str, Path | None] = {}
        for name in ("image", "video", "video2"):
            value = getattr(request, name)
            if name in MODE_INPUTS[mode]:
                if value is None or str(value) == "":
                    raise ValueError(f"mode {mode!r} needs {name} (a file)")
                path = Path(value).expanduser()
                if not path.is_file():
                    raise ValueError(f"{name} file not found: {str(path)!r}")
                paths[name] = path
            elif value is not None:
                raise ValueError(f"mode {mode!r} takes no {name} (got {str(value)!r}); inputs it uses: {MODE_INPUTS[mode] or 'none'}")
            else:
                paths[name] = None
        return paths

    def _check_length(self, request: GenerationRequest) -> tuple[int, int]:
        """(exact output frames, latent frames to generate). The card has checked the range of either."""
        ae = self.autoencoder
        if request.seconds is not None:
            num_frames = max(1, round(request.seconds * self.fps))
        else:
            num_frames = request.num_frames if request.num_frames is not None else self.window_frames
            ae.check_frames(num_frames)
            if ae.latent_frames(num_frames) % self.patch_size[0]:
                raise ValueError(
                    f"num_frames {num_frames} gives {ae.latent_frames(num_frames)} latent frames, "
                    f"not a multiple of the DiT's temporal patch {self.patch_size[0]}"
                )
        # Smallest latent the autoencoder decodes to >= num_frames, which the DiT can patch
        # (a window shorter than the trained one must be a multiple of the temporal patch).
        padded = min_valid_frames(ae, num_frames)
        while True:
            num_latent = ae.latent_frames(padded)
            if num_latent >= self.window_latent_frames or num_latent % self.patch_size[0] == 0:
                return num_frames, num_latent
            padded = min_valid_frames(ae, padded + 1)

    def _overlap_latent_frames(self, request: GenerationRequest, default: int) -> int:
        """k latent frames covering request.overlap_frames, or `default`."""
        ae, window = self.autoencoder, self.window_latent_frames
        if request.overlap_frames is None:
            return default
        if request.overlap_frames < 1:
            raise ValueError(f"overlap_frames {request.overlap_frames!r} must be >= 1")
        k = 1
        while ae.pixel_frames(k) < request.overlap_frames:
            k += 1
        if k >= window:
            raise ValueError(
                f"overlap_frames {request.overlap_frames} leaves nothing to generate in a window of "
                f"{ae.pixel_frames(window)} frames"
            )
        return k

    def _check_mode_fits(self, mode: str, num_frames: int, num_latent: int, k: int) -> None:
        ae = self.autoencoder
        anchors = {"image": 1, "extend": k, "extend-backward": k, "connect": 2 * k}.get(mode, 0)
        if anchors and num_latent <= anchors:
            raise ValueError(
                f"mode {mode!r} holds {ae.pixel_frames(anchors)} frames from its inputs, so it needs more than "
                f"{ae.pixel_frames(anchors)} frames; got {num_frames}"
            )
        if mode == "connect" and ae.pixel_frames(num_latent) != num_frames:
            # Both ends are anchored, so there is nowhere to trim extra decoded frames from.
            raise ValueError(
                f"mode 'connect' needs a frame count the autoencoder produces exactly; {num_frames} is not "
                f"(nearest above: {ae.pixel_frames(num_latent)})"
            )

    # -- generation ---------------------------------------------------------------------------

    def _encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 (T, H, W, 3) -> latent (1, C, t, h, w) in the DiT's dtype."""
        return self.autoencoder.encode(to_model(frames).to(self.device)).to(self.dtype)

    def _sources(self, plan: GenerationPlan) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """The encoded anchors (conditioning.ConditioningSpec sources) and, for edit, the init latent."""
        ae, size, k = self.autoencoder, (plan.width, plan.height), plan.overlap_latent_frames
        anchor_frames = ae.pixel_frames(k)
        match plan.mode:
            case "text":
                return [], None
            case "image":
                image = read_image(plan.image, size=size)  # (H, W, 3)
                # Repeated to the frames one latent frame holds (1 for causal VAEs and the default pixel AE).
                return [self._encode_frames(image.unsqueeze(0).expand(ae.pixel_frames(1), -1, -1, -1))], None
            case "extend" | "extend-backward" | "connect":
                # Only the frames next to the join are read into memory, however long the video.
                held = {"last_frames": anchor_frames} if plan.mode != "extend-backward" else {"num_frames": anchor_frames}
                sources = [self._encode_frames(read_video(plan.video, fps=self.fps, size=size, **held))]
                if plan.mode == "connect":
                    video2 = read_video(plan.video2, fps=self.fps, num_frames=anchor_frames, size=size)
                    sources.append(self._encode_frames(video2))
                return sources, None
            case "edit":
                video = read_video(plan.video, fps=self.fps, num_frames=plan.num_frames, size=size)
                # Pad to the decodable length by holding the last frame; the padding is trimmed after decoding.
                padded = ae.pixel_frames(plan.num_latent_frames)
                video = torch.cat([video, video[-1:].expand(padded - plan.num_frames, -1, -1, -1)])
                init = self._encode_frames(video)
                return [init], init
        raise AssertionError(plan.mode)  # check_request admits only MODES

    @torch.no_grad()
    def generate(self, request: GenerationRequest, on_step: Callable[[int, int], None] | None = None) -> GeneratedVideo:
        """`on_step(done, total)` is called after every denoising step of every window; an exception it
        raises stops generation there (serving cancels and times jobs out this way, within one step)."""
        plan = self.check_request(request)
        ae, dit = self.autoencoder, self.dit
        T = plan.num_latent_frames
        h, w = plan.height // ae.spatial_factor, plan.width // ae.spatial_factor

        text, text_mask = self.text_encoder.encode([plan.prompt])  # (1, L, Dt), (1, L)
        text, text_mask = text.to(self.device, self.dtype), text_mask.to(self.device)

        sources, init = self._sources(plan)
        spec = spec_for_mode(plan.mode, T, plan.overlap_latent_frames, start_t=plan.strength)
        latents = torch.zeros(1, ae.latent_channels, T, h, w, device=self.device, dtype=self.dtype)
        known = torch.zeros(T, dtype=torch.bool)
        if spec.frames:
            latents, cond_mask = spec.build(sources, T)  # anchors in place, (1, C, T, h, w), (1, T)
            known = cond_mask[0].cpu()

        # Noise for the whole latent from a CPU generator, so a seed gives the same video on any device.
        # Drawn frame-major: latent frame t gets the same noise whatever the total length, so a longer
        # request with the same seed starts with exactly the video of a shorter one (one window).
        generator = torch.Generator().manual_seed(plan.seed)
        noise = torch.randn(T, 1, ae.latent_channels, h, w, generator=generator, dtype=torch.float32)  # (T, 1, C, h, w)
        noise = noise.permute(1, 2, 0, 3, 4).to(self.device, self.dtype)  # (1, C, T, h, w)

        windows = plan_windows(known, plan.window_latent_frames, plan.overlap_latent_frames, forward=not plan.trim_start)
        from tqdm.auto import tqdm  # lazy: model/ imports with torch alone

        total_steps, done = len(windows) * plan.steps, 0

        def step_done(step: int, steps: int) -> None:
            nonlocal done
            done += 1
            bar.update(1)
            if on_step is not None:
                on_step(done, total_steps)

        with tqdm(total=total_steps, desc="generating", unit="step") as bar:
            for start, end in windows:
                window_mask = known[start:end].to(self.device)[None]  # (1, t)
                held = bool(window_mask.any())
                latents[:, :, start:end] = sample(
                    dit,
                    noise[:, :, start:end],
                    text,
                    text_mask,
                    steps=plan.steps,
                    guidance=plan.guidance,
                    shift=self.generation.shift,
                    cond_latents=latents[:, :, start:end] if held else None,
                    cond_mask=window_mask if held else None,
                    start_t=spec.start_t,
                    init_latents=init[:, :, start:end] if init is not None else None,
                    progress=step_done,
                )
                known[start:end] = True

        video = ae.decode(latents)  # (1, 3, T', H, W)
        frames = from_model(video)  # (T', H, W, 3) uint8
        frames = frames[-plan.num_frames :] if plan.trim_start else frames[: plan.num_frames]
        metadata = {
            **{key: value for key, value in asdict(plan).items() if key not in ("image", "video", "video2")},
            "fps": self.fps,
            "windows": windows,
            "anchor_frames": self._anchor_ranges(plan),
            "bundle": str(self.bundle.path),
            "autoencoder": ae.spec,
            "text_encoder": self.text_encoder.spec,
        }
        logger.info(
            "generated %d frames %dx%d (%s, %d window(s), seed %d)",
            plan.num_frames, plan.width, plan.height, plan.mode, len(windows), plan.seed,
        )
        return GeneratedVideo(frames=frames, fps=self.fps, metadata=metadata)

    def _anchor_ranges(self, plan: GenerationPlan) -> list[tuple[int, int]]:
        """Output frame ranges [start, end) copied from the inputs (exact with a lossless autoencoder)."""
        held = self.autoencoder.pixel_frames(plan.overlap_latent_frames)
        F = plan.num_frames
        match plan.mode:
            case "image":
                return [(0, self.autoencoder.pixel_frames(1))]
            case "extend":
                return [(0, held)]
            case "extend-backward":
                return [(F - held, F)]
            case "connect":
                return [(0, held), (F - held, F)]
        return []


def load_pipeline(
    bundle_dir: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> VideoPipeline:
    """A VideoPipeline over the bundle in `bundle_dir`: what the generate command and the pyfunc
    build. `device` defaults to cuda when there is one; `dtype` to the dtype the weights were saved in."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return VideoPipeline(load_bundle(bundle_dir, device=device, dtype=dtype))
