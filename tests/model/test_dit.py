"""The diffusion transformer at toy size: shapes, patching, RoPE, conditioning inputs, bf16, sizes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.dit import (
    DIT_PRESETS,
    DiT,
    DiTConfig,
    apply_rope,
    count_params,
    dit_config,
    flops_per_token,
    patchify,
    rope_frequencies,
    unpatchify,
)

TEXT_DIM = 24


def toy_model(patch_size=(1, 2, 2), in_channels=4, seed=0) -> DiT:
    """A 2-block DiT whose zero-initialised (adaLN-Zero) weights are perturbed, so outputs depend on
    every input: a freshly initialised DiT predicts exactly 0 by design."""
    torch.manual_seed(seed)
    cfg = DiTConfig(
        in_channels=in_channels, text_dim=TEXT_DIM, hidden_size=48, depth=2, num_heads=2,
        patch_size=patch_size, max_text_tokens=16,
    )  # fmt: skip
    model = DiT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def toy_inputs(B=2, C=4, T=4, H=8, W=8, L=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, T, H, W, generator=g)
    t = torch.rand(B, generator=g)
    text = torch.randn(B, L, TEXT_DIM, generator=g)
    text_mask = torch.ones(B, L, dtype=torch.bool)
    return x, t, text, text_mask


@pytest.mark.parametrize("patch_size", [(1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 4, 2)])
def test_patchify_unpatchify_roundtrip(patch_size):
    x = torch.randn(2, 3, 4, 8, 12)
    tokens = patchify(x, patch_size)
    pt, ph, pw = patch_size
    grid = (4 // pt, 8 // ph, 12 // pw)
    assert tokens.shape == (2, grid[0] * grid[1] * grid[2], 3 * pt * ph * pw)
    assert torch.equal(unpatchify(tokens, grid, patch_size), x)


def test_patchify_token_holds_one_spacetime_patch():
    x = torch.arange(1 * 2 * 2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 2, 4, 4)
    tokens = patchify(x, (1, 2, 2))  # grid (2, 2, 2)
    # Token 3 = (t=0, h=1, w=1): rows 2-3, cols 2-3 of frame 0, both channels.
    expected = x[0, :, 0, 2:4, 2:4].permute(1, 2, 0).reshape(-1)
    assert torch.equal(tokens[0, 3], expected)


def test_patchify_rejects_indivisible_size():
    with pytest.raises(ValueError, match=r"\(3, 8, 8\)"):
        patchify(torch.randn(1, 2, 3, 8, 8), (2, 2, 2))


@pytest.mark.parametrize(
    "patch_size,shape",
    [
        ((1, 2, 2), (1, 8, 8)),  # a single latent frame (image)
        ((1, 2, 2), (5, 6, 10)),  # landscape, odd duration
        ((1, 2, 2), (3, 12, 4)),  # portrait
        ((2, 2, 2), (4, 8, 6)),  # temporal patches
        ((1, 1, 1), (2, 4, 4)),
    ],
)
def test_forward_shapes_across_sizes(patch_size, shape):
    model = toy_model(patch_size)
    T, H, W = shape
    x, t, text, text_mask = toy_inputs(T=T, H=H, W=W)
    with torch.no_grad():
        out = model(x, t, text, text_mask)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


def test_fresh_model_predicts_zero_and_still_learns():
    model = DiT(DiTConfig(in_channels=4, text_dim=TEXT_DIM, hidden_size=48, depth=2, num_heads=2))
    x, t, text, text_mask = toy_inputs()
    out = model(x, t, text, text_mask)
    assert torch.count_nonzero(out) == 0  # adaLN-Zero: every block is the identity, final layer is zero
    out.sub(x).pow(2).mean().backward()
    assert model.final_layer.linear.weight.grad.abs().sum() > 0


def test_rope_scores_depend_only_on_offset():
    head_dim, grid = 12, (3, 5, 7)
    cos, sin = rope_frequencies(grid, head_dim, 10000.0)
    N = grid[0] * grid[1] * grid[2]
    q = torch.randn(head_dim).expand(1, 1, N, head_dim)
    k = torch.randn(head_dim).expand(1, 1, N, head_dim)
    qr, kr = apply_rope(q, cos, sin)[0, 0], apply_rope(k, cos, sin)[0, 0]

    def idx(t, h, w):
        return (t * grid[1] + h) * grid[2] + w

    offset = (1, 2, 3)
    scores = [
        qr[idx(t, h, w)] @ kr[idx(t + offset[0], h + offset[1], w + offset[2])]
        for t, h, w in [(0, 0, 0), (1, 2, 3), (0, 1, 2), (1, 0, 1)]
    ]
    torch.testing.assert_close(torch.stack(scores), scores[0].expand(4), rtol=1e-4, atol=1e-5)
    # and it does depend on the offset
    assert not torch.isclose(qr[idx(0, 0, 0)] @ kr[idx(0, 0, 1)], qr[idx(0, 0, 0)] @ kr[idx(0, 0, 2)])


def test_rope_tables_extend_to_unseen_sizes():
    # A larger grid's table restricted to a smaller grid's positions equals the smaller grid's table:
    # positions are absolute indices, nothing is fitted to a size, so unseen sizes need nothing new.
    small = rope_frequencies((2, 3, 4), 32, 10000.0)
    large = rope_frequencies((9, 30, 40), 32, 10000.0)
    idx = torch.tensor([(t * 30 + h) * 40 + w for t in range(2) for h in range(3) for w in range(4)])
    torch.testing.assert_close(large[0][idx], small[0])
    torch.testing.assert_close(large[1][idx], small[1])


def test_padded_text_tokens_are_ignored():
    model = toy_model()
    x, t, text, text_mask = toy_inputs(L=6)
    text_mask[:, 4:] = False
    other = text.clone()
    other[:, 4:] = 100.0 * torch.randn_like(other[:, 4:])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, text, text_mask), model(x, t, other, text_mask))
        # ...but the real tokens matter
        changed = text.clone()
        changed[:, 0] += 1.0
        assert not torch.allclose(model(x, t, text, text_mask), model(x, t, changed, text_mask))


def test_conditioning_frames_take_timestep_zero():
    model = toy_model()
    x, t, text, text_mask = toy_inputs(T=3)
    all_clean = torch.ones(2, 3, dtype=torch.bool)
    with torch.no_grad():
        # Every frame conditioning: t is irrelevant (all frames sit at t = 0).
        a = model(x, torch.tensor([0.9, 0.2]), text, text_mask, all_clean)
        b = model(x, torch.tensor([0.1, 0.6]), text, text_mask, all_clean)
        torch.testing.assert_close(a, b)
        # Marking a frame as conditioning changes the prediction (the model can tell).
        first = torch.tensor([[True, False, False]] * 2)
        assert not torch.allclose(model(x, t, text, text_mask), model(x, t, text, text_mask, first))


def test_null_text_is_learned_and_sized():
    model = toy_model()
    text, mask = model.null_text(3, 5)
    assert text.shape == (3, 5, TEXT_DIM) and mask.shape == (3, 5) and mask.all()
    assert text.requires_grad
    x, t, _, _ = toy_inputs(B=3)
    model(x, t, text, mask).pow(2).mean().backward()
    assert model.null_text_embedding.grad[:5].abs().sum() > 0
    assert model.null_text_embedding.grad[5:].abs().sum() == 0
    with pytest.raises(ValueError, match="num_tokens=17"):
        model.null_text(1, 17)


def test_bf16_autocast_close_to_fp32():
    model = toy_model()
    x, t, text, text_mask = toy_inputs()
    with torch.no_grad():
        ref = model(x, t, text, text_mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x, t, text, text_mask)
    assert low.dtype == x.dtype
    # bf16 keeps 8 mantissa bits (~0.4% per op); over 2 blocks the error stays within a few percent.
    rel = (low - ref).norm() / ref.norm()
    assert rel < 0.03, rel


def test_forward_rejects_bad_inputs():
    model = toy_model()
    x, t, text, text_mask = toy_inputs()
    with pytest.raises(ValueError, match="5 channels"):
        model(torch.randn(2, 5, 4, 8, 8), t, text, text_mask)
    with pytest.raises(ValueError, match=r"\(4, 7, 8\)"):
        model(torch.randn(2, 4, 4, 7, 8), t, text, text_mask)
    with pytest.raises(ValueError, match="text_dim=24"):
        model(x, t, torch.randn(2, 5, 10), text_mask)
    with pytest.raises(ValueError, match="hidden_size=50"):
        DiTConfig(in_channels=4, text_dim=8, hidden_size=50, num_heads=4)
    with pytest.raises(ValueError, match="'huge'"):
        dit_config("huge", 4, 8)


def test_preset_param_counts_on_meta_device():
    counts = {name: count_params(name, in_channels=16, text_dim=4096) for name in DIT_PRESETS}
    assert counts["tiny"] < 5e6
    # Named sizes within 10% of their name (the 7b lands at 7.14e9 with a T5-XXL text projection).
    for name, target in [("1b", 1e9), ("3b", 3e9), ("7b", 7e9)]:
        assert abs(counts[name] - target) / target < 0.10, (name, counts[name])
    sizes = [counts[n] for n in ("tiny", "small", "base", "1b", "3b", "7b")]
    assert sizes == sorted(sizes)
    # The meta count equals a real build's.
    real = DiT(dit_config("tiny", 16, 4096))
    assert counts["tiny"] == sum(p.numel() for p in real.parameters())


def test_flops_per_token_matches_six_n_plus_attention():
    cfg = dit_config("base", 16, 4096)
    params = count_params("base", 16, 4096)
    short = flops_per_token(cfg, num_tokens=64, num_text_tokens=0)
    # For short sequences it is ~6 x params (the text-side weights, the null table and embeddings aside).
    assert 0.8 * 6 * params < short < 1.05 * 6 * params
    # The attention term grows linearly with the sequence: 12 * depth * D per extra token.
    grow = flops_per_token(cfg, 2064, 0) - flops_per_token(cfg, 64, 0)
    assert grow == pytest.approx(12 * cfg.depth * cfg.hidden_size * 2000)


def test_model_core_imports_with_torch_alone():
    # model/ ships inside the MLflow pyfunc and runs on inference hosts without the training stack.
    code = (
        "import sys; import model.dit, model.rectified_flow, model.conditioning; "
        "bad = [m for m in ('ray', 'deepspeed', 'mlflow', 'pydantic') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
