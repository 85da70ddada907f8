"""The spacetime diffusion transformer (DiT), in reading order.

A video latent (B, C, T, H, W) is cut into spacetime patches (tokens), a stack of transformer blocks
predicts the rectified-flow velocity for every token, and the tokens are put back into a latent.
Read top to bottom: config and presets, patchify, rotary embedding, the pieces of a block, the block,
the model, then parameter and FLOP counting.

Design choices (the "why" is in docs/model.md, "Architecture"):
  * 3D rotary position embedding over (t, h, w), no learned absolute positions: one model serves every
    duration, resolution and aspect ratio, including sizes never seen in training.
  * Text enters through cross-attention (PixArt-alpha, Wan). Self-attention then runs over video tokens
    only, so RoPE covers exactly the spacetime grid, its cost is N^2 instead of (N + L)^2, and the text
    encoder (MiniLM, T5, CLIP: any L, any width) is swapped without touching the video stream. Joint
    attention (SD3/MMDiT) would need a second set of weights per block for the text stream, nearly
    doubling parameters for a stream that is 1-2% of the tokens in a video.
  * Timestep conditioning is adaLN-Zero with one shared modulation MLP and a learned per-block table
    (PixArt-alpha's "adaLN-single"): per-block adaLN MLPs would cost 6*D^2 per block, 27% of a 7B model,
    for no measurable quality gain in PixArt's ablation.
  * Clean conditioning frames (image-to-video, extend, connect) are told apart by a per-frame timestep:
    conditioning frames get t = 0, which is exactly what the flow path calls a clean frame
    (x_t = (1 - t) x0 + t noise = x0 at t = 0), so the model learns no new concept and needs no mode
    flag. The modulation is therefore per token-frame, (B, T', 6D). A 1-channel clean-frame mask is also
    concatenated to the input before patchify, so the distinction survives temporal patches (pt > 1)
    that mix a clean and a noisy latent frame.
  * QK-norm (RMSNorm over the head dim) keeps attention logits bounded in bf16 at large widths.
  * All attention goes through F.scaled_dot_product_attention (flash / memory-efficient kernels on GPU).

Single device only: no checkpointing, compile or placement here (training/ wraps `DiT.blocks`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class DiTConfig:
    in_channels: int  # latent channels C, from the autoencoder (16 for Wan 2.1, 48 for the 4x pixel space-to-depth)
    text_dim: int  # width Dt of the text encoder's token embeddings (384 MiniLM, 4096 T5-XXL)
    hidden_size: int = 128  # transformer width D
    depth: int = 4  # number of blocks
    num_heads: int = 4  # D / num_heads = head dim; keep it 64 or 128 for flash-attention kernels
    # (pt, ph, pw) latent cells per token; pt = 1 keeps one timestep per latent frame (exact conditioning)
    patch_size: tuple[int, int, int] = (1, 2, 2)
    mlp_ratio: float = 4.0  # MLP hidden width / D (GELU MLP as in DiT)
    # Longest text sequence accepted (and the length of the learned null-text table): 256 holds a dense
    # recaption (~200 words) and is MiniLM's limit; T5 prompts are truncated to it by the trainer.
    max_text_tokens: int = 256
    qk_norm: bool = True  # RMSNorm on queries and keys: bounded logits in bf16 at large D (ViT-22B, SD3)
    rope_theta: float = 10000.0  # RoPE base; positions are integer latent-grid indices along t, h, w
    frequency_embedding_size: int = 256  # sinusoidal timestep features before the timestep MLP (DiT)
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads != 0:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        head_dim = self.hidden_size // self.num_heads
        # RoPE rotates pairs of channels and splits the head dim over 3 axes (see rope_frequencies).
        if head_dim % 2 != 0 or head_dim < 6:
            raise ValueError(f"head dim {head_dim} (hidden_size/num_heads) must be even and >= 6 for 3D RoPE")
        self.patch_size = tuple(int(p) for p in self.patch_size)  # type: ignore[assignment]  # JSON gives lists
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"patch_size={self.patch_size} must be three positive ints (pt, ph, pw)")
        for name in ("in_channels", "text_dim", "depth", "max_text_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


# Architecture fields only: in_channels and text_dim come from the autoencoder and text encoder
# (see dit_config). Head dim is 32 for tiny (CPU tests), 64 for small/base, 128 from 1b up (the
# flash-attention sweet spot). Widths and depths follow DiT-S/B and the Wan/HunyuanVideo scaling ladder;
# parameter counts (checked by tests/model/test_dit.py) are in docs/model.md, "Presets".
DIT_PRESETS: dict[str, dict] = {
    "tiny": dict(hidden_size=192, depth=4, num_heads=6),  # 2.9M params (pixel AE + MiniLM): CPU tests, overfit check
    "small": dict(hidden_size=384, depth=12, num_heads=6),  # 30M, DiT-S width/depth
    "base": dict(hidden_size=768, depth=12, num_heads=12),  # 119M, DiT-B
    "1b": dict(hidden_size=1536, depth=28, num_heads=12),  # 1.08B
    "3b": dict(hidden_size=2560, depth=28, num_heads=20),  # 3.0B
    "7b": dict(hidden_size=4096, depth=26, num_heads=32),  # 7.13B with T5-XXL text (4096 wide)
}


def dit_config(preset: str, in_channels: int, text_dim: int, **overrides) -> DiTConfig:
    """The DiTConfig of a named preset for an autoencoder with `in_channels` latent channels and a text
    encoder of width `text_dim`; `overrides` replace preset fields (e.g. patch_size=(2, 2, 2))."""
    if preset not in DIT_PRESETS:
        raise ValueError(f"unknown DiT preset {preset!r}; choose one of {sorted(DIT_PRESETS)}")
    return DiTConfig(in_channels=in_channels, text_dim=text_dim, **{**DIT_PRESETS[preset], **overrides})


# ---------------------------------------------------------------------------------------------------
# Patches


def patchify(x: torch.Tensor, patch_size: tuple[int, int, int]) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, N, D_patch) with N = (T/pt)(H/ph)(W/pw) in (t, h, w) raster order and
    D_patch = C*pt*ph*pw ordered (pt, ph, pw, C)."""
    B, C, T, H, W = x.shape
    pt, ph, pw = patch_size
    if T % pt or H % ph or W % pw:
        raise ValueError(f"latent size (T, H, W)={(T, H, W)} is not divisible by patch_size={tuple(patch_size)}")
    x = x.reshape(B, C, T // pt, pt, H // ph, ph, W // pw, pw)  # (B, C, T', pt, H', ph, W', pw)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # (B, T', H', W', pt, ph, pw, C)
    return x.reshape(B, (T // pt) * (H // ph) * (W // pw), pt * ph * pw * C)  # (B, N, D_patch)


def unpatchify(x: torch.Tensor, grid: tuple[int, int, int], patch_size: tuple[int, int, int]) -> torch.Tensor:
    """(B, N, D_patch) -> (B, C, T, H, W); the inverse of patchify for a token grid (T', H', W')."""
    B, N, D_patch = x.shape
    Tg, Hg, Wg = grid
    pt, ph, pw = patch_size
    C = D_patch // (pt * ph * pw)
    if N != Tg * Hg * Wg or C * pt * ph * pw != D_patch:
        raise ValueError(f"tokens {tuple(x.shape)} do not match grid={tuple(grid)} and patch_size={tuple(patch_size)}")
    x = x.reshape(B, Tg, Hg, Wg, pt, ph, pw, C)  # (B, T', H', W', pt, ph, pw, C)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, C, T', pt, H', ph, W', pw)
    return x.reshape(B, C, Tg * pt, Hg * ph, Wg * pw)  # (B, C, T, H, W)


# ---------------------------------------------------------------------------------------------------
# 3D rotary position embedding


def rope_frequencies(
    grid: tuple[int, int, int], head_dim: int, theta: float, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables, each (N, head_dim/2) fp32, for the token grid (T', H', W') in raster order.

    The head dim is split over the three axes as in Wan 2.1: h and w get 2*(head_dim//6) channels
    each, t the rest (t gets the remainder because durations vary more than sizes). Each axis is a
    standard 1D RoPE over integer positions, so q.k depends only on the (dt, dh, dw) offset: any grid
    size works, including ones never seen in training.
    """
    axis_dims = (head_dim - 4 * (head_dim // 6), 2 * (head_dim // 6), 2 * (head_dim // 6))
    angles = []
    for size, dim in zip(grid, axis_dims):
        inv_freq = theta ** (-torch.arange(0, dim, 2, device=device, dtype=torch.float64) / dim)  # (dim/2,)
        pos = torch.arange(size, device=device, dtype=torch.float64)
        angles.append(torch.outer(pos, inv_freq))  # (size, dim/2)
    Tg, Hg, Wg = grid
    angle = torch.cat(
        [
            angles[0][:, None, None, :].expand(Tg, Hg, Wg, -1),
            angles[1][None, :, None, :].expand(Tg, Hg, Wg, -1),
            angles[2][None, None, :, :].expand(Tg, Hg, Wg, -1),
        ],
        dim=-1,
    ).reshape(Tg * Hg * Wg, head_dim // 2)  # (N, head_dim/2); float64 so large positions keep their phase
    return angle.cos().float(), angle.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs of x (B, heads, N, head_dim) by the position angles; computed in fp32."""
    pairs = x.float().unflatten(-1, (-1, 2))  # (B, heads, N, head_dim/2, 2)
    x0, x1 = pairs.unbind(-1)
    rotated = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)  # (B, heads, N, head_dim)


# ---------------------------------------------------------------------------------------------------
# Block pieces


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 (bf16 sums of squares lose precision at large widths)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).type_as(x)


def layer_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Affine-free LayerNorm in fp32 (adaLN supplies scale and shift)."""
    return F.layer_norm(x.float(), (x.shape[-1],), eps=eps).type_as(x)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (B, T', S, D) with shift/scale (B, T', 1, D): a per-token-frame affine (S tokens per frame)."""
    return x * (1 + scale) + shift


class Attention(nn.Module):
    """Multi-head attention with QK-norm: self-attention (with RoPE) when `context` is None, else
    cross-attention from x to context (no RoPE: text has no spacetime position)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float, cross: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.cross = cross
        if cross:
            self.q = nn.Linear(dim, dim)
            self.kv = nn.Linear(dim, 2 * dim)
        else:
            self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = RMSNorm(self.head_dim, eps) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim, eps) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, N, D = x.shape
        if self.cross:
            q = self.q(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, heads, N, hd)
            L = context.shape[1]
            kv = self.kv(context).view(B, L, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            k, v = kv.unbind(0)  # each (B, heads, L, hd)
        else:
            qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)  # each (B, heads, N, hd)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        # Boolean mask, True = attend; (B, 1, 1, L) broadcasts over heads and queries.
        attn_mask = context_mask[:, None, None, :] if context_mask is not None else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, heads, N, hd)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))  # (B, N, D)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> (..., D): sinusoidal features of 1000*t (DiT's integer-step scale, so the
    frequencies cover the range) followed by a 2-layer MLP."""

    def __init__(self, dim: int, frequency_embedding_size: int) -> None:
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_embedding_size // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = 1000.0 * t.float()[..., None] * freqs  # (..., half), fp32: bf16 would alias nearby t
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (..., frequency_embedding_size)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))  # (..., D)


class DiTBlock(nn.Module):
    """Self-attention (RoPE) -> cross-attention to text -> MLP, each pre-norm and residual.

    Self-attention and MLP are adaLN-Zero modulated per token-frame: `modulation` (B, T', 6, D) is the
    shared timestep projection, to which the block adds its own learned `scale_shift_table` (6, D).
    Cross-attention is not gated (as in PixArt-alpha); its output projection starts at zero instead.
    """

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        D = cfg.hidden_size
        self.eps = cfg.norm_eps
        self.attn = Attention(D, cfg.num_heads, cfg.qk_norm, cfg.norm_eps)
        self.cross_norm = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.cross_attn = Attention(D, cfg.num_heads, cfg.qk_norm, cfg.norm_eps, cross=True)
        self.mlp = MLP(D, int(D * cfg.mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.zeros(6, D))

    def forward(
        self,
        x: torch.Tensor,
        modulation: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        rope_cos: torch.Tensor,
        rope_sin: torch.Tensor,
    ) -> torch.Tensor:
        B, N, D = x.shape
        frames = modulation.shape[1]
        mod = (modulation + self.scale_shift_table).unsqueeze(2)  # (B, T', 1, 6, D)
        shift_sa, scale_sa, gate_sa, shift_mlp, scale_mlp, gate_mlp = mod.unbind(3)  # each (B, T', 1, D)

        h = modulate(layer_norm(x, self.eps).view(B, frames, -1, D), shift_sa, scale_sa)  # (B, T', S, D)
        h = self.attn(h.reshape(B, N, D), rope=(rope_cos, rope_sin))  # (B, N, D)
        x = x + (gate_sa * h.view(B, frames, -1, D)).reshape(B, N, D)

        x = x + self.cross_attn(self.cross_norm(x), context=text, context_mask=text_mask)

        h = modulate(layer_norm(x, self.eps).view(B, frames, -1, D), shift_mlp, scale_mlp)  # (B, T', S, D)
        h = self.mlp(h)
        return x + (gate_mlp * h).reshape(B, N, D)


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm then a linear map from D to one patch of velocity (D_patch)."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        pt, ph, pw = cfg.patch_size
        self.eps = cfg.norm_eps
        self.linear = nn.Linear(cfg.hidden_size, pt * ph * pw * cfg.in_channels)
        self.scale_shift_table = nn.Parameter(torch.zeros(2, cfg.hidden_size))

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        frames = t_emb.shape[1]
        shift, scale = (t_emb[:, :, None, :] + self.scale_shift_table).unsqueeze(2).unbind(3)  # each (B, T', 1, D)
        x = modulate(layer_norm(x, self.eps).view(B, frames, -1, D), shift, scale)  # (B, T', S, D)
        return self.linear(x.reshape(B, N, D))  # (B, N, D_patch)


# ---------------------------------------------------------------------------------------------------
# The model


class DiT(nn.Module):
    """Predicts the rectified-flow velocity (noise - x0) of a video latent, conditioned on the
    timestep, text tokens and optionally clean conditioning frames."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.config = cfg
        D = cfg.hidden_size
        pt, ph, pw = cfg.patch_size
        # +1 input channel: the clean-frame mask (see module docstring).
        self.patch_embed = nn.Linear(pt * ph * pw * (cfg.in_channels + 1), D)
        self.t_embedder = TimestepEmbedder(D, cfg.frequency_embedding_size)
        # adaLN-single: one projection of the timestep embedding to the 6 modulation vectors, shared by
        # all blocks; each block adds its own learned table.
        self.t_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))
        # Text tokens are projected to D once and shared by every block's cross-attention (PixArt-alpha).
        self.text_proj = nn.Sequential(
            nn.Linear(cfg.text_dim, D), nn.GELU(approximate="tanh"), nn.Linear(D, D)
        )
        # Learned "no prompt" sequence in text-encoder space, for classifier-free guidance: training
        # swaps captions for it (text dropout) and the sampler's unconditional branch uses it.
        self.null_text_embedding = nn.Parameter(torch.randn(cfg.max_text_tokens, cfg.text_dim) / cfg.text_dim**0.5)
        self.blocks = nn.ModuleList([DiTBlock(cfg) for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(cfg)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Xavier-uniform linears with zero bias (DiT), patch embedding like a linear layer, N(0, 0.02)
        timestep MLP. Zeroed so every block starts as the identity and the model predicts 0 (adaLN-Zero):
        the shared adaLN modulation projection, each block's scale/shift/gate table, the cross-attention
        output projections and the final layer."""

        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        nn.init.zeros_(self.t_modulation[1].weight)
        nn.init.zeros_(self.t_modulation[1].bias)
        for block in self.blocks:
            nn.init.zeros_(block.scale_shift_table)
            nn.init.zeros_(block.cross_attn.proj.weight)
            nn.init.zeros_(block.cross_attn.proj.bias)
        nn.init.zeros_(self.final_layer.scale_shift_table)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def null_text(self, batch_size: int, num_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The unconditional text input: (text (B, L, Dt), mask (B, L) all True) with L = num_tokens
        (default max_text_tokens), so it can be swapped in for, or batched with, an encoded prompt of
        length L."""
        L = self.config.max_text_tokens if num_tokens is None else num_tokens
        if not 1 <= L <= self.config.max_text_tokens:
            raise ValueError(f"num_tokens={L} must be in [1, max_text_tokens={self.config.max_text_tokens}]")
        text = self.null_text_embedding[:L].unsqueeze(0).expand(batch_size, -1, -1)  # (B, L, Dt)
        mask = torch.ones(batch_size, L, dtype=torch.bool, device=text.device)  # (B, L)
        return text, mask

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        cond_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, C, T, H, W) noisy latents; t (B,) in [0, 1], 1 = pure noise; text (B, L, Dt) and
        text_mask (B, L) bool, True = real token (each row needs at least one True); cond_mask (B, T)
        bool, True = that latent frame is a clean conditioning frame (its t is taken as 0).
        Returns the velocity (B, C, T, H, W) in x's dtype."""
        cfg = self.config
        B, C, T, H, W = x.shape
        pt, ph, pw = cfg.patch_size
        if C != cfg.in_channels:
            raise ValueError(f"latent has {C} channels, the model expects in_channels={cfg.in_channels}")
        if T % pt or H % ph or W % pw:
            raise ValueError(f"latent size (T, H, W)={(T, H, W)} is not divisible by patch_size={cfg.patch_size}")
        if text.shape[-1] != cfg.text_dim or text.shape[1] > cfg.max_text_tokens:
            raise ValueError(
                f"text {tuple(text.shape)} must be (B, L<={cfg.max_text_tokens}, text_dim={cfg.text_dim})"
            )
        grid = (T // pt, H // ph, W // pw)

        # Per-latent-frame timestep: clean conditioning frames sit at t = 0 on the flow path.
        t_frames = t.float()[:, None].expand(B, T)  # (B, T)
        if cond_mask is None:
            cond_mask = torch.zeros(B, T, dtype=torch.bool, device=x.device)
        t_frames = torch.where(cond_mask, 0.0, t_frames)
        # A token-frame covers pt latent frames; it takes the noisiest one's t (the mask channel below
        # keeps the exact per-latent-frame information).
        t_tokens = t_frames.view(B, grid[0], pt).amax(-1)  # (B, T')

        mask_channel = cond_mask.to(x.dtype)[:, None, :, None, None].expand(B, 1, T, H, W)  # (B, 1, T, H, W)
        h = self.patch_embed(patchify(torch.cat([x, mask_channel], dim=1), cfg.patch_size))  # (B, N, D)

        t_emb = self.t_embedder(t_tokens)  # (B, T', D)
        modulation = self.t_modulation(t_emb).unflatten(-1, (6, cfg.hidden_size))  # (B, T', 6, D)
        text_h = self.text_proj(text)  # (B, L, D)
        rope_cos, rope_sin = rope_frequencies(grid, cfg.head_dim, cfg.rope_theta, device=x.device)  # (N, hd/2)

        for block in self.blocks:
            h = block(h, modulation, text_h, text_mask, rope_cos, rope_sin)  # (B, N, D)
        h = self.final_layer(h, t_emb)  # (B, N, D_patch)
        return unpatchify(h, grid, cfg.patch_size).to(x.dtype)  # (B, C, T, H, W)


# ---------------------------------------------------------------------------------------------------
# Size accounting


def count_params(preset: str, in_channels: int, text_dim: int) -> int:
    """Parameter count of a preset, built on the meta device (no memory is allocated)."""
    with torch.device("meta"):
        model = DiT(dit_config(preset, in_channels, text_dim))
    return sum(p.numel() for p in model.parameters())


def flops_per_token(cfg: DiTConfig, num_tokens: int, num_text_tokens: int) -> float:
    """Training FLOPs (forward + backward = 3x forward) per video token, for MFU.

    6 * (weights every video token passes through) + the text-side weights amortised over the video
    tokens + the attention score/value matmuls: per block, 2*2*D*N (self) and 2*2*D*L (cross) forward
    FLOPs per token, times 3 for training. Norms, RoPE and softmax are ignored (<1%).
    """
    D, depth = cfg.hidden_size, cfg.depth
    pt, ph, pw = cfg.patch_size
    mlp_hidden = int(D * cfg.mlp_ratio)
    per_block = 3 * D * D + D * D + 2 * D * mlp_hidden + D * D + D * D  # qkv, proj, mlp, cross q, cross proj
    video_weights = depth * per_block + pt * ph * pw * (cfg.in_channels + 1) * D + D * pt * ph * pw * cfg.in_channels
    text_weights = cfg.text_dim * D + D * D + depth * 2 * D * D  # text projection and per-block cross k, v
    attention = depth * 4 * D * (num_tokens + num_text_tokens)
    return 6.0 * video_weights + 6.0 * text_weights * num_text_tokens / num_tokens + 3.0 * attention
