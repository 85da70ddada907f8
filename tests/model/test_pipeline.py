"""model/pipeline.py end to end on a real bundle: a tiny random DiT + the lossless pixel autoencoder +
the offline MiniLM, saved with save_bundle and loaded with load_bundle.

With the pixel autoencoder every conditioning frame must come back bit-for-bit, so the tests
compare exactly. Inputs are real files (PNG via PIL, MP4 via PyAV); reference frames are read
back with the same reader the pipeline uses, because H.264 is lossy.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from model.bundle import load_bundle, load_bundle_geometry, save_bundle
from model.dit import DiT, dit_config
from model.pipeline import GenerationRequest, VideoPipeline, plan_windows
from model.mp4 import write_mp4
from model.video_io import read_image, read_video

FPS = 8
WINDOW = 8  # trained clip length (frames) of the test bundle
SIZE = 32


def _random_dit(depth: int):
    """A small DiT for the pixel AE (48 channels) and MiniLM (384): (config, model)."""
    torch.manual_seed(0)
    cfg = dit_config("tiny", in_channels=48, text_dim=384, depth=depth, hidden_size=64, num_heads=4, max_text_tokens=32)
    model = DiT(cfg)
    with torch.no_grad():
        # A freshly initialised DiT predicts exactly 0 (adaLN-Zero); random weights make it a real function.
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return cfg, model


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> VideoPipeline:
    cfg, model = _random_dit(depth=2)
    path = save_bundle(
        tmp_path_factory.mktemp("bundle"), model, cfg, autoencoder="pixel", text_encoder="minilm",
        fps=FPS, num_frames=WINDOW, width=SIZE, height=SIZE, extra={"generation": {"steps": 2, "guidance": 1.0}},  # guidance 1: one forward per step
    )
    return VideoPipeline(load_bundle(path))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """An image and two 12-frame clips (different content) as files, and the frames the pipeline will see."""
    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(folder / "first.png")
    clips = {}
    for name, offset in (("a.mp4", 0), ("b.mp4", 120)):
        frames = np.zeros((12, SIZE, SIZE, 3), np.uint8)
        for t in range(12):
            frames[t, :, :, 0] = (offset + 10 * t) % 256
            frames[t, 8:20, t : t + 10, 1] = 255
        write_mp4(frames, FPS, folder / name)
        clips[name] = read_video(folder / name, fps=FPS, size=(SIZE, SIZE))
    return folder, clips


def _generate(pipeline, **fields):
    return pipeline.generate(GenerationRequest(prompt="a red square moving right", **fields))


def test_text_to_video_shape_and_determinism(pipeline):
    out = _generate(pipeline, seed=3, guidance=3.0)  # classifier-free guidance: batched text + null text
    assert out.frames.dtype == torch.uint8 and tuple(out.frames.shape) == (WINDOW, SIZE, SIZE, 3)
    assert out.fps == FPS and out.metadata["steps"] == 2 and out.metadata["guidance"] == 3.0
    assert out.metadata["warnings"] == []  # a bundle without a card (model/card.py): nothing is untrained
    again = _generate(pipeline, seed=3, guidance=3.0)
    assert torch.equal(out.frames, again.frames)
    other = _generate(pipeline, seed=4, guidance=3.0)
    assert not torch.equal(out.frames, other.frames)
    small = _generate(pipeline, num_frames=3, width=16, height=24, seed=3, guidance=1.0)
    assert tuple(small.frames.shape) == (3, 24, 16, 3)


def test_image_frame_is_reproduced_exactly(pipeline, inputs):
    folder, _ = inputs
    out = _generate(pipeline, mode="image", image=folder / "first.png", num_frames=6)
    image = read_image(folder / "first.png", size=(SIZE, SIZE))
    assert torch.equal(out.frames[0], image)
    assert out.metadata["anchor_frames"] == [(0, 1)] and out.metadata["warnings"] == []
    # The rest is generated, not copied.
    assert not torch.equal(out.frames[1], image)


def test_extend_and_extend_backward_hold_the_input_frames(pipeline, inputs):
    folder, clips = inputs
    clip = clips["a.mp4"]
    fwd = _generate(pipeline, mode="extend", video=folder / "a.mp4", overlap_frames=3)
    assert fwd.metadata["anchor_frames"] == [(0, 3)]
    assert torch.equal(fwd.frames[:3], clip[-3:])
    assert not torch.equal(fwd.frames[3], clip[-1])

    back = _generate(pipeline, mode="extend-backward", video=folder / "a.mp4", overlap_frames=2, num_frames=6)
    assert back.frames.shape[0] == 6
    assert torch.equal(back.frames[-2:], clip[:2])


def test_connect_holds_both_ends(pipeline, inputs):
    folder, clips = inputs
    out = _generate(pipeline, mode="connect", video=folder / "a.mp4", video2=folder / "b.mp4", overlap_frames=2)
    assert torch.equal(out.frames[:2], clips["a.mp4"][-2:])
    assert torch.equal(out.frames[-2:], clips["b.mp4"][:2])
    assert out.metadata["anchor_frames"] == [(0, 2), (WINDOW - 2, WINDOW)]


def test_edit_strength_zero_returns_the_input(pipeline, inputs):
    folder, clips = inputs
    out = _generate(pipeline, mode="edit", video=folder / "a.mp4", strength=0.0, num_frames=WINDOW)
    assert torch.equal(out.frames, clips["a.mp4"][:WINDOW])
    edited = _generate(pipeline, mode="edit", video=folder / "a.mp4", strength=0.8, num_frames=WINDOW)
    assert not torch.equal(edited.frames, clips["a.mp4"][:WINDOW])
    # Longer than a window: the edit runs in windows, still exact at strength 0.
    long = _generate(pipeline, mode="edit", video=folder / "a.mp4", strength=0.0, seconds=11 / FPS)
    assert torch.equal(long.frames, clips["a.mp4"][:11])
    assert len(long.metadata["windows"]) == 2


@pytest.mark.parametrize("seconds", [0.125, 2.3, 4.0])
def test_long_video_length_is_exact(pipeline, seconds):
    out = _generate(pipeline, seconds=seconds)
    assert out.frames.shape[0] == round(seconds * FPS)
    windows = out.metadata["windows"]
    # Windows cover the whole latent, each at most the trained length, each overlapping the one before.
    assert windows[0][0] == 0 and windows[-1][1] == out.metadata["num_latent_frames"]
    assert all(end - start <= WINDOW for start, end in windows)
    assert all(s2 < e1 for (_, e1), (s2, _) in zip(windows, windows[1:]))


def test_plan_windows_forward_backward_and_anchored_ends():
    known = torch.zeros(20, dtype=torch.bool)
    assert plan_windows(known, 8, 2) == [(0, 8), (6, 14), (12, 20)]
    assert plan_windows(known, 8, 2, forward=False) == [(12, 20), (6, 14), (0, 8)]
    # connect: both ends anchored; the last window must reach the anchor at the end.
    known[:2] = True
    known[-2:] = True
    windows = plan_windows(known, 8, 2)
    assert windows[0] == (0, 8) and windows[-1][1] == 20
    assert plan_windows(torch.zeros(5, dtype=torch.bool), 8, 2) == [(0, 5)]
    with pytest.raises(ValueError, match="overlap 8 must be in"):
        plan_windows(known, 8, 8)  # 20 frames need several windows


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(mode="dance"), "unknown mode 'dance'"),
        (dict(mode="image"), "mode 'image' needs image"),
        (dict(mode="image", image="/nope/missing.png"), "image file not found: '/nope/missing.png'"),
        (dict(image="x.png"), "mode 'text' takes no image"),
        (dict(width=30), "size 30x32 must be positive multiples of 8x8"),
        (dict(height=0), "size 32x0 must be positive"),
        (dict(num_frames=9), "num_frames 9 must be in \\[1, 8\\]"),
        (dict(num_frames=0), "num_frames 0 must be in"),
        (dict(num_frames=4, seconds=1.0), "not both"),
        (dict(seconds=-1.0), "seconds -1.0 must be a number > 0"),
        (dict(steps=0), "steps 0 must be an integer"),
        (dict(guidance=-1.0), "guidance -1.0 must be >= 0"),
        (dict(strength=1.5), "strength 1.5 must be in"),
        (dict(seed=-3), "seed -3 must be"),
        (dict(overlap_frames=8), "overlap_frames 8 leaves nothing"),
        (dict(prompt="  "), "empty prompt"),
    ],
)
def test_bad_requests_name_the_value(pipeline, geometry, fields, message):
    request = GenerationRequest(**{"prompt": "a cat", **fields})
    for checker in (pipeline, geometry):  # the weight-less checker of a server's ingress refuses alike
        with pytest.raises(ValueError, match=message):
            checker.check_request(request)


@pytest.fixture(scope="module")
def geometry(pipeline) -> VideoPipeline:
    """The same bundle without weights: DiT and autoencoder on the meta device, no text encoder."""
    return VideoPipeline(load_bundle_geometry(pipeline.bundle.path))


def test_geometry_plans_like_the_loaded_model(pipeline, geometry, inputs):
    folder, _ = inputs
    assert geometry.device.type == "meta" and all(p.device.type == "meta" for p in geometry.dit.parameters())
    assert (geometry.card, geometry.window_latent_frames, geometry.patch_size) == (pipeline.card, pipeline.window_latent_frames, pipeline.patch_size)
    requests = [
        GenerationRequest(prompt="a cat"),
        GenerationRequest(prompt="a cat", seconds=2.3, steps=3, guidance=2.0, seed=7, width=64, height=32),
        GenerationRequest(prompt="a cat", mode="extend", video=folder / "a.mp4", overlap_frames=2, seconds=3.0),
        GenerationRequest(prompt="", mode="image", image=folder / "first.png"),
    ]
    for request in requests:
        assert geometry.check_request(request) == pipeline.check_request(request)


def test_bad_input_files_fail_at_generation(pipeline, inputs, tmp_path):
    folder, _ = inputs
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="image: not a readable image \\(cannot read image header"):
        _generate(pipeline, mode="image", image=tmp_path / "bad.png")
    with pytest.raises(ValueError, match="connect.*holds 4 frames.*needs more than 4 frames; got 4"):
        _generate(pipeline, mode="connect", video=folder / "a.mp4", video2=folder / "b.mp4", overlap_frames=2, num_frames=4)
    with pytest.raises(ValueError, match="has 12 frames, 16 needed"):
        _generate(pipeline, mode="edit", video=folder / "a.mp4", strength=0.5, seconds=2.0)


def _consecutive_diffs(frames: torch.Tensor) -> torch.Tensor:
    """(T-1,) mean abs difference between consecutive frames, in uint8 levels."""
    return frames.float().diff(dim=0).abs().mean(dim=(1, 2, 3))


def test_long_video_windows_join_without_a_jump(pipeline):
    out = _generate(pipeline, seconds=4.0, seed=11, overlap_frames=2)
    frames, windows = out.frames, out.metadata["windows"]
    assert len(windows) >= 4
    diffs = _consecutive_diffs(frames)  # diffs[i] = |frame i+1 - frame i|
    # Seams: the first frame each later window generates against the last frame it holds.
    seams = [start_prev_end - 1 for (_, start_prev_end), _ in zip(windows, windows[1:])]
    within = [i for i in range(len(diffs)) if i not in seams]
    seam_change = diffs[seams].mean()
    typical_change = diffs[within].median()
    # A seam changes the picture as much as the model does from frame to frame: not more (a jump), and
    # not less (a repeated or blank frame at the join). 10% slack: only a few seams are averaged.
    # A random-init model makes frame-level noise, so this cannot tell a window that ignored its held
    # frames; test_later_windows_depend_on_what_came_before does.
    assert 0.9 * typical_change <= seam_change <= 1.1 * typical_change, (seam_change, typical_change)


def test_longer_request_starts_with_the_shorter_video(pipeline):
    """Windows never rewrite what earlier windows produced: with the same seed, the first window of a
    long video is exactly the one-window video."""
    one = _generate(pipeline, seed=5)
    long = _generate(pipeline, seed=5, seconds=3.0)
    assert torch.equal(long.frames[:WINDOW], one.frames)


def test_long_extension_keeps_its_anchor_and_later_windows_depend_on_it(pipeline, inputs):
    """Conditioning propagates through the windows: a different anchor changes frames generated two
    windows later (a window that ignored its held frames would make them equal)."""
    folder, clips = inputs
    a = _generate(pipeline, mode="extend", video=folder / "a.mp4", overlap_frames=2, seconds=3.0, seed=1)
    assert a.frames.shape[0] == 24 and torch.equal(a.frames[:2], clips["a.mp4"][-2:])
    b = _generate(pipeline, mode="extend", video=folder / "b.mp4", overlap_frames=2, seconds=3.0, seed=1)
    start_third = a.metadata["windows"][2][0]
    assert not torch.equal(a.frames[start_third + 2 :], b.frames[start_third + 2 :])

    back = _generate(pipeline, mode="extend-backward", video=folder / "a.mp4", overlap_frames=2, seconds=3.0)
    assert back.frames.shape[0] == 24 and torch.equal(back.frames[-2:], clips["a.mp4"][:2])
    assert back.metadata["windows"][0][1] == back.metadata["num_latent_frames"]  # generated backwards


def test_causal_vae_bundle_lengths_are_exact(tmp_path, inputs):
    """The same pipeline over a (tiny, random) Wan VAE: frame counts of the form 1 + 2k, latents
    decoded once and trimmed to any requested length."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    vae = AutoencoderKLWan(
        base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[False, True],
        latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
    )  # temporal factor 2, spatial factor 4
    vae.save_pretrained(tmp_path / "wan")
    cfg = dit_config("tiny", in_channels=4, text_dim=384, depth=1, hidden_size=32, num_heads=2, max_text_tokens=8)
    path = save_bundle(tmp_path / "bundle", DiT(cfg), cfg, autoencoder=f"wan:{tmp_path / 'wan'}",
                       text_encoder="minilm", fps=4, num_frames=5, width=16, height=16,
                       extra={"generation": {"steps": 1, "guidance": 1.0}})
    wan_pipeline = VideoPipeline(load_bundle(path))
    assert wan_pipeline.window_latent_frames == 3
    out = wan_pipeline.generate(GenerationRequest(prompt="a cat", seconds=2.0))
    assert tuple(out.frames.shape) == (8, 16, 16, 3)  # 9 decoded frames trimmed to 8
    assert out.metadata["num_latent_frames"] == 5 and out.metadata["windows"] == [(0, 3), (2, 5)]
    folder, _ = inputs
    image = wan_pipeline.generate(GenerationRequest(prompt="a cat", mode="image", image=folder / "first.png"))
    assert image.frames.shape[0] == 5
    with pytest.raises(ValueError, match="num_frames 4 must be 1 \\+ a multiple of 2"):
        wan_pipeline.check_request(GenerationRequest(prompt="a cat", num_frames=4))
    # Without weights (a server's ingress): the Wan VAE built from its config on the meta device
    # plans the same and refuses the same.
    geometry = VideoPipeline(load_bundle_geometry(path))
    assert geometry.device.type == "meta" and geometry.autoencoder.device.type == "meta" and geometry.text_encoder is None
    request = GenerationRequest(prompt="a cat", seconds=2.0)
    assert geometry.check_request(request) == wan_pipeline.check_request(request)
    with pytest.raises(ValueError, match="num_frames 4 must be 1 \\+ a multiple of 2"):
        geometry.check_request(GenerationRequest(prompt="a cat", num_frames=4))


