"""HTSAT, the Swin-transformer audio encoder of AF-CLAP, in its inference form (docs/original.md#htsat).

mel `(..., 1001, 64)` -> bn0 (eval statistics) -> bicubic time resize to 1024 -> 256x256 image -> 4x4 patch embedding
-> 4 Swin stages (window attention with relative position bias, shifted windows with the -100 mask, patch merging)
-> final LayerNorm -> 64 tokens per window, regrouped frequency-half-major as the original hands them to AF2.

Left out because they are dead at inference (docs/original.md#dead-at-inference): the AFF fusion branch
(`patch_embed.mel_conv2d`, `patch_embed.fusion_model`), the torchlibrosa STFT / mel extractors and the `tscam_conv` /
`head` classifier; their tensors are kept aside by the checkpoint converter. Constant buffers
(`relative_position_index`, `attn_mask`) are recomputed (`af2_jax.nn.buffers`), never loaded
(docs/original.md#constant-buffers).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from af2_jax.audio.features import fold_to_image, int16_round_trip, log_mel, resize_time
from af2_jax.config import AudioConfig, HTSATConfig
from af2_jax.nn.buffers import partition_windows, relative_position_index, shifted_window_mask, swin_block_geometry
from af2_jax.nn.layers import layer_norm, linear, named
from af2_jax.sharding import constrain


def _merge(x, resolution: int):
    """Inverse of `partition_windows`: (N, nW, w*w, C) -> (N, R, R, C)."""
    n, nw, t, c = x.shape
    g = int(round(nw ** 0.5))
    window = resolution // g
    x = x.reshape(n, g, g, window, window, c)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, resolution, resolution, c)


class WindowAttention(nnx.Module):
    """Multi-head self-attention inside each window, with a learned relative position bias: windows
    `(N, nW, w*w, C)` -> the same shape, logits and softmax in float32."""

    def __init__(self, dim: int, heads: int, window: int, qkv_bias: bool, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.heads = heads
        self.window = window
        self.dtype = dtype
        self.qkv = linear(dim, 3 * dim, axes=("htsat_embed", "htsat_qkv"), use_bias=qkv_bias,
                          dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.proj = linear(dim, dim, axes=("htsat_qkv", "htsat_embed"), dtype=dtype, param_dtype=param_dtype,
                           rngs=rngs)
        table_init = named(nnx.initializers.truncated_normal(0.02), (None, "htsat_heads"))
        self.relative_position_bias_table = nnx.Param(
            table_init(rngs.params(), ((2 * window - 1) ** 2, heads), param_dtype))

    def __call__(self, windows, mask=None):
        """windows `(N, nW, T, C)`; mask `(nW, T, T)` additive or None."""
        n, nw, t, c = windows.shape
        head_dim = c // self.heads
        qkv = self.qkv(windows).reshape(n, nw, t, 3, self.heads, head_dim)
        q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
        q = q * jnp.asarray(head_dim ** -0.5, q.dtype)
        logits = jnp.einsum("nwqhd,nwkhd->nwhqk", q, k).astype(jnp.float32)
        index = relative_position_index(self.window).reshape(-1)
        bias = self.relative_position_bias_table[...][index].reshape(t, t, self.heads).transpose(2, 0, 1)
        logits = logits + bias.astype(jnp.float32)
        if mask is not None:
            logits = logits + mask[None, :, None]
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("nwhqk,nwkhd->nwqhd", probs, v).reshape(n, nw, t, c)
        return self.proj(out)


class SwinBlock(nnx.Module):
    """Pre-norm Swin block: (shifted) window attention and a GELU MLP, each with a residual. `(N, R, R, C)` -> the
    same shape."""

    def __init__(self, dim: int, heads: int, stage: int, block: int, cfg: HTSATConfig, *, dtype, param_dtype,
                 rngs: nnx.Rngs):
        self.resolution, self.window, self.shift = swin_block_geometry(cfg, stage, block)
        norm = functools.partial(layer_norm, axis_name="htsat_embed", eps=cfg.layer_norm_eps, dtype=dtype,
                                 param_dtype=param_dtype, rngs=rngs)
        hidden = int(dim * cfg.mlp_ratio)
        self.norm1 = norm(dim)
        self.attn = WindowAttention(dim, heads, self.window, cfg.qkv_bias, dtype=dtype, param_dtype=param_dtype,
                                    rngs=rngs)
        self.norm2 = norm(dim)
        self.fc1 = linear(dim, hidden, axes=("htsat_embed", "htsat_mlp"), dtype=dtype, param_dtype=param_dtype,
                          rngs=rngs)
        self.fc2 = linear(hidden, dim, axes=("htsat_mlp", "htsat_embed"), dtype=dtype, param_dtype=param_dtype,
                          rngs=rngs)

    def attn_mask(self) -> np.ndarray | None:
        if self.shift == 0:
            return None
        return shifted_window_mask(self.resolution, self.window, self.shift)

    def __call__(self, x):
        """x `(N, R, R, C)`."""
        h = self.norm1(x)
        if self.shift:
            h = jnp.roll(h, (-self.shift, -self.shift), axis=(1, 2))
        h = _merge(self.attn(partition_windows(h, self.window), self.attn_mask()), self.resolution)
        if self.shift:
            h = jnp.roll(h, (self.shift, self.shift), axis=(1, 2))
        x = x + h
        return x + self.fc2(jax.nn.gelu(self.fc1(self.norm2(x)), approximate=False))


class PatchMerging(nnx.Module):
    """2x2 neighbourhoods concatenated (order: (0,0), (1,0), (0,1), (1,1) as (row, col)), LayerNorm, 4C -> 2C:
    `(N, R, R, C)` -> `(N, R/2, R/2, 2C)`."""

    def __init__(self, dim: int, cfg: HTSATConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.norm = layer_norm(4 * dim, axis_name="htsat_embed", eps=cfg.layer_norm_eps, dtype=dtype,
                               param_dtype=param_dtype, rngs=rngs)
        self.reduction = linear(4 * dim, 2 * dim, axes=("htsat_embed", "htsat_embed"), use_bias=False, dtype=dtype,
                                param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], axis=-1)
        return self.reduction(self.norm(x))


class SwinStage(nnx.Module):
    """One Swin stage: its blocks (every odd one shifted by half a window), then patch merging except after the last
    stage. `(N, R, R, C)` -> `(N, R/2, R/2, 2C)`; the last stage keeps the shape."""

    def __init__(self, stage: int, cfg: HTSATConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        dim = cfg.embed_dim * 2 ** stage
        self.blocks = nnx.List([
            SwinBlock(dim, cfg.num_heads[stage], stage, b, cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            for b in range(cfg.depths[stage])])
        last = stage == len(cfg.depths) - 1
        self.downsample = None if last else PatchMerging(dim, cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        for block in self.blocks:
            x = block(x)
        if self.downsample is not None:
            x = self.downsample(x)
        return x


class HTSAT(nnx.Module):
    """The audio encoder. `__call__(mel)` maps float32 log-mel `(..., 1001, 64)` to tokens `(..., 64, num_features)`
    in the module's dtype (64 x 2048 per window in the releases), in the original's order
    (docs/original.md#token-order). Its two halves: `image` (mel -> float32 `(..., 256, 256)`) and `encode_image`
    (image -> tokens)."""

    def __init__(self, cfg: HTSATConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if cfg.spec_size // cfg.freq_ratio != cfg.n_mels:
            raise ValueError(f"spec_size / freq_ratio = {cfg.spec_size // cfg.freq_ratio} must equal n_mels "
                             f"= {cfg.n_mels}")
        if cfg.patch_size != cfg.patch_stride:
            raise ValueError("overlapping patches (patch_size != patch_stride) are not supported")
        self.cfg = cfg
        self.dtype = dtype
        self.bn0 = nnx.BatchNorm(
            cfg.n_mels, use_running_average=True, epsilon=cfg.batch_norm_eps, dtype=jnp.float32,
            param_dtype=param_dtype,
            scale_init=named(nnx.initializers.ones_init(), ("htsat_mel",)),
            bias_init=named(nnx.initializers.zeros_init(), ("htsat_mel",)),
            rngs=rngs)
        # PyTorch's Conv2d initialisation, uniform(+-1/sqrt(fan_in)) for kernel and bias. A zero bias would make
        # the embedding followed by the patch LayerNorm scale-invariant per patch: a freshly initialised encoder
        # would then see each patch's texture but not its level (the spectrum's shape), and barely learn.
        torch_uniform = nnx.initializers.uniform(2 / cfg.patch_size)  # [0, 2/sqrt(fan_in)), shifted below
        centred = lambda key, shape, dtype: torch_uniform(key, shape, dtype) - 1 / cfg.patch_size  # noqa: E731
        self.patch_embed = nnx.Conv(
            1, cfg.embed_dim, kernel_size=(cfg.patch_size, cfg.patch_size),
            strides=(cfg.patch_stride, cfg.patch_stride), padding="VALID", dtype=dtype, param_dtype=param_dtype,
            kernel_init=named(centred, (None, None, None, "htsat_embed")),
            bias_init=named(centred, ("htsat_embed",)),
            rngs=rngs)
        self.patch_norm = layer_norm(cfg.embed_dim, axis_name="htsat_embed", eps=cfg.layer_norm_eps, dtype=dtype,
                                     param_dtype=param_dtype, rngs=rngs)
        self.stages = nnx.List([
            SwinStage(s, cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs) for s in range(len(cfg.depths))])
        self.norm = layer_norm(cfg.num_features, axis_name="htsat_embed", eps=cfg.layer_norm_eps, dtype=dtype,
                               param_dtype=param_dtype, rngs=rngs)

    def image(self, mel):
        """bn0 over mel bins (eval statistics), bicubic time resize, fold: `(..., 1001, 64)` -> `(..., 256, 256)`."""
        cfg = self.cfg
        x = self.bn0(jnp.asarray(mel, jnp.float32))
        x = resize_time(x, cfg.spec_size * cfg.freq_ratio)
        return fold_to_image(x, cfg.spec_size, cfg.freq_ratio)

    def encode_image(self, image):
        """`(..., 256, 256)` image -> `(..., tokens, num_features)`."""
        cfg = self.cfg
        lead = image.shape[:-2]
        x = image.reshape(-1, cfg.spec_size, cfg.spec_size, 1).astype(self.dtype)
        # (N, 64, 64, C), tokens row-major like the original; windows are the encoder's batch (split over data axes)
        x = constrain(self.patch_norm(self.patch_embed(x)), ("windows", None, None, "htsat_embed"))
        for stage in self.stages:
            x = stage(x)
        x = self.norm(x)  # (N, G, G, D): grid rows are (time quarter k, frequency part f) as row k * parts + f
        n, grid, _, d = x.shape
        parts = grid // cfg.freq_ratio
        x = x.reshape(n, grid // parts, parts, grid, d).transpose(0, 2, 1, 3, 4)
        return x.reshape(*lead, grid * grid, d)

    def __call__(self, mel):
        return self.encode_image(self.image(mel))


def encode_windows(htsat: HTSAT, windows, audio_cfg: AudioConfig = AudioConfig()):
    """Waveform windows `(..., 160000)` -> HTSAT tokens `(..., 64, D)`: the encoder's own int16 round trip, log-mel
    and HTSAT, all windows of all rows in one batch."""
    return htsat(log_mel(int16_round_trip(windows), audio_cfg))
