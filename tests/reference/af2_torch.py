"""Our PyTorch reference of Audio Flamingo 2, written from the original's code (docs/original.md) and checked against
the golden fixtures.

Module attributes follow the original's, so `state_dict()` names equal the released checkpoint's and
`load_state_dict` takes a fixture or release directly. It is the oracle for shapes and widths the fixtures do not
cover, and the baseline of the benchmarks: decoding runs the way the original does (transformers' KV cache for the
text, cross-attention keys/values recomputed from the stored media at every step).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import Qwen2Config
from transformers.cache_utils import DynamicCache
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RMSNorm, Qwen2RotaryEmbedding


# --- audio front end -------------------------------------------------------------------------------------------
def int16_round_trip(x: torch.Tensor) -> torch.Tensor:
    return (torch.clamp(x, -1.0, 1.0) * 32767.0).to(torch.int16).to(torch.float32) / 32767.0


def htk_mel_filters(sample_rate=16000, n_fft=1024, n_mels=64, f_min=50.0, f_max=8000.0) -> torch.Tensor:
    """(n_fft // 2 + 1, n_mels) triangular HTK filters, no normalisation (torchaudio's melscale_fbanks defaults)."""
    freqs = torch.linspace(0, sample_rate // 2, n_fft // 2 + 1)
    to_mel = lambda f: 2595.0 * math.log10(1.0 + f / 700.0)  # noqa: E731
    mels = torch.linspace(to_mel(f_min), to_mel(f_max), n_mels + 2)
    hz = 700.0 * (10 ** (mels / 2595.0) - 1.0)
    diff = hz[1:] - hz[:-1]
    slopes = hz[None, :] - freqs[:, None]
    down = -slopes[:, :-2] / diff[:-1]
    up = slopes[:, 2:] / diff[1:]
    return torch.clamp(torch.minimum(down, up), min=0.0)


def log_mel(windows: torch.Tensor) -> torch.Tensor:
    """(N, 160000) -> (N, 1001, 64) dB."""
    spec = torch.stft(windows, n_fft=1024, hop_length=160, win_length=1024,
                      window=torch.hann_window(1024, periodic=True), center=True, pad_mode="reflect",
                      normalized=False, onesided=True, return_complex=True)
    power = spec.abs() ** 2  # (N, 513, 1001)
    mel = torch.matmul(power.transpose(1, 2), htk_mel_filters())
    return 10.0 * torch.log10(torch.clamp(mel, min=1e-10))


# --- HTSAT -----------------------------------------------------------------------------------------------------
def window_partition(x, w):
    b, h, wd, c = x.shape
    x = x.view(b, h // w, w, wd // w, w, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, w * w, c)


def window_reverse(windows, w, h, wd):
    b = windows.shape[0] // ((h // w) * (wd // w))
    x = windows.view(b, h // w, wd // w, w, w, -1).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, wd, -1)


class WindowAttention(nn.Module):
    def __init__(self, dim, heads, window):
        super().__init__()
        self.heads, self.window = heads, window
        self.scale = (dim // heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
        self.register_buffer("relative_position_index", rel[..., 0] * (2 * window - 1) + rel[..., 1])
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, mask=None):
        bw, n, c = x.shape
        qkv = self.qkv(x).reshape(bw, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
        attn = q @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        attn = attn + bias.permute(2, 0, 1)[None]
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(bw // nw, nw, self.heads, n, n) + mask[None, :, None]
            attn = attn.view(-1, self.heads, n, n)
        attn = attn.softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(bw, n, c))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class SwinBlock(nn.Module):
    def __init__(self, dim, resolution, heads, window, shift, mlp_ratio):
        super().__init__()
        if resolution <= window:
            window, shift = resolution, 0
        self.resolution, self.window, self.shift = resolution, window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, heads, window)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        if shift:
            img = torch.zeros(1, resolution, resolution, 1)
            regions = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
            label = 0
            for rows in regions:
                for cols in regions:
                    img[:, rows, cols, :] = label
                    label += 1
            labels = window_partition(img, window).squeeze(-1)
            mask = labels[:, None, :] - labels[:, :, None]
            self.register_buffer("attn_mask", mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0))
        else:
            self.attn_mask = None

    def forward(self, x):
        b, n, c = x.shape
        r = self.resolution
        h = self.norm1(x).view(b, r, r, c)
        if self.shift:
            h = torch.roll(h, (-self.shift, -self.shift), dims=(1, 2))
        h = window_reverse(self.attn(window_partition(h, self.window), self.attn_mask), self.window, r, r)
        if self.shift:
            h = torch.roll(h, (self.shift, self.shift), dims=(1, 2))
        x = x + h.reshape(b, n, c)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    def __init__(self, dim, resolution):
        super().__init__()
        self.resolution = resolution
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x):
        b, _, c = x.shape
        x = x.view(b, self.resolution, self.resolution, c)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


class BasicLayer(nn.Module):
    def __init__(self, dim, resolution, depth, heads, window, mlp_ratio, downsample):
        super().__init__()
        self.blocks = nn.ModuleList([SwinBlock(dim, resolution, heads, window, 0 if i % 2 == 0 else window // 2,
                                               mlp_ratio) for i in range(depth)])
        self.downsample = PatchMerging(dim, resolution) if downsample else None

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.downsample(x) if self.downsample is not None else x


class PatchEmbed(nn.Module):
    """The patch embedding plus the (unused at inference) AFF fusion branch, for the state_dict names."""

    def __init__(self, embed, aff_r=4):
        super().__init__()
        self.proj = nn.Conv2d(1, embed, 4, 4)
        self.norm = nn.LayerNorm(embed)
        self.mel_conv2d = nn.Conv2d(1, embed, (4, 12), (4, 12))
        inter = embed // aff_r
        local = [nn.Conv2d(embed, inter, 1), nn.BatchNorm2d(inter), nn.ReLU(True), nn.Conv2d(inter, embed, 1),
                 nn.BatchNorm2d(embed)]
        glob = [nn.AdaptiveAvgPool2d(1), nn.Conv2d(embed, inter, 1), nn.BatchNorm2d(inter), nn.ReLU(True),
                nn.Conv2d(inter, embed, 1), nn.BatchNorm2d(embed)]
        self.fusion_model = nn.Module()
        self.fusion_model.local_att = nn.Sequential(*local)
        self.fusion_model.global_att = nn.Sequential(*glob)

    def forward(self, image):  # image (N, 1, 256, 256): channel 0 only, as the original's eval path
        return self.norm(self.proj(image).flatten(2).transpose(1, 2))


class HTSAT(nn.Module):
    def __init__(self, h: dict, n_mels=64):
        super().__init__()
        self.h = h
        embed, depths, heads, window = h["embed_dim"], h["depths"], h["num_heads"], h["window_size"]
        self.spectrogram_extractor = nn.Module()
        self.spectrogram_extractor.stft = nn.Module()
        self.spectrogram_extractor.stft.conv_real = nn.Conv1d(1, 513, 1024, bias=False)
        self.spectrogram_extractor.stft.conv_imag = nn.Conv1d(1, 513, 1024, bias=False)
        self.logmel_extractor = nn.Module()
        self.logmel_extractor.melW = nn.Parameter(torch.zeros(513, n_mels))
        self.bn0 = nn.BatchNorm2d(n_mels)
        self.patch_embed = PatchEmbed(embed, h.get("aff_r", 4))
        grid = h["spec_size"] // h["patch_stride"][0]
        self.layers = nn.ModuleList([
            BasicLayer(embed * 2 ** s, grid // 2 ** s, depths[s], heads[s], window, h["mlp_ratio"], s < len(depths) - 1)
            for s in range(len(depths))])
        self.num_features = embed * 2 ** (len(depths) - 1)
        self.norm = nn.LayerNorm(self.num_features)
        self.tscam_conv = nn.Conv2d(self.num_features, h["num_classes"], (2, 3), padding=(0, 1))
        self.head = nn.Linear(h["num_classes"], h["num_classes"])

    def image(self, mel):
        """(N, 1001, 64) -> (N, 256, 256): bn0 over bins, bicubic time resize, fold."""
        x = self.bn0(mel[:, None].transpose(1, 3)).transpose(1, 3)  # (N, 1, 1001, 64), bins as channels
        x = F.interpolate(x, size=(1024, 64), mode="bicubic", align_corners=True)
        x = x.permute(0, 1, 3, 2).reshape(x.shape[0], 1, 64, 4, 256).permute(0, 1, 3, 2, 4)
        return x.reshape(x.shape[0], 256, 256)

    def encode_image(self, image):
        x = self.patch_embed(image[:, None])
        for layer in self.layers:
            x = layer(x)
        x = self.norm(x)  # (N, 64, D) over the 8 x 8 grid
        n, _, d = x.shape
        grid = int(math.isqrt(x.shape[1]))
        parts = grid // self.h["freq_ratio"]
        x = x.view(n, grid // parts, parts, grid, d).permute(0, 2, 1, 3, 4)
        return x.reshape(n, grid * grid, d)

    def forward(self, windows):
        return self.encode_image(self.image(log_mel(int16_round_trip(windows))))


# --- audio transformer -----------------------------------------------------------------------------------------
def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class MultiHeadAttention(nn.Module):
    def __init__(self, d_model, heads):
        super().__init__()
        self.heads, self.d_head = heads, d_model // heads
        self.w_qs = nn.Linear(d_model, d_model, bias=False)
        self.w_ks = nn.Linear(d_model, d_model, bias=False)
        self.w_vs = nn.Linear(d_model, d_model, bias=False)
        self.fc = nn.Linear(d_model, d_model, bias=False)
        self.layer_norm = nn.LayerNorm(d_model, eps=1e-6)

    def forward(self, x, key_mask, cos, sin):
        b, s, d = x.shape
        split = lambda t: t.view(b, s, self.heads, self.d_head).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.w_qs(x)), split(self.w_ks(x)), split(self.w_vs(x))
        rd = cos.shape[-1]
        rot = lambda t: torch.cat([t[..., :rd] * cos + rotate_half(t[..., :rd]) * sin, t[..., rd:]], -1)  # noqa
        q, k = rot(q), rot(k)
        attn = torch.matmul(q / self.d_head ** 0.5, k.transpose(2, 3))
        attn = attn.masked_fill(key_mask[:, None, None, :] == 0, -1e9).softmax(dim=-1)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(b, s, d)
        return self.layer_norm(self.fc(out) + x)


class PositionwiseFeedForward(nn.Module):
    def __init__(self, d_model, d_inner):
        super().__init__()
        self.w_1, self.w_2 = nn.Linear(d_model, d_inner), nn.Linear(d_inner, d_model)
        self.layer_norm = nn.LayerNorm(d_model, eps=1e-6)

    def forward(self, x):
        return self.layer_norm(self.w_2(F.relu(self.w_1(x))) + x)


class EncoderLayer(nn.Module):
    def __init__(self, d_model, heads, d_inner):
        super().__init__()
        self.slf_attn = MultiHeadAttention(d_model, heads)
        self.pos_ffn = PositionwiseFeedForward(d_model, d_inner)

    def forward(self, x, key_mask, cos, sin):
        return self.pos_ffn(self.slf_attn(x, key_mask, cos, sin))


class AudioTransformer(nn.Module):
    def __init__(self, d_model, heads, layers, d_inner, base=4096.0):
        super().__init__()
        self.d_model = d_model
        rotary_dim = max(d_model // heads // 2, 32)
        self.position_enc = nn.Module()
        self.position_enc.register_buffer(
            "inv_freq", 1.0 / (base ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim)))
        self.layer_norm = nn.LayerNorm(d_model, eps=1e-6)
        self.layer_stack = nn.ModuleList([EncoderLayer(d_model, heads, d_inner) for _ in range(layers)])

    def forward(self, x, mask):
        x = self.layer_norm(x * self.d_model ** 0.5)
        freqs = torch.einsum("i,j->ij", torch.arange(x.shape[1]).float(), self.position_enc.inv_freq)
        emb = torch.cat([freqs, freqs], -1)
        cos, sin = emb.cos()[None, None], emb.sin()[None, None]
        for layer in self.layer_stack:
            x = layer(x, mask, cos, sin)
        return x


# --- cross-attention and the LM --------------------------------------------------------------------------------
class MaskedCrossAttention(nn.Module):
    # Off (the original): a row whose media are all masked attends evenly over the padding. On (af2-jax's rule, for
    # text-only requests): its attention output is zero.
    zero_without_media = False

    def __init__(self, dim, media_dim, heads=8, dim_head=64):
        super().__init__()
        self.heads, self.scale = heads, dim_head ** -0.5
        inner = heads * dim_head
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(media_dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x, media, media_mask):
        b, t, _ = x.shape
        q = self.to_q(self.norm(x))
        k, v = self.to_kv(media).chunk(2, dim=-1)
        heads = lambda z: z.view(b, z.shape[1], self.heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = heads(q) * self.scale, heads(k), heads(v)
        sim = torch.matmul(q, k.transpose(-1, -2))
        sim = sim.masked_fill(~media_mask.bool()[:, None, None, :], -torch.finfo(sim.dtype).max)
        attn = (sim - sim.amax(dim=-1, keepdim=True).detach()).softmax(dim=-1)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(b, t, -1)
        if self.zero_without_media:
            out = out * media_mask.bool().any(dim=-1)[:, None, None]
        return self.to_out(out)


class GatedCrossAttentionBlock(nn.Module):
    def __init__(self, dim, media_dim, heads=8, dim_head=64, ff_mult=4):
        super().__init__()
        self.attn = MaskedCrossAttention(dim, media_dim, heads, dim_head)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, ff_mult * dim, bias=False), nn.GELU(),
                                nn.Linear(ff_mult * dim, dim, bias=False))
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x, media, media_mask):
        x = x + self.attn_gate.tanh() * self.attn(x, media, media_mask)
        return x + self.ff_gate.tanh() * self.ff(x)


class FlamingoLayer(nn.Module):
    def __init__(self, qwen: Qwen2Config, media_dim, idx, heads=8, dim_head=64, ff_mult=4):
        super().__init__()
        self.gated_cross_attn_layer_sound = GatedCrossAttentionBlock(qwen.hidden_size, media_dim, heads, dim_head,
                                                                     ff_mult)
        self.decoder_layer = Qwen2DecoderLayer(qwen, idx)

    def forward(self, x, media, media_mask, attention_mask, position_embeddings, cache=None):
        after_xattn = self.gated_cross_attn_layer_sound(x, media, media_mask)
        out = self.decoder_layer(after_xattn, attention_mask=attention_mask, position_embeddings=position_embeddings,
                                 cache=cache, use_cache=cache is not None)
        return after_xattn, out


def qwen_config(raw: dict) -> Qwen2Config:
    fields = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "rope_theta", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings")
    cfg = Qwen2Config(**{k: raw[k] for k in fields if k in raw})
    cfg._attn_implementation = "eager"
    return cfg


class AF2Reference(nn.Module):
    """Whole model. `config` is the fixture `config.json` dict (or one with the same sections)."""

    def __init__(self, config: dict, zero_without_media: bool = False):
        """`zero_without_media`: af2-jax's rule for a row without audio (`MaskedCrossAttention`); off by default, as
        the original."""
        super().__init__()
        self.raw = config
        qwen = qwen_config(config["qwen2_config"])
        self.qwen = qwen
        d = config["clap_config"]["audio_embed_dim"]
        at = config["model_config"]["audio_transformer_kwargs"]
        xa = config.get("gated_cross_attention", {})
        self.clap = nn.Module()
        self.clap.nvclap = HTSAT(config["htsat"])
        self.audio_transformer_clap = AudioTransformer(d, at["n_head"], at["n_layers"], at["d_inner"])
        self.lang_encoder = nn.Module()
        self.lang_encoder.model = nn.Module()
        self.lang_encoder.model.embed_tokens = nn.Embedding(qwen.vocab_size, qwen.hidden_size)
        self.lang_encoder.model.layers = nn.ModuleList([
            FlamingoLayer(qwen, d, i, xa.get("heads", 8), xa.get("dim_head", 64), xa.get("ff_mult", 4))
            for i in range(qwen.num_hidden_layers)])
        self.lang_encoder.model.norm = Qwen2RMSNorm(qwen.hidden_size, eps=qwen.rms_norm_eps)
        self.rotary = Qwen2RotaryEmbedding(qwen)
        for module in self.modules():
            if isinstance(module, MaskedCrossAttention):
                module.zero_without_media = zero_without_media
        self.eval()

    # weights
    def load_original(self, tensors: dict) -> None:
        """Loads original names; alias keys (released layout) win over their twins, as in the original loader."""
        tensors = dict(tensors)
        for name in list(tensors):
            twin = None
            if name == "lang_encoder.lm_head.weight":
                twin = "lang_encoder.model.embed_tokens.weight"
            elif name.startswith("lang_encoder.old_decoder_blocks."):
                i, rest = name[len("lang_encoder.old_decoder_blocks."):].split(".", 1)
                twin = f"lang_encoder.model.layers.{i}.decoder_layer.{rest}"
            elif name.startswith("lang_encoder.gated_cross_attn_layers_sound."):
                i, rest = name[len("lang_encoder.gated_cross_attn_layers_sound."):].split(".", 1)
                twin = f"lang_encoder.model.layers.{i}.gated_cross_attn_layer_sound.{rest}"
            if twin is not None:
                tensors[twin] = tensors.pop(name)
        state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()}
        own = self.state_dict()
        for k, v in state.items():  # 0-d vs (1,) BatchNorm counters differ between layouts
            if k in own and own[k].shape != v.shape and own[k].numel() == v.numel():
                state[k] = v.reshape(own[k].shape)
        self.load_state_dict(state, strict=True)

    # audio
    def encode_windows(self, audio_x):
        b, n, s = audio_x.shape
        return self.clap.nvclap(audio_x.reshape(b * n, s)).view(b, n, -1, self.clap.nvclap.num_features)

    def transform_audio(self, clap_embeds, audio_x_mask):
        b, n, h, d = clap_embeds.shape
        mask = audio_x_mask.repeat_interleave(h, dim=1)
        return self.audio_transformer_clap(clap_embeds.reshape(b, n * h, d), mask), mask

    def encode_audio(self, audio_x, audio_x_mask):
        return self.transform_audio(self.encode_windows(audio_x), audio_x_mask)

    # language model
    def _mask(self, attention_mask, query_len, past_len):
        """Additive (B, 1, T, past + T) causal + key padding mask, as transformers builds it."""
        total = past_len + query_len
        causal = torch.ones(query_len, total, dtype=torch.bool).tril(diagonal=past_len)
        allowed = causal[None, None] & attention_mask[:, None, None, :total].bool()
        return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)

    def forward(self, input_ids, attention_mask, media, media_mask, return_intermediates=False, position_ids=None,
                cache=None, past_len=0):
        b, t = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + t)[None].expand(b, t)
        x = self.lang_encoder.model.embed_tokens(input_ids)
        pos = self.rotary(x, position_ids)
        mask = self._mask(attention_mask, t, past_len)
        xattn_out, layer_out = [], []
        for layer in self.lang_encoder.model.layers:
            after_xattn, x = layer(x, media, media_mask, mask, pos, cache)
            xattn_out.append(after_xattn)
            layer_out.append(x)
        logits = self.lang_encoder.model.norm(x) @ self.lang_encoder.model.embed_tokens.weight.T
        return (logits, xattn_out, layer_out) if return_intermediates else logits

    @torch.no_grad()
    def generate_greedy(self, input_ids, attention_mask, audio_x, audio_x_mask, max_new_tokens, eos_token_id,
                        pad_token_id, use_cache=True):
        """Batched greedy decoding as the original: audio encoded once; text through transformers' DynamicCache (or
        recomputed, use_cache=False); cross-attention K/V recomputed from the media at every step; positions
        cumsum(mask) - 1 with padding at 1; rows that hit eos continue with pad. Returns (B, T + N)."""
        media, media_mask = self.encode_audio(audio_x, audio_x_mask)
        ids, mask = input_ids.clone(), attention_mask.clone()
        done = torch.zeros(ids.shape[0], dtype=torch.bool)
        cache = DynamicCache(config=self.qwen) if use_cache else None
        past = 0
        for _ in range(max_new_tokens):
            positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
            if cache is None or past == 0:
                step_ids, step_pos = ids, positions
            else:
                step_ids, step_pos = ids[:, -1:], positions[:, -1:]
            logits = self(step_ids, mask, media, media_mask, position_ids=step_pos, cache=cache,
                          past_len=past if cache is not None else 0)
            if cache is not None:
                past = ids.shape[1]
            token = logits[:, -1].argmax(-1)
            token = torch.where(done, torch.full_like(token, pad_token_id), token)
            done |= token == eos_token_id
            ids = torch.cat([ids, token[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            if done.all():
                break
        return ids


def original_schema(config) -> dict:
    """Our AF2Config in the fixture config.json schema the reference reads."""
    h, at, lm, xa, t = config.htsat, config.audio_transformer, config.lm, config.cross_attention, config.tokens
    return {
        "clap_config": {"audio_embed_dim": at.d_model},
        "model_config": {"audio_transformer_kwargs": {"n_head": at.n_heads, "n_layers": at.n_layers,
                                                      "d_inner": at.d_inner}},
        "htsat": {"embed_dim": h.embed_dim, "depths": list(h.depths), "num_heads": list(h.num_heads),
                  "window_size": h.window_size, "mlp_ratio": h.mlp_ratio, "spec_size": h.spec_size,
                  "patch_stride": [h.patch_stride, h.patch_stride], "freq_ratio": h.freq_ratio, "num_classes": 527},
        "gated_cross_attention": {"heads": xa.heads, "dim_head": xa.dim_head, "ff_mult": xa.ff_mult},
        "qwen2_config": {"vocab_size": lm.vocab_size, "hidden_size": lm.hidden_size,
                         "intermediate_size": lm.intermediate_size, "num_hidden_layers": lm.num_layers,
                         "num_attention_heads": lm.num_heads, "num_key_value_heads": lm.num_kv_heads,
                         "rope_theta": lm.rope_theta, "rms_norm_eps": lm.rms_norm_eps,
                         "max_position_embeddings": lm.max_position_embeddings, "tie_word_embeddings": True},
        "special_tokens": {"<audio>": t.media, "<|endofchunk|>": t.end_of_chunk, "<|PAD_TOKEN|>": t.pad,
                           "<SEP>": t.sep, "<|endoftext|>": t.eos},
    }