def test_bundle_recorded_shift_is_used_for_sampling(tmp_path):
    """A bundle trained with `train.timestep_shift` records it as generation.shift; sampling must use
    it (a model trained on one noise schedule and sampled on another gives noise: the demo regression)."""
    from model.rectified_flow import sample
    from model.video_io import from_model

    cfg, model = _random_dit(depth=1)
    common = dict(autoencoder="pixel", text_encoder="minilm", fps=FPS, num_frames=4, width=16, height=16)
    shifted = VideoPipeline(load_bundle(save_bundle(
        tmp_path / "shifted", model, cfg, **common, extra={"generation": {"steps": 3, "guidance": 1.0, "shift": 16.0}}
    )))  # fmt: skip
    default = VideoPipeline(load_bundle(save_bundle(
        tmp_path / "default", model, cfg, **common, extra={"generation": {"steps": 3, "guidance": 1.0}}
    )))  # fmt: skip
    assert shifted.generation.shift == 16.0 and default.generation.shift is None
    request = GenerationRequest(prompt="a red square", seed=5)
    out = shifted.generate(request).frames

    # The same request by hand through the sampler with shift 16 (noise drawn as the pipeline documents).
    noise = torch.randn(4, 1, 48, 4, 4, generator=torch.Generator().manual_seed(5)).permute(1, 2, 0, 3, 4)
    text, mask = shifted.text_encoder.encode(["a red square"])
    latents = sample(shifted.dit, noise, text, mask, steps=3, guidance=1.0, shift=16.0)
    assert torch.equal(out, from_model(shifted.autoencoder.decode(latents)))
    assert not torch.equal(out, default.generate(request).frames)
