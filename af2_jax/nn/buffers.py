"""The model's fixed buffers, computed with numpy from the configuration alone: the Swin blocks' window geometry,
relative-position index and shifted-window mask, and the audio transformer's rotary frequencies. The model uses them
and the checkpoint code checks the original's stored copies against them, so they live below both (no flax here).
"""

from __future__ import annotations

import functools

import numpy as np

from af2_jax.config import HTSATConfig


# Additive logit penalty between tokens from different regions of a shifted window (the original uses -100, not -inf:
# docs/original.md#shift-mask).
SHIFT_MASK_VALUE = -100.0


def swin_block_geometry(cfg: HTSATConfig, stage: int, block: int) -> tuple[int, int, int]:
    """`(resolution, window, shift)` of a Swin block: the token grid halves after every stage; every odd block is
    shifted by half a window; a grid no larger than the window is one window, and then nothing is shifted
    (docs/original.md#last-stage-unshifted)."""
    resolution = cfg.patch_grid // 2 ** stage
    window = min(cfg.window_size, resolution)
    shift = 0 if block % 2 == 0 or resolution <= cfg.window_size else cfg.window_size // 2
    return resolution, window, shift


@functools.lru_cache(maxsize=None)
def relative_position_index(window: int) -> np.ndarray:
    """`(w*w, w*w)` index into the `((2w-1)**2, heads)` bias table:
    `(hi - hj + w - 1) * (2w - 1) + (wi - wj + w - 1)`."""
    rows, cols = np.meshgrid(np.arange(window), np.arange(window), indexing="ij")
    coords = np.stack([rows.ravel(), cols.ravel()])  # (2, w*w)
    rel = coords[:, :, None] - coords[:, None, :] + (window - 1)
    return (rel[0] * (2 * window - 1) + rel[1]).astype(np.int64)


@functools.lru_cache(maxsize=None)
def shifted_window_mask(resolution: int, window: int, shift: int) -> np.ndarray:
    """`(num_windows, w*w, w*w)` additive mask of a block shifted by `shift` on a `resolution`^2 grid: token pairs
    from different regions of the rolled grid get -100."""
    labels = np.zeros((resolution, resolution), dtype=np.int64)
    bounds = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for i, rows in enumerate(bounds):
        for j, cols in enumerate(bounds):
            labels[rows, cols] = 3 * i + j
    per_window = partition_windows(labels[None, :, :, None], window)[0, :, :, 0]  # (nW, w*w)
    differs = per_window[:, None, :] != per_window[:, :, None]
    return np.where(differs, SHIFT_MASK_VALUE, 0.0).astype(np.float32)


def partition_windows(x, window: int):
    """(N, R, R, C) -> (N, nW, w*w, C): windows in row-major grid order, tokens row-major inside a window."""
    n, r, _, c = x.shape
    g = r // window
    x = x.reshape(n, g, window, g, window, c)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, g * g, window * window, c)


def rotary_inv_freq(dim: int, base: float) -> np.ndarray:
    """`1 / base**(arange(0, dim, 2) / dim)` in float32, as the original's buffer `position_enc.inv_freq`."""
    exponent = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    return (np.float32(1.0) / (np.float32(base) ** exponent)).astype(np.float32)
