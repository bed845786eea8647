import math
import shutil
import subprocess
import warnings

import librosa
import numpy as np
import pytest
import soundfile as sf

from af2_jax.audio import AudioError, AudioWarning, collate_windows, load_windows, num_windows, read_audio
from af2_jax.audio.io import int16_round_trip
from conftest import pygame_clip_dir

W = 160000


def _expected_windows(seconds, max_windows=12):
    return num_windows(int(round(seconds * 16000)), W, max_windows)


@pytest.mark.parametrize("samples, max_windows, expected", [
    (1, 12, 1), (W, 12, 1), (W + 1, 12, 2), (2 * W, 12, 2), (2 * W + 1, 12, 3), (12 * W, 12, 12),
    (12 * W + 5, 12, 12), (40 * W, 30, 30)])
def test_window_count_formula(samples, max_windows, expected):
    assert num_windows(samples, W, max_windows) == expected


def test_int16_round_trip_truncates_toward_zero():
    x = np.array([1.5, -1.5, 0.99999, -0.99999, 1.0 / 32767 * 0.999, -1.0 / 32767 * 0.999, 0.5], np.float64)
    q = int16_round_trip(x)
    assert q.dtype == np.float32
    np.testing.assert_array_equal(q * 32767, np.float32([32767, -32767, 32766, -32766, 0, 0, 16383]))


def _reference_pipeline(path, channel_mix):
    """The original's recipe written out with the libraries directly (AF2_SPEC 2.1-2.2)."""
    data, rate = sf.read(str(path), dtype="float64", always_2d=True)
    if np.max(np.abs(data)) > 1 and channel_mix is not _mean:  # the peak over all channels
        data = data / np.max(np.abs(data))
    y = channel_mix(data)
    if rate != 16000:
        y = librosa.resample(y, orig_sr=rate, target_sr=16000, res_type="soxr_hq")
    y = 2 * y / np.max(np.abs(y)) - 1 if y.min() >= 0 else y / max(abs(y.max()), abs(y.min()))
    count = max(1, math.ceil(len(y) / W))
    padded = np.zeros(count * W)
    padded[: len(y)] = y
    return int16_round_trip(padded).reshape(count, W)


def _first(data):
    return data[:, 0]


def _mean(data):
    return data.mean(axis=1)


@pytest.mark.parametrize("name, mix, seconds", [
    ("speech", _first, None), ("stereo", _first, 3.0), ("stereo_mp3", _mean, None), ("long25", _first, 25.0)])
def test_real_files_match_librosa_soxr_pipeline(audio_files, name, mix, seconds):
    path = audio_files[name]
    windows, mask = load_windows(path)
    info = sf.info(str(path))
    expected_count = _expected_windows(seconds if seconds is not None else info.duration)
    assert windows.shape == (expected_count, W) and windows.dtype == np.float32
    np.testing.assert_array_equal(mask, np.ones(expected_count, np.float32))
    np.testing.assert_array_equal(windows, _reference_pipeline(path, mix))
    assert np.max(np.abs(windows)) == pytest.approx(1.0, abs=1e-4)


def test_speech_is_resampled_from_22050(audio_files):
    assert sf.info(str(audio_files["speech"])).samplerate == 22050
    samples, seconds = read_audio(audio_files["speech"])
    assert len(samples) == pytest.approx(seconds * 16000, abs=2)


def test_stereo_uses_the_first_channel_and_mp3_averages(audio_files):
    left = _reference_pipeline(audio_files["stereo"], _first)
    right = _reference_pipeline(audio_files["stereo"], lambda d: d[:, 1])
    windows, _ = load_windows(audio_files["stereo"])
    assert np.array_equal(windows, left) and not np.allclose(windows, right, atol=1e-2)
    mp3, _ = load_windows(audio_files["stereo_mp3"])
    first = _reference_pipeline(audio_files["stereo_mp3"], _first)
    assert not np.allclose(mp3, first, atol=1e-2)


def test_six_minutes_are_cut_to_thirty_windows_with_a_warning(audio_files):
    with pytest.warns(AudioWarning, match=r"360\.0 s .* max_windows=30 .* last 60\.0 s were dropped"):
        windows, mask = load_windows(audio_files["six_minutes"], max_windows=30)
    assert windows.shape == (30, W) and mask.sum() == 30
    with pytest.warns(AudioWarning, match="last 240.0 s were dropped"):
        windows, _ = load_windows(audio_files["six_minutes"])
    assert windows.shape == (12, W)
    with pytest.raises(ValueError, match="outside 1..30"):
        load_windows(audio_files["six_minutes"], max_windows=31)


