"""Host-side audio loading: decode, channel policy, resample to 16 kHz, peak normalisation, int16 round trip,
10 s windows, and batch collation. The original's rules: docs/original.md#audio-loading and the entries after it;
ours, rule by rule: docs/audio.md.

Deviations from the original, all deliberate:
- mp3 is decoded by soundfile (libsndfile) and resampled by soxr_hq like every other format; the original used
  pydub/ffmpeg and audioop's rate conversion for mp3 (channel averaging is kept).
- MP4/M4A, AAC and WebM, which libsndfile cannot read, are decoded by PyAV when the `av` extra is installed.
- An all-zero clip stays silent (with a warning) instead of turning into NaN through 0/0.
- Up to 30 windows (5 minutes) are allowed; audio past the window limit is dropped with a warning that says how
  much, where the original dropped it silently.

Warnings are log records of the `af2_jax.audio` logger (one line each, even where logging is not configured).
"""

from __future__ import annotations

import logging
import math
import os
import struct
from typing import Sequence

import numpy as np

from af2_jax.config import AudioConfig, check_max_windows

log = logging.getLogger(__name__)

_DEFAULT_AUDIO = AudioConfig()


class AudioError(ValueError):
    """A file that cannot be turned into model input. The message names the file, the problem and the fix."""


def _fail(path, problem: str) -> AudioError:
    return AudioError(f"{path}: {problem}")


def _check_path(path) -> None:
    if not os.path.exists(path):
        raise _fail(path, "no such file; check the path")
    if os.path.isdir(path):
        raise _fail(path, "is a directory, not an audio file; pass a file inside it")
    if os.path.getsize(path) == 0:
        raise _fail(path, "is empty (0 bytes); re-export or re-download the file")


# Sizes a streaming writer puts in a data chunk header before it knows the length: no promise to check.
_UNKNOWN_CHUNK_SIZES = (0, 0xFFFFFFFF)


def _check_not_cut_off(path) -> None:
    """A WAV (RIFF/RIFX) or AIFF file whose sample chunk is shorter than its header says is an error: libsndfile
    silently shortens such a file to the bytes that are there. Other formats fail in the decoder."""
    with open(path, "rb") as f:
        head = f.read(12)
        if head[:4] in (b"RIFF", b"RIFX") and head[8:12] == b"WAVE":
            order, samples_chunk = ("<" if head[:4] == b"RIFF" else ">"), b"data"
        elif head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
            order, samples_chunk = ">", b"SSND"
        else:
            return
        while len(chunk := f.read(8)) == 8:
            name, size = chunk[:4], struct.unpack(order + "I", chunk[4:])[0]
            if name != samples_chunk:
                f.seek(size + (size & 1), os.SEEK_CUR)  # chunks are padded to an even length
                continue
            present = os.fstat(f.fileno()).st_size - f.tell()
            if size not in _UNKNOWN_CHUNK_SIZES and present < size:
                raise _fail(path, f"is truncated: its header promises {size} bytes of samples but only {present} "
                                  "are there; re-export or re-download the file")
            return


# Containers libsndfile cannot read, told apart by their first bytes: (test on the first 12 bytes, what the file is).
_AV_CONTAINERS = (
    (lambda head: head[4:8] == b"ftyp", "an MP4/M4A file"),
    (lambda head: head[:4] == b"\x1aE\xdf\xa3", "a WebM/Matroska file"),
    # ADTS frames start with a 12-bit sync word and layer 0 (mp3 shares the sync word with a non-zero layer).
    (lambda head: head[:4] == b"ADIF" or (head[:1] == b"\xff" and head[1:2] != b"" and head[1] & 0xF6 == 0xF0),
     "an AAC file"),
)
_AV_EXTRA = "pip install -e '.[av]'"


def _av_container(path) -> str | None:
    """What `path` is when it is a container that libsndfile cannot read and PyAV can, else None."""
    with open(path, "rb") as f:
        head = f.read(12)
    return next((kind for matches, kind in _AV_CONTAINERS if matches(head)), None)


def _import_av(path, kind: str):
    try:
        import av
    except ImportError:
        raise _fail(path, f"is {kind}, which libsndfile cannot decode; install PyAV to read it ({_AV_EXTRA}) or "
                          "convert the file to wav/flac") from None
    return av


