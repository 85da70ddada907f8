"""model/autoencoders.py: the lossless pixel AE and real diffusers VAEs at toy size.

No model hub here, so each diffusers VAE is built from a tiny random config, saved with
`save_pretrained` and loaded back through `load_autoencoder` (the same code that loads a
downloaded Wan / CogVideoX / SD VAE folder).
"""

from __future__ import annotations

import json

import pytest
import torch

from model.autoencoders import DiffusersAutoencoder, PixelAutoencoder, load_autoencoder, min_valid_frames


@pytest.mark.parametrize(
    "spec, shape",
    [
        ("pixel", (2, 3, 5, 32, 32)),
        ("pixel:s=2,t=1", (1, 3, 3, 6, 10)),
        ("pixel:s=1,t=2", (1, 3, 4, 5, 7)),
        ("pixel:s=8,t=4", (3, 3, 8, 16, 24)),
    ],
)
def test_pixel_autoencoder_is_exactly_lossless(spec, shape):
    ae = load_autoencoder(spec)
    video = torch.rand(shape) * 2 - 1
    latent = ae.encode(video)
    b, _, t, h, w = shape
    assert latent.shape == (b, ae.latent_channels, t // ae.temporal_factor, h // ae.spatial_factor, w // ae.spatial_factor)
    assert ae.latent_channels == 3 * ae.temporal_factor * ae.spatial_factor**2
    assert torch.equal(ae.decode(latent), video)
    assert ae.spec == spec
    assert ae.scale == 1.0


@pytest.mark.parametrize("scale", [0.5, 2.0, 4.0, 8.0])
def test_pixel_scale_is_exactly_invertible_and_in_the_spec(scale):
    spec = f"pixel:s=2,t=1,scale={scale:g}"
    ae = load_autoencoder(spec)
    assert (ae.spatial_factor, ae.temporal_factor, ae.scale, ae.spec) == (2, 1, scale, spec)
    video = torch.rand(2, 3, 4, 8, 12) * 2 - 1
    latent = ae.encode(video)
    # The scale multiplies the unscaled latent, so the DiT sees a `scale` times wider spread.
    assert torch.equal(latent, load_autoencoder("pixel:s=2,t=1").encode(video) * scale)
    assert latent.std().item() == pytest.approx(video.std().item() * scale, rel=1e-5)
    assert torch.equal(ae.decode(latent), video)
    # Uint8 frames (what training decodes) come back bit for bit, too.
    frames = torch.randint(0, 256, (1, 3, 2, 4, 4)).float() / 127.5 - 1
    assert torch.equal(ae.decode(ae.encode(frames)), frames)
    # A bundle stores only the spec: loading it again gives the same autoencoder.
    again = load_autoencoder(ae.spec)
    assert again.scale == scale and torch.equal(again.decode(latent), video)


def test_pixel_spec_round_trips_when_built_directly():
    assert PixelAutoencoder(spatial_factor=2, temporal_factor=1).spec == "pixel:s=2,t=1"
    ae = PixelAutoencoder(spatial_factor=2, temporal_factor=2, scale=4)
    assert ae.spec == "pixel:s=2,t=2,scale=4"
    rebuilt = load_autoencoder(ae.spec)
    assert (rebuilt.spatial_factor, rebuilt.temporal_factor, rebuilt.scale) == (2, 2, 4.0)
    video = torch.rand(1, 3, 4, 4, 4) * 2 - 1
    assert torch.equal(rebuilt.encode(video), ae.encode(video))
    assert load_autoencoder("pixel:scale=1").scale == 1.0


@pytest.mark.parametrize("value", ["3", "0", "-2", "abc", "inf", "nan", ""])
def test_pixel_scale_must_be_a_power_of_two(value):
    with pytest.raises(ValueError, match=f"bad pixel autoencoder option 'scale={value}' in 'pixel:s=2,scale={value}'"):
        load_autoencoder(f"pixel:s=2,scale={value}")


def test_pixel_scale_refused_when_built_directly():
    with pytest.raises(ValueError, match="scale=3 must be a power of two"):
        PixelAutoencoder(spatial_factor=2, scale=3)


def test_pixel_default_factors_and_locality():
    ae = load_autoencoder("pixel")
    assert (ae.spatial_factor, ae.temporal_factor, ae.latent_channels) == (4, 1, 48)
    video = torch.zeros(1, 3, 1, 32, 32)
    video[0, :, 0, 4:8, 8:12] = 1.0  # one 4x4 block = latent cell (1, 2)
    latent = ae.encode(video)
    assert latent.shape == (1, 48, 1, 8, 8)
    nonzero = latent[0].abs().sum(dim=(0, 1)).nonzero().tolist()
    assert nonzero == [[1, 2]]


def test_pixel_checks_name_the_bad_value():
    ae = PixelAutoencoder(spatial_factor=4, temporal_factor=2)
    with pytest.raises(ValueError, match="num_frames 5 must be a positive multiple of 2"):
        ae.check_frames(5)
    with pytest.raises(ValueError, match="size 30x32 is not divisible by 4"):
        ae.check_size(32, 30)
    with pytest.raises(ValueError, match="size 30x32"):
        ae.encode(torch.zeros(1, 3, 2, 32, 30))
    with pytest.raises(ValueError, match="bad pixel autoencoder option 'q=3'"):
        load_autoencoder("pixel:q=3")
    with pytest.raises(ValueError, match="unknown autoencoder 'vqgan:x'"):
        load_autoencoder("vqgan:x")
    with pytest.raises(ValueError, match="needs a location"):
        load_autoencoder("wan")
    with pytest.raises(ValueError, match="cannot load AutoencoderKLWan from"):
        load_autoencoder("wan:nobody/no-such-model")


@pytest.fixture(scope="module")
def tiny_vaes(tmp_path_factory):
    """Save one tiny random VAE of each kind; Wan inside a full-pipeline layout (vae/ subfolder)."""
    from diffusers import AutoencoderKL, AutoencoderKLCogVideoX, AutoencoderKLWan

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("vaes")
    wan = AutoencoderKLWan(
        base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[False, True],
        latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[2.0, 1.5, 1.0, 0.5],
    )
    wan.save_pretrained(root / "wan_pipeline" / "vae")
    (root / "wan_pipeline" / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    cog = AutoencoderKLCogVideoX(
        block_out_channels=(8, 8, 16), down_block_types=("CogVideoXDownBlock3D",) * 3,
        up_block_types=("CogVideoXUpBlock3D",) * 3, latent_channels=4, layers_per_block=1,
        norm_num_groups=4, temporal_compression_ratio=4, scaling_factor=0.7,
    )
    cog.save_pretrained(root / "cog")
    kl = AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, layers_per_block=1,
        norm_num_groups=4, scaling_factor=0.5, shift_factor=0.1,
    )
    kl.save_pretrained(root / "kl")
    return {"wan": (root / "wan_pipeline", wan), "cogvideox": (root / "cog", cog), "kl": (root / "kl", kl)}


@pytest.mark.parametrize(
    "kind, frames, factors",
    [("wan", 5, (2, 4)), ("cogvideox", 9, (4, 4)), ("kl", 3, (1, 2))],
)
def test_diffusers_vae_loads_and_round_trips(tiny_vaes, kind, frames, factors):
    folder, reference = tiny_vaes[kind]
    ae = load_autoencoder(f"{kind}:{folder}")
    assert isinstance(ae, DiffusersAutoencoder)
    assert (ae.temporal_factor, ae.spatial_factor) == factors
    assert ae.latent_channels == 4 and ae.spec == f"{kind}:{folder}"
    video = torch.rand(2, 3, frames, 16, 16) * 2 - 1
    latent = ae.encode(video)
    t = ae.latent_frames(frames)
    assert latent.shape == (2, 4, t, 16 // factors[1], 16 // factors[1])
    assert ae.pixel_frames(t) == frames
    decoded = ae.decode(latent)
    assert decoded.shape == video.shape
    assert decoded.abs().max() <= 1.0

    # The normalisation is the VAE's own: undo it and compare with the raw posterior mode.
    with torch.no_grad():
        if kind == "kl":
            raw = reference.encode(video[0].transpose(0, 1)).latent_dist.mode()  # (T, C, h, w)
            raw = raw.transpose(0, 1).unsqueeze(0)
        else:
            raw = reference.encode(video[:1]).latent_dist.mode()
    restored = latent[:1] * ae.latent_std + ae.latent_mean
    torch.testing.assert_close(restored, raw, atol=1e-4, rtol=1e-4)


def test_causal_vae_frame_rules(tiny_vaes):
    wan = load_autoencoder(f"wan:{tiny_vaes['wan'][0]}")
    cog = load_autoencoder(f"cogvideox:{tiny_vaes['cogvideox'][0]}")
    assert wan.latent_frames(1) == 1 and wan.latent_frames(9) == 5
    with pytest.raises(ValueError, match="num_frames 4 must be 1 \\+ a multiple of 2"):
        wan.check_frames(4)
    # CogVideoX: 13 frames = 4 latent frames would decode to 16 frames, so it is refused.
    with pytest.raises(ValueError, match="num_frames 13 must be 1 \\+ a multiple of 8"):
        cog.check_frames(13)
    cog.check_frames(17)
    assert min_valid_frames(cog, 10) == 17 and min_valid_frames(wan, 10) == 11
    assert min_valid_frames(load_autoencoder("pixel:s=4,t=2"), 7) == 8
    with pytest.raises(ValueError, match="size 14x16 is not divisible by 4"):
        cog.encode(torch.zeros(1, 3, 1, 16, 14))
