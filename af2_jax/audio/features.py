"""Device-side audio features: log-mel (docs/original.md#log-mel), the bicubic time resize
(docs/original.md#bicubic-resize) and the image fold (docs/original.md#image-fold).

Everything here is a pure jnp function, jit-able and batched over any leading axes. The constant matrices (window,
mel filterbank, resize) are built once in numpy (float64, then cast) and cached per configuration.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from af2_jax.config import AudioConfig

_DEFAULT_AUDIO = AudioConfig()
_HIGHEST = jax.lax.Precision.HIGHEST
# Cubic-convolution coefficient of PyTorch's bicubic interpolation (jax.image.resize uses -0.5).
_BICUBIC_A = -0.75


@functools.lru_cache(maxsize=None)
def periodic_hann(length: int) -> np.ndarray:
    n = np.arange(length, dtype=np.float64)
    return (0.5 - 0.5 * np.cos(2.0 * np.pi * n / length)).astype(np.float32)


def _hz_to_mel_htk(f):
    return 2595.0 * np.log10(1.0 + np.asarray(f, np.float64) / 700.0)


def _mel_to_hz_htk(m):
    return 700.0 * (10.0 ** (np.asarray(m, np.float64) / 2595.0) - 1.0)


@functools.lru_cache(maxsize=None)
def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, f_min: float, f_max: float) -> np.ndarray:
    """HTK-scale triangular filters without normalisation, `(n_fft // 2 + 1, n_mels)` (torchaudio's defaults)."""
    bin_freqs = np.linspace(0.0, sample_rate // 2, n_fft // 2 + 1)
    mel_points = np.linspace(_hz_to_mel_htk(f_min), _hz_to_mel_htk(f_max), n_mels + 2)
    f_pts = _mel_to_hz_htk(mel_points)
    f_diff = np.diff(f_pts)
    slopes = f_pts[None, :] - bin_freqs[:, None]  # (bins, n_mels + 2)
    down = -slopes[:, :-2] / f_diff[:-1]
    up = slopes[:, 2:] / f_diff[1:]
    return np.maximum(0.0, np.minimum(down, up)).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _frame_starts(num_samples: int, n_fft: int, hop: int) -> np.ndarray:
    n_frames = 1 + num_samples // hop
    return (np.arange(n_frames)[:, None] * hop + np.arange(n_fft)[None, :]).astype(np.int32)


def log_mel(windows, config: AudioConfig = _DEFAULT_AUDIO) -> jax.Array:
    """Log-mel power spectrogram in dB of waveform windows `(..., samples)` -> `(..., frames, n_mels)`.

    STFT: periodic Hann of `win_length == n_fft`, hop `hop_length`, centred with reflect padding, one-sided power;
    HTK mel filters from `f_min` to `f_max`; `10 * log10(max(p, power_floor))`. For a 10 s window at 16 kHz that is
    (1001, 64). Computed in float32 whatever the input dtype.
    """
    if config.win_length != config.n_fft:
        raise ValueError("win_length != n_fft is not supported (AF2 uses 1024 for both)")
    x = jnp.asarray(windows, jnp.float32)
    pad = config.n_fft // 2
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(pad, pad)], mode="reflect")
    frames = x[..., _frame_starts(windows.shape[-1], config.n_fft, config.hop_length)]
    spectrum = jnp.fft.rfft(frames * periodic_hann(config.n_fft), axis=-1)
    power = jnp.square(spectrum.real) + jnp.square(spectrum.imag)
    filters = mel_filterbank(config.sample_rate, config.n_fft, config.n_mels, config.f_min, config.f_max)
    mel = jnp.matmul(power, filters, precision=_HIGHEST)
    return 10.0 * jnp.log10(jnp.maximum(mel, config.power_floor))


def _cubic_weights(t: np.ndarray, a: float) -> np.ndarray:
    """Weights of the 4 taps at offsets -1, 0, 1, 2 for fractional position t (PyTorch's cubic convolution)."""

    def near(d):  # |d| <= 1
        return ((a + 2.0) * d - (a + 3.0)) * d * d + 1.0

    def far(d):  # 1 < |d| < 2
        return ((a * d - 5.0 * a) * d + 8.0 * a) * d - 4.0 * a

    return np.stack([far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)], axis=-1)


@functools.lru_cache(maxsize=None)
def bicubic_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """`(n_out, n_in)` matrix of PyTorch's bicubic interpolation with `align_corners=True` along one axis:
    output i samples source position `i * (n_in - 1) / (n_out - 1)`, A = -0.75, source indices clamped."""
    # PyTorch computes the scale and source positions in float32; matching that matters (up to 2.5e-4 on dB-scale
    # inputs) because float32 rounding of `i * scale` moves the fractional offsets at large i.
    scale = np.float32(n_in - 1) / np.float32(n_out - 1) if n_out > 1 else np.float32(0.0)
    src = np.arange(n_out, dtype=np.float32) * scale
    base = np.floor(src)
    weights = _cubic_weights((src - base).astype(np.float64), _BICUBIC_A)
    matrix = np.zeros((n_out, n_in), dtype=np.float64)
    rows = np.arange(n_out)
    for tap in range(4):
        cols = np.clip(base.astype(np.int64) - 1 + tap, 0, n_in - 1)
        np.add.at(matrix, (rows, cols), weights[:, tap])
    return matrix.astype(np.float32)


def resize_time(mel, n_out: int) -> jax.Array:
    """Bicubic resize of the time axis of `(..., frames, bins)` to `n_out` frames (a fixed matrix product)."""
    matrix = bicubic_resize_matrix(mel.shape[-2], n_out)
    return jnp.einsum("ot,...tf->...of", matrix.astype(mel.dtype), mel, precision=_HIGHEST)


def fold_to_image(mel, spec_size: int, freq_ratio: int) -> jax.Array:
    """Folds `(..., spec_size * freq_ratio, spec_size // freq_ratio)` into a `(..., spec_size, spec_size)` image:
    frame `k * spec_size + t`, bin `m` goes to row `k * n_bins + m`, column `t`."""
    frames, bins = mel.shape[-2:]
    if frames != spec_size * freq_ratio or bins * freq_ratio != spec_size:
        raise ValueError(f"cannot fold a ({frames}, {bins}) map into a {spec_size}x{spec_size} image")
    lead = mel.shape[:-2]
    x = mel.reshape(*lead, freq_ratio, spec_size, bins)
    x = jnp.swapaxes(x, -1, -2)
    return x.reshape(*lead, spec_size, spec_size)


def int16_round_trip(x) -> jax.Array:
    """The encoder's own quantisation of every window: clip, x32767, truncate toward zero, /32767 (float32)."""
    x = jnp.clip(jnp.asarray(x, jnp.float32), -1.0, 1.0) * 32767.0
    return jnp.trunc(x) / 32767.0