def _open(path):
    import soundfile  # imported here so that device-only code paths (features, encoder) need no libsndfile

    try:
        return soundfile.SoundFile(path)
    except soundfile.LibsndfileError as err:
        # For bytes it cannot parse as mp3, libsndfile says the file does not exist; it does (`_check_path`).
        problem = "not a format it recognises, or corrupt" if "does not exist" in err.error_string \
            else err.error_string
        raise _fail(path, f"cannot be decoded as audio ({problem}); convert it to wav/flac/ogg/mp3") from None
    except RuntimeError as err:  # older soundfile versions raise RuntimeError
        raise _fail(path, f"cannot be decoded as audio ({err}); convert it to wav/flac/ogg/mp3") from None


def _open_av(av, path, kind: str):
    """`(container, its first audio stream)` through PyAV; the caller closes the container."""
    try:
        container = av.open(path)
    except av.FFmpegError as err:
        raise _fail(path, f"is {kind} that cannot be decoded ({err.strerror}); re-export the file") from None
    if not container.streams.audio:
        container.close()
        raise _fail(path, f"is {kind} without an audio stream; pass a file that holds audio")
    return container, container.streams.audio[0]


def check_readable(path) -> None:
    """Raises the `AudioError` that loading `path` would raise for problems its header shows (missing, a folder,
    empty, not audio, cut off), without decoding the samples: a quick check of many files."""
    path = os.fspath(path)
    _check_path(path)
    _check_not_cut_off(path)
    kind = _av_container(path)
    container = _open_av(_import_av(path, kind), path, kind)[0] if kind else _open(path)
    container.close()


def _decode_soundfile(path, start_seconds: float, max_seconds: float | None) -> tuple[np.ndarray, int, int]:
    """`(samples (frames, channels) float64, sample rate, frames in the file after the start)`."""
    import soundfile

    with _open(path) as f:
        file_rate = f.samplerate
        start = int(start_seconds * file_rate)
        if start and not 0 < start < f.frames:
            raise _fail(path, f"audio_start {start_seconds} s is outside the file ({f.frames / file_rate:.2f} s); "
                              "fix the manifest item")
        if start:
            f.seek(start)
        total_frames = f.frames - start
        wanted = total_frames if max_seconds is None else min(total_frames, int(max_seconds * file_rate))
        try:
            data = f.read(frames=wanted, dtype="float64", always_2d=True)
        except (soundfile.LibsndfileError, RuntimeError) as err:
            raise _fail(path, f"is corrupt or truncated and could not be decoded ({err}); re-export the file") from None
    # libsndfile only estimates an mp3's length (encoder padding), so a short read is an error for other formats only.
    if 0 < data.shape[0] < wanted and not path.lower().endswith(".mp3"):
        raise _fail(path, f"is truncated: the header promises {wanted} frames but only {data.shape[0]} decode; "
                          "re-export or re-download the file")
    return data, file_rate, total_frames


def _decode_av(path, kind: str, start_seconds: float, max_seconds: float | None) -> tuple[np.ndarray, int, int]:
    """`_decode_soundfile` for the containers PyAV reads. Decoding stops once `max_seconds` are in; the length of
    the rest then comes from the container's header (an estimate, as for mp3)."""
    av = _import_av(path, kind)
    container, stream = _open_av(av, path, kind)
    rate = stream.rate
    start = int(start_seconds * rate)
    stop = None if max_seconds is None else start + int(max_seconds * rate)
    to_double = av.AudioResampler(format="dblp")  # only the sample format changes: exact, no resampling
    parts, decoded = [], 0
    with container:
        header_frames = round(container.duration * rate / av.time_base) if container.duration else 0
        try:
            for frame in container.decode(stream):
                parts += [converted.to_ndarray() for converted in to_double.resample(frame)]
                decoded = sum(part.shape[1] for part in parts)
                if stop is not None and decoded >= stop:
                    break
            else:  # decoded to the end: the length is exact
                parts += [converted.to_ndarray() for converted in to_double.resample(None)]
                decoded = header_frames = sum(part.shape[1] for part in parts)
        except av.FFmpegError as err:
            raise _fail(path, f"is {kind} that is corrupt or truncated ({err.strerror}); re-export the file") from None
    if start and not 0 < start < decoded:
        raise _fail(path, f"audio_start {start_seconds} s is outside the file ({decoded / rate:.2f} s); "
                          "fix the manifest item")
    data = np.concatenate(parts, axis=1).T if parts else np.zeros((0, stream.channels))
    return data[start:stop], rate, max(decoded, header_frames) - start


