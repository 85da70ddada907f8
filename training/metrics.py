"""Training throughput over one logging interval: loss, clips/s, tokens/s per bucket, data wait, MFU.

Each rank counts into a `MetricsWindow` as it trains; at a log step `reduce` sums the counters
over ranks (one all-reduce plus one small all-gather) and turns them into the metrics the loop
logs. Times are per rank and averaged, so clips/s is the whole group's rate over wall time.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from model.dit import DiTConfig, flops_per_token

# Dense bf16 tensor-core peak per GPU (vendor datasheets, without sparsity), for the MFU estimate.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12}


class MetricsWindow:
    """Counters over one logging interval, reduced across ranks when logged."""

    def __init__(self) -> None:
        self.loss_sum: torch.Tensor | float = 0.0
        self.micro_steps = 0
        self.samples = 0
        self.skipped = 0  # bad or too-short clips the readers passed over
        self.steps = 0
        self.step_s = 0.0
        self.data_wait_s = 0.0
        self.eval_s = 0.0  # rank 0 sampling eval videos (other ranks wait for it in the next collective)
        self.tokens = 0  # DiT tokens (spacetime patches) trained on
        self.flops = 0.0  # model FLOPs of those tokens (flops_per_token: 6 x params + attention)
        self.bucket_tokens: dict[str, int] = {}  # "TxHxW" of the pixel clip -> tokens
        self.grad_norm: Any = None

    def count_tokens(
        self, frame_shape: Any, latent_shape: Any, dit_cfg: DiTConfig, num_text_tokens: int, batch: int
    ) -> None:
        """Account one micro-batch: frame_shape (T, H, W) names its bucket, latent_shape (T', H', W') its tokens."""
        pt, ph, pw = dit_cfg.patch_size
        num_tokens = (latent_shape[0] // pt) * (latent_shape[1] // ph) * (latent_shape[2] // pw)
        tokens = batch * num_tokens
        self.tokens += tokens
        self.flops += flops_per_token(dit_cfg, num_tokens, num_text_tokens) * tokens
        bucket = "x".join(str(int(d)) for d in frame_shape)
        self.bucket_tokens[bucket] = self.bucket_tokens.get(bucket, 0) + tokens

    def reduce(self, world_size: int, device: torch.device, peak_flops: float | None) -> dict[str, float]:
        local = torch.tensor(
            [float(self.loss_sum), self.micro_steps, self.samples, self.skipped, self.step_s, self.data_wait_s,
             self.tokens, self.flops],
            dtype=torch.float64,
        ).to(device)  # fmt: skip
        buckets: list[dict[str, int]] = [self.bucket_tokens]
        if dist.is_initialized():
            dist.all_reduce(local)  # sums over ranks
            # ranks train different buckets, so the key sets differ: gather the small dicts instead
            buckets = [{} for _ in range(world_size)]
            dist.all_gather_object(buckets, self.bucket_tokens)
        loss_sum, micro_steps, samples, skipped, step_s, data_wait_s, tokens, flops = local.tolist()
        step_s_per_rank = step_s / world_size
        wall_s = max(step_s_per_rank, 1e-9)
        metrics = {
            "loss": loss_sum / max(1, micro_steps),
            "clips_per_s": samples / wall_s,
            "tokens_per_s": tokens / wall_s,
            "step_s": step_s_per_rank / max(1, self.steps),
            "data_wait_fraction": data_wait_s / max(step_s, 1e-9),
            "skipped_clips": skipped,
            "eval_s": self.eval_s,
        }
        if self.grad_norm is not None:
            metrics["grad_norm"] = float(self.grad_norm)
        for bucket in sorted({key for rank_buckets in buckets for key in rank_buckets}):
            # per-bucket throughput over the window's wall time: how much each shape contributes
            metrics[f"bucket/{bucket}/tokens_per_s"] = sum(b.get(bucket, 0) for b in buckets) / wall_s
        if peak_flops:
            metrics["mfu"] = flops / wall_s / (peak_flops * world_size)
        return metrics


def peak_flops_per_device(device: torch.device) -> float | None:
    """The device's peak bf16 FLOP/s when it is a GPU we know; None (no MFU metric) on CPU or unknown GPUs."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


def sum_over_ranks(value: int, device: torch.device) -> int:
    total = torch.tensor([value], dtype=torch.int64, device=device)
    if dist.is_initialized():
        dist.all_reduce(total)
    return int(total.item())


def format_eta(seconds: float) -> str:
    """`3725.2` -> `"1:02:05"`."""
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
