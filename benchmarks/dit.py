"""Diffusion transformer throughput and sampler overhead.

    python benchmarks/dit.py [--presets tiny small] [--tokens 128 512 2048] [--device cpu|cuda]
                             [--dtype fp32|bf16] [--out benchmarks/results/dit.json]

1. Training step speed: forward + backward of `training_loss` (the real objective) per preset and
   sequence length, as video tokens/s and achieved TFLOP/s (flops_per_token: 6 x params + attention).
   Latents are 8 latent frames of a square grid, so N = 8 * (H/ph) * (W/pw).
2. Sampling overhead: a guided `sample` call, total time / time inside the transformer forwards - 1.
   Everything the sampler does besides the network (CFG mixing, Euler update, re-imposing conditioning
   frames, timestep bookkeeping) is in that fraction; target < 10%.

Prints a markdown table (with hardware, torch version and commit) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # runs as `python benchmarks/dit.py` as well as `python -m benchmarks.dit`

from model.dit import DiT, dit_config, flops_per_token  # noqa: E402
from model.rectified_flow import sample, training_loss  # noqa: E402

logger = logging.getLogger(__name__)

LATENT_CHANNELS = 16  # Wan 2.1 latent channels: the setting the presets are sized for
TEXT_DIM = 384  # MiniLM width (the default text encoder)
TEXT_TOKENS = 32
LATENT_FRAMES = 8


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def latent_shape(num_tokens: int, patch_size: tuple[int, int, int]) -> tuple[int, int, int]:
    """(T, H, W) of an 8-frame square latent with `num_tokens` tokens."""
    pt, ph, pw = patch_size
    side = math.isqrt(num_tokens * pt // LATENT_FRAMES)
    if LATENT_FRAMES // pt * side * side != num_tokens:
        raise ValueError(f"--tokens {num_tokens} is not {LATENT_FRAMES // pt} frames of a square token grid")
    return LATENT_FRAMES, side * ph, side * pw


def bench_train_step(
    preset: str, num_tokens: int, batch: int, iters: int, device: torch.device, dtype: torch.dtype
) -> dict:
    cfg = dit_config(preset, LATENT_CHANNELS, TEXT_DIM)
    model = DiT(cfg).to(device)
    T, H, W = latent_shape(num_tokens, cfg.patch_size)
    latents = torch.randn(batch, LATENT_CHANNELS, T, H, W, device=device)
    text = torch.randn(batch, TEXT_TOKENS, TEXT_DIM, device=device)
    text_mask = torch.ones(batch, TEXT_TOKENS, dtype=torch.bool, device=device)
    generator = torch.Generator(device).manual_seed(0)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss, _ = training_loss(model, latents, text, text_mask, None, generator)
        loss.backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up: allocator, kernels, autotuning
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    _sync(device)
    seconds = (time.perf_counter() - start) / iters
    tokens_per_s = batch * num_tokens / seconds
    return {
        "preset": preset,
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "tokens": num_tokens,
        "latent": f"{T}x{H}x{W}",
        "batch": batch,
        "step_s": seconds,
        "tokens_per_s": tokens_per_s,
        "tflops": tokens_per_s * flops_per_token(cfg, num_tokens, TEXT_TOKENS) / 1e12,
    }


class TimedModel(nn.Module):
    """The model with a stopwatch around each forward (synchronising on GPU so the time is real)."""

    def __init__(self, model: DiT, device: torch.device) -> None:
        super().__init__()
        self.model = model
        self.device = device
        self.forward_s = 0.0
        self.calls = 0

    def null_text(self, batch_size: int, num_tokens: int | None = None):
        return self.model.null_text(batch_size, num_tokens)

    def forward(self, *args):
        _sync(self.device)
        start = time.perf_counter()
        out = self.model(*args)
        _sync(self.device)
        self.forward_s += time.perf_counter() - start
        self.calls += 1
        return out


def bench_sampling_overhead(
    preset: str, num_tokens: int, steps: int, device: torch.device, dtype: torch.dtype
) -> dict:
    cfg = dit_config(preset, LATENT_CHANNELS, TEXT_DIM)
    timed = TimedModel(DiT(cfg).to(device).eval(), device)
    T, H, W = latent_shape(num_tokens, cfg.patch_size)
    g = torch.Generator(device).manual_seed(0)
    noise = torch.randn(1, LATENT_CHANNELS, T, H, W, generator=g, device=device)
    cond_latents = torch.randn(1, LATENT_CHANNELS, T, H, W, generator=g, device=device)
    cond_mask = torch.zeros(1, T, dtype=torch.bool, device=device)
    cond_mask[:, 0] = True  # image-to-video: exercises re-imposing the conditioning frame every step
    text = torch.randn(1, TEXT_TOKENS, TEXT_DIM, generator=g, device=device)
    text_mask = torch.ones(1, TEXT_TOKENS, dtype=torch.bool, device=device)

    def run() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            sample(
                timed, noise, text, text_mask, steps=steps, guidance=5.0,
                cond_latents=cond_latents, cond_mask=cond_mask,
            )  # fmt: skip

    run()  # warm-up
    timed.forward_s, timed.calls = 0.0, 0
    _sync(device)
    start = time.perf_counter()
    run()
    _sync(device)
    total = time.perf_counter() - start
    return {
        "preset": preset,
        "tokens": num_tokens,
        "steps": steps,
        "forwards": timed.calls,
        "total_s": total,
        "forward_s": timed.forward_s,
        "overhead": total / timed.forward_s - 1,
    }


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        lines = cpuinfo.read_text().splitlines()
        models = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
        name = models[0] if models else name
    return f"{name}, {torch.get_num_threads()} threads"


def commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def markdown(results: dict) -> str:
    lines = [
        f"Hardware: {results['hardware']}; torch {results['torch']}; dtype {results['dtype']}; "
        f"commit {results['commit']}",
        "",
        "| preset | params (M) | tokens | latent (TxHxW) | batch | step (s) | tokens/s | TFLOP/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results["train"]:
        lines.append(
            f"| {r['preset']} | {r['params_M']:.1f} | {r['tokens']} | {r['latent']} | {r['batch']} | "
            f"{r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {r['tflops']:.3f} |"
        )
    lines += [
        "",
        "| sampling | tokens | steps | forwards (2B CFG) | total (s) | in forwards (s) | overhead |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results["sampling"]:
        lines.append(
            f"| {r['preset']} | {r['tokens']} | {r['steps']} | {r['forwards']} | {r['total_s']:.3f} | "
            f"{r['forward_s']:.3f} | {100 * r['overhead']:.1f}% |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from infra.logs import setup_logging  # the repo's one logging setup (infra/ is on the path above)

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--tokens", nargs="+", type=int, default=[128, 512, 2048])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--sample-tokens", type=int, default=512)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    # Threads for CPU runs (0: torch's default). On a shared host one thread per process avoids
    # OpenMP spin-waiting against other jobs, which can slow small models down tenfold.
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "dit.json")
    args = parser.parse_args(argv)
    setup_logging()
    for preset in args.presets:  # fail before any measurement, with one line naming the bad value
        try:
            for num_tokens in {*args.tokens, args.sample_tokens}:
                latent_shape(num_tokens, dit_config(preset, LATENT_CHANNELS, TEXT_DIM).patch_size)
        except ValueError as error:
            parser.error(str(error))

    device = torch.device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.manual_seed(0)
    results = {
        "hardware": hardware(device),
        "torch": torch.__version__,
        "dtype": args.dtype,
        "commit": commit(),
        "train": [],
        "sampling": [],
    }
    for preset in args.presets:
        for num_tokens in args.tokens:
            logger.info("train step: %s, %d tokens", preset, num_tokens)
            results["train"].append(bench_train_step(preset, num_tokens, args.batch, args.iters, device, dtype))
        logger.info("sampling overhead: %s, %d tokens", preset, args.sample_tokens)
        results["sampling"].append(
            bench_sampling_overhead(preset, args.sample_tokens, args.sample_steps, device, dtype)
        )

    print(markdown(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    logger.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