def resample(samples: np.ndarray, orig_rate: int, target_rate: int) -> np.ndarray:
    """soxr's HQ resampler, called exactly as `librosa.resample(samples, orig_sr=..., target_sr=...,
    res_type="soxr_hq")` calls it (the same samples, bit for bit), without importing librosa, whose numba start-up
    takes seconds. As librosa, the result is cut or zero-padded to ceil(length * target / orig) samples."""
    import soxr

    if orig_rate == target_rate:
        return samples
    length = int(np.ceil(len(samples) * (float(target_rate) / orig_rate)))  # librosa's float arithmetic
    out = soxr.resample(samples, orig_rate, target_rate, quality="soxr_hq")[:length]
    return np.pad(out, (0, length - len(out))).astype(samples.dtype, copy=False)


def read_audio(path, *, max_seconds: float | None = None, sample_rate: int = 16000,
               start_seconds: float = 0.0) -> tuple[np.ndarray, float]:
    """Decodes `path` into mono float64 at `sample_rate`, peak-normalised as the original
    (docs/original.md#audio-loading).
    Reading starts `start_seconds` into the file (a manifest item's `audio_start`).

    Returns `(samples, total_seconds)`; `total_seconds` is the duration of the whole file, so callers can report
    what `max_seconds` dropped. Raises `AudioError` with one line naming the file and the problem.
    """
    path = os.fspath(path)
    _check_path(path)
    _check_not_cut_off(path)
    kind = _av_container(path)
    if kind:
        data, file_rate, total_frames = _decode_av(path, kind, start_seconds, max_seconds)
    else:
        data, file_rate, total_frames = _decode_soundfile(path, start_seconds, max_seconds)
    return _model_samples(data, file_rate, sample_rate, path, average=path.lower().endswith(".mp3")), \
        total_frames / file_rate


def _model_samples(data: np.ndarray, rate: int, sample_rate: int, name, average: bool) -> np.ndarray:
    """Decoded `(frames, channels)` audio at `rate` -> mono float64 at `sample_rate`, peak-normalised as the original
    does it for a file (`average`: mp3, whose channels the original averages)."""
    if data.shape[0] == 0:
        raise _fail(name, "contains no audio samples; re-export the file")
    if not np.isfinite(data).all():
        raise _fail(name, "contains NaN or infinite samples; fix the file (e.g. re-export it as 16-bit PCM)")
    if average:
        # The original decodes mp3 with pydub and averages the channels.
        mono = data.mean(axis=1)
    else:
        # Everything else is scaled into [-1, 1] when any channel exceeds it (by the peak over all channels, as the
        # original), then keeps only the first channel.
        peak = np.max(np.abs(data))
        mono = data[:, 0] / peak if peak > 1.0 else data[:, 0]
    return _peak_normalise(resample(mono, rate, sample_rate), name)


def _peak_normalise(x: np.ndarray, path) -> np.ndarray:
    """The original always rescales so the largest magnitude is 1; non-negative signals are mapped to [-1, 1]
    with a DC shift (docs/original.md#peak-normalisation). An all-zero signal stays zero instead of becoming NaN."""
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    if peak == 0.0:
        log.warning("%s: the audio is all zeros (silent); it is kept silent", path)
        return x.astype(np.float64)
    if np.min(x) >= 0:
        return 2.0 * x / peak - 1.0
    return x / max(abs(float(np.max(x))), abs(float(np.min(x))))


def int16_round_trip(x: np.ndarray) -> np.ndarray:
    """clip to [-1, 1], scale by 32767, truncate toward zero to int16, divide by 32767 (float64 math, float32 out),
    as the original (docs/original.md#int16-round-trip)."""
    q = (np.clip(x, -1.0, 1.0) * 32767.0).astype(np.int16)
    return (q / 32767.0).astype(np.float32)


def num_windows(num_samples: int, window_samples: int, max_windows: int) -> int:
    """Window count of a clip of `num_samples` (docs/original.md#windows, no overlap)."""
    if num_samples <= window_samples:
        return 1
    return min(max_windows, 1 + math.ceil((num_samples - window_samples) / window_samples))


def split_windows(samples: np.ndarray, *, window_samples: int, max_windows: int) -> tuple[np.ndarray, np.ndarray]:
    """Zero-pads `samples` to whole windows, applies the int16 round trip and cuts `(W, window_samples)`.

    Every window of the clip, a partly padded last one included, gets mask 1 (docs/original.md#padded-window-mask).
    """
    count = num_windows(len(samples), window_samples, max_windows)
    padded = np.zeros(count * window_samples, dtype=np.float64)
    kept = samples[: count * window_samples]
    padded[: len(kept)] = kept
    windows = int16_round_trip(padded).reshape(count, window_samples)
    return windows, np.ones((count,), dtype=np.float32)