@pytest.mark.parametrize("clip", ["boom.wav", "car_door.wav", "punch.wav", "whiff.wav", "secosmic_lo.wav",
                                  "house_lo.wav", "house_lo.flac", "house_lo.ogg", "house_lo.mp3", "house_lo.opus"])
def test_pygame_clips(clip):
    path = pygame_clip_dir() / clip
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        windows, mask = load_windows(path)
    info = sf.info(str(path))
    assert windows.shape == (_expected_windows(info.duration), W)
    np.testing.assert_array_equal(mask, 1.0)
    assert np.isfinite(windows).all()
    used = int(round(info.duration * 16000))
    assert np.max(np.abs(windows.reshape(-1)[:used])) == pytest.approx(1.0, abs=1e-4)
    assert not windows.reshape(-1)[used + 16:].any()  # zero padding after the clip
    if clip == "house_lo.flac":
        np.testing.assert_array_equal(windows, load_windows(pygame_clip_dir() / "house_lo.wav")[0])


def test_silence_stays_silent_with_a_warning(audio_files):
    with pytest.warns(AudioWarning, match="all zeros"):
        windows, mask = load_windows(audio_files["silence"])
    assert windows.shape == (1, W) and not windows.any() and mask.tolist() == [1.0]


def test_non_negative_signal_gets_the_original_dc_shift(audio_files):
    raw, _ = sf.read(str(audio_files["positive"]), dtype="float64")  # 0.5 + 0.25 sin: all positive
    samples, _ = read_audio(audio_files["positive"])
    np.testing.assert_allclose(samples, 2 * raw / raw.max() - 1)
    assert samples.min() == pytest.approx(-1 / 3, abs=1e-6) and samples.max() == 1.0


def test_collation_pads_with_masked_zero_windows():
    a = (np.ones((2, W), np.float32), np.ones(2, np.float32))
    b = (np.full((1, W), 0.5, np.float32), np.ones(1, np.float32))
    audio, mask = collate_windows([a, b])
    assert audio.shape == (2, 2, W)
    np.testing.assert_array_equal(mask, [[1, 1], [1, 0]])
    assert not audio[1, 1].any() and (audio[1, 0] == 0.5).all()
    audio, mask = collate_windows([a, b], pad_to=4)
    assert audio.shape == (2, 4, W) and mask.sum() == 3
    with pytest.raises(ValueError, match="smaller than the longest clip"):
        collate_windows([a, b], pad_to=1)


def _bad_files(tmp_path, audio_files):
    text = tmp_path / "notes.wav"
    text.write_text("this is not audio\n" * 50)
    truncated = tmp_path / "truncated.flac"
    data = audio_files["long25"].read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    truncated_wav = tmp_path / "truncated.wav"  # libsndfile reads what is there without a word
    sf.write(str(truncated_wav), np.full(16000, 0.25, np.float32), 16000, subtype="PCM_16")
    data = truncated_wav.read_bytes()
    truncated_wav.write_bytes(data[: len(data) // 2])
    truncated_aiff = tmp_path / "truncated.aiff"
    sf.write(str(truncated_aiff), np.full(16000, 0.25, np.float32), 16000, subtype="PCM_16")
    data = truncated_aiff.read_bytes()
    truncated_aiff.write_bytes(data[: len(data) // 2])
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    no_frames = tmp_path / "no_frames.wav"
    sf.write(str(no_frames), np.zeros((0,), np.float32), 16000)
    nan = tmp_path / "nan.wav"
    sf.write(str(nan), np.full(16000, np.nan, np.float32), 16000, subtype="FLOAT")
    return {
        "missing": (tmp_path / "nope.wav", "no such file"),
        "directory": (tmp_path, "is a directory"),
        "text": (text, "cannot be decoded as audio"),
        "truncated": (truncated, "truncated|corrupt"),
        "truncated_wav": (truncated_wav, "is truncated: its header promises 32000 bytes"),
        "truncated_aiff": (truncated_aiff, "is truncated"),
        "empty": (empty, "is empty"),
        "no_frames": (no_frames, "contains no audio samples"),
        "nan": (nan, "NaN"),
    }


@pytest.mark.parametrize("case", ["missing", "directory", "text", "truncated", "truncated_wav", "truncated_aiff",
                                  "empty", "no_frames", "nan"])
def test_bad_input_gives_one_clear_line(tmp_path, audio_files, case):
    path, problem = _bad_files(tmp_path, audio_files)[case]
    with pytest.raises(AudioError, match=problem) as err:
        load_windows(path)
    message = str(err.value)
    assert str(path) in message and "\n" not in message


def test_sox_is_available_for_these_tests():
    assert shutil.which("sox") and shutil.which("espeak-ng")
    assert subprocess.run(["sox", "--version"], capture_output=True).returncode == 0

