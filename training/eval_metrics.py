"""Video quality metrics that need no downloaded weights, on uint8 (T, H, W, 3) RGB frames: what
training/evaluation.py measures a model by (docs/evaluation.md has the reasoning).

    psnr, ssim            fidelity of frames a model was given to reproduce
    flicker, flow_accel   temporal stability after Farneback optical flow (OpenCV)
    drift                 change of brightness, contrast or sharpness from the first window to the last
"""

from __future__ import annotations

import math

import cv2
import numpy as np


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of uint8 frames in dB; inf for identical frames."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean structural similarity (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2
    0.03) of uint8 frames (T, H, W, 3) or (H, W, 3), over frames, pixels and RGB channels; 1 = identical."""
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    scores = []
    for frame_a, frame_b in zip(a.reshape(-1, *a.shape[-3:]), b.reshape(-1, *b.shape[-3:])):
        x, y = frame_a.astype(np.float64), frame_b.astype(np.float64)  # (H, W, 3)

        def blur(image: np.ndarray) -> np.ndarray:
            return cv2.GaussianBlur(image, (11, 11), 1.5, borderType=cv2.BORDER_REFLECT)

        mu_x, mu_y = blur(x), blur(y)
        var_x, var_y, cov = blur(x * x) - mu_x**2, blur(y * y) - mu_y**2, blur(x * y) - mu_x * mu_y
        ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
        scores.append(float(ssim_map.mean()))
    return float(np.mean(scores))


def luma(frames: np.ndarray) -> np.ndarray:
    """uint8 (T, H, W, 3) RGB -> uint8 (T, H, W) luma (BT.601, what Farneback wants: 8-bit, one channel)."""
    return np.stack([cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY) for frame in frames])


def optical_flow(prev: np.ndarray, next_: np.ndarray) -> np.ndarray:
    """Dense Farneback flow (H, W, 2) from one uint8 luma frame to the next: prev(x) ~ next(x + flow(x)).
    Three pyramid levels and a 9-pixel window: small enough for 32-pixel test frames to keep detail."""
    return cv2.calcOpticalFlowFarneback(prev, next_, None, 0.5, 3, 9, 3, 5, 1.1, 0)


def warp(image: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """image(x + flow(x)): bring the next frame (or flow field) back onto the previous frame's pixels."""
    height, width = flow.shape[:2]
    grid_x, grid_y = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
    return cv2.remap(image, grid_x + flow[..., 0], grid_y + flow[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def flows_of(frames: np.ndarray) -> list[np.ndarray]:
    """Optical flow (H, W, 2) between each pair of consecutive frames."""
    y = luma(frames)  # (T, H, W)
    return [optical_flow(a, b) for a, b in zip(y, y[1:])]


def flicker(frames: np.ndarray, flows: list[np.ndarray] | None = None) -> float:
    """Mean absolute luma change (0..1) between consecutive frames that optical flow does not explain;
    nan for fewer than 2 frames."""
    y = luma(frames).astype(np.float32) / 255.0  # (T, H, W)
    if len(y) < 2:
        return math.nan
    flows = flows if flows is not None else flows_of(frames)
    return float(np.mean([np.abs(warp(b, f) - a).mean() for a, b, f in zip(y, y[1:], flows)]))


def flow_accel(frames: np.ndarray, flows: list[np.ndarray] | None = None) -> float:
    """Mean |F[t+1](x + F[t](x)) - F[t](x)| in pixels/frame^2 (0 for constant motion); nan under 3 frames."""
    flows = flows if flows is not None else flows_of(frames)
    if len(flows) < 2:
        return math.nan
    return float(np.mean([np.linalg.norm(warp(b, a) - a, axis=-1).mean() for a, b in zip(flows, flows[1:])]))


def frame_quality(frames: np.ndarray) -> dict[str, float]:
    """Brightness (mean luma), contrast (luma std) and sharpness (mean |Laplacian|), all on 0..1 luma,
    averaged over frames."""
    y = luma(frames).astype(np.float32) / 255.0  # (T, H, W)
    sharpness = np.mean([np.abs(cv2.Laplacian(frame, cv2.CV_32F)).mean() for frame in y])
    return {"brightness": float(y.mean()), "contrast": float(y.std(axis=(1, 2)).mean()), "sharpness": float(sharpness)}


def drift(frames: np.ndarray, window_frames: int) -> float:
    """Largest change of a `frame_quality` statistic from the first `window_frames` frames to the
    last; nan unless the video is longer than one window."""
    if len(frames) <= window_frames:
        return math.nan
    first, last = frame_quality(frames[:window_frames]), frame_quality(frames[-window_frames:])
    return max(abs(last[key] - first[key]) for key in first)