def load_windows(path, max_windows: int = 12, *, config: AudioConfig = _DEFAULT_AUDIO,
                 start_seconds: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Loads an audio file as model input: `(W, 160000)` float32 windows and a `(W,)` float32 mask of ones.

    `max_windows` may be 1..30 (30 windows = 5 minutes); audio beyond it is dropped with a logged warning.
    """
    windows, mask, dropped = read_windows(path, max_windows, config=config, start_seconds=start_seconds)
    if dropped:
        log.warning("%s: %s", path, dropped_note(dropped, max_windows, config))
    return windows, mask


def read_windows(path, max_windows: int = 12, *, config: AudioConfig = _DEFAULT_AUDIO,
                 start_seconds: float = 0.0) -> tuple[np.ndarray, np.ndarray, float]:
    """`load_windows` that says instead of logging it: `(windows, mask, seconds of audio dropped past max_windows)`."""
    check_max_windows(max_windows)
    limit_seconds = max_windows * config.window_seconds
    samples, total_seconds = read_audio(path, max_seconds=limit_seconds, sample_rate=config.sample_rate,
                                        start_seconds=start_seconds)
    dropped = total_seconds - limit_seconds if total_seconds > limit_seconds + 1e-6 else 0.0
    return (*split_windows(samples, window_samples=config.window_samples, max_windows=max_windows), dropped)


def dropped_note(dropped_seconds: float, max_windows: int, config: AudioConfig = _DEFAULT_AUDIO) -> str:
    """What was cut from a clip longer than `max_windows` windows, in one phrase."""
    kept = max_windows * config.window_seconds
    window = "1 window" if max_windows == 1 else f"{max_windows} windows"
    return (f"{kept + dropped_seconds:.1f} s of audio is longer than max_windows={max_windows} ({window} of "
            f"{config.window_seconds:g} s); the last {dropped_seconds:.1f} s were dropped")


def waveform_windows(waveform: dict, max_windows: int = 12, *, config: AudioConfig = _DEFAULT_AUDIO
                     ) -> tuple[np.ndarray, np.ndarray]:
    """`{"array": samples, "sampling_rate": rate}` (the Hugging Face convention: 1-D mono, or `(channels, samples)`,
    of which the first channel is kept, as for a file other than mp3) as model input, through exactly a file's
    resampling, normalisation, int16 round trip and windows (`load_windows`)."""
    if not isinstance(waveform, dict) or set(waveform) != {"array", "sampling_rate"}:
        raise AudioError(f"a waveform is {{'array': samples, 'sampling_rate': rate}}, got {_shown(waveform)}")
    rate = waveform["sampling_rate"]
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or rate < 1:
        raise AudioError(f"a waveform's sampling_rate must be a positive integer, got {rate!r}")
    array = np.asarray(waveform["array"], dtype=np.float64)
    if array.ndim not in (1, 2):
        raise AudioError(f"a waveform's array must be 1-D (mono) or (channels, samples), got shape {array.shape}")
    data = array[:, None] if array.ndim == 1 else array.T
    check_max_windows(max_windows)
    limit_seconds = max_windows * config.window_seconds
    if data.shape[0] > limit_seconds * rate:
        log.warning("the waveform: %s", dropped_note(data.shape[0] / rate - limit_seconds, max_windows, config))
        data = data[:int(limit_seconds * rate)]
    samples = _model_samples(data, int(rate), config.sample_rate, "the waveform", average=False)
    return split_windows(samples, window_samples=config.window_samples, max_windows=max_windows)


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def collate_windows(items: Sequence[tuple[np.ndarray, np.ndarray]],
                    pad_to: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Stacks per-clip `(windows, mask)` pairs into `(B, L, S)` / `(B, L)`, padding with all-zero windows of mask 0.

    `pad_to` fixes L (for shape bucketing); by default it is the largest window count in the batch.
    """
    if not items:
        raise ValueError("collate_windows needs at least one clip")
    longest = max(w.shape[0] for w, _ in items)
    target = longest if pad_to is None else pad_to
    if target < longest:
        raise ValueError(f"pad_to={target} is smaller than the longest clip ({longest} windows)")
    window_samples = items[0][0].shape[1]
    audio = np.zeros((len(items), target, window_samples), dtype=np.float32)
    mask = np.zeros((len(items), target), dtype=np.float32)
    for row, (windows, window_mask) in enumerate(items):
        audio[row, : windows.shape[0]] = windows
        mask[row, : windows.shape[0]] = window_mask
    return audio, mask
