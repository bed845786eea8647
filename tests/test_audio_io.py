import logging
import math
import os
import shutil
import subprocess
import sys
import warnings

import librosa
import numpy as np
import pytest
import soundfile as sf

from af2_jax.audio import AudioError, collate_windows, load_windows, num_windows, read_audio
from af2_jax.audio.io import check_readable, int16_round_trip, resample
from af2_jax.config import AudioConfig
from tests.helpers import REPO, pygame_clip_dir

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
    """The original's recipe written out with the libraries directly (docs/original.md#audio-loading, #windows)."""
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


def _audio_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name.startswith("af2_jax.audio") and r.levelno == logging.WARNING]


def test_six_minutes_are_cut_to_thirty_windows_with_a_warning(audio_files, caplog):
    windows, mask = load_windows(audio_files["six_minutes"], max_windows=30)
    assert windows.shape == (30, W) and mask.sum() == 30
    windows, _ = load_windows(audio_files["six_minutes"])
    assert windows.shape == (12, W)
    cut_30, cut_12 = _audio_warnings(caplog)
    assert cut_30 == (f"{audio_files['six_minutes']}: 360.0 s of audio is longer than max_windows=30 (30 windows of "
                      "10 s); the last 60.0 s were dropped")
    assert "max_windows=12 (12 windows of 10 s); the last 240.0 s were dropped" in cut_12
    with pytest.raises(ValueError, match="outside 1..30"):
        load_windows(audio_files["six_minutes"], max_windows=31)


@pytest.mark.parametrize("clip", ["boom.wav", "car_door.wav", "punch.wav", "whiff.wav", "secosmic_lo.wav",
                                  "house_lo.wav", "house_lo.flac", "house_lo.ogg", "house_lo.mp3", "house_lo.opus"])
def test_pygame_clips(clip, caplog):
    path = pygame_clip_dir() / clip
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        windows, mask = load_windows(path)
    assert not _audio_warnings(caplog)
    info = sf.info(str(path))
    assert windows.shape == (_expected_windows(info.duration), W)
    np.testing.assert_array_equal(mask, 1.0)
    assert np.isfinite(windows).all()
    used = int(round(info.duration * 16000))
    assert np.max(np.abs(windows.reshape(-1)[:used])) == pytest.approx(1.0, abs=1e-4)
    assert not windows.reshape(-1)[used + 16:].any()  # zero padding after the clip
    if clip == "house_lo.flac":
        np.testing.assert_array_equal(windows, load_windows(pygame_clip_dir() / "house_lo.wav")[0])


def test_silence_stays_silent_with_a_warning(audio_files, caplog):
    windows, mask = load_windows(audio_files["silence"])
    assert windows.shape == (1, W) and not windows.any() and mask.tolist() == [1.0]
    assert _audio_warnings(caplog) == [f"{audio_files['silence']}: the audio is all zeros (silent); it is kept silent"]


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



@pytest.mark.parametrize("rate", [8000, 11025, 22050, 44100, 48000, 16001])
def test_resampling_is_librosa_soxr_hq_bit_for_bit(rate):
    """read_audio calls soxr itself, as librosa.resample(res_type="soxr_hq") does, to spare librosa's import."""
    rng = np.random.default_rng(rate)
    for length in (1, 999, rate + 1, 3 * rate + 7):
        stereo = rng.standard_normal((length, 2))
        # what read_audio resamples: a channel of a (frames, channels) file, strided, or a scaled contiguous copy
        for samples in (stereo[:, 0], stereo[:, 0] / 3, stereo[:, 1].astype(np.float32)):
            ours = resample(samples, rate, 16000)
            theirs = librosa.resample(samples, orig_sr=rate, target_sr=16000, res_type="soxr_hq")
            assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, (rate, length)
            np.testing.assert_array_equal(ours, theirs)


_PYTHON_USER = """
import sys
from tqdm import tqdm
from af2_jax.audio import load_windows
from af2_jax.cli.common import setup_logging
from af2_jax.config import AudioConfig

demo = AudioConfig(window_seconds=3.0, max_windows=1)  # the demo model's audio: one 3 s window
load_windows(sys.argv[1], max_windows=1, config=demo)  # a Python user who set up no logging
setup_logging()  # a CLI, inside a progress bar
for _ in tqdm(range(1), file=sys.stderr):
    load_windows(sys.argv[1], max_windows=1, config=demo)
print(sorted({name.split(".")[0] for name in sys.modules} & {"librosa", "numba"}))
"""


def test_a_cut_clip_is_one_warning_line_and_loading_never_imports_librosa(tmp_path):
    """A 4 s clip at 44.1 kHz (resampled) for the demo model's one 3 s window: the warning is one line without
    source paths, for a Python user and inside a CLI's progress bar; and librosa (numba: seconds to import) never
    loads."""
    clip = tmp_path / "four_seconds.wav"
    sf.write(str(clip), 0.5 * np.sin(2 * np.pi * 440 * np.arange(4 * 44100) / 44100), 44100)
    run = subprocess.run([sys.executable, "-c", _PYTHON_USER, str(clip)], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
    message = (f"{clip}: 4.0 s of audio is longer than max_windows=1 (1 window of 3 s); the last 1.0 s were "
               "dropped")
    lines = [line for line in run.stderr.replace("\r", "\n").splitlines() if line.strip()]
    assert [line for line in lines if "dropped" in line] == [message, f"warning: {message}"], run.stderr
    assert not [line for line in lines if "io.py" in line or "Warning" in line], run.stderr


def _m4a_without_audio(tmp_path):
    path = tmp_path / "voice-note.m4a"
    path.write_bytes(b"\x00\x00\x00\x1cftypM4A \x00\x00\x02\x00isomiso2" + bytes(64))
    return path


def test_formats_libsndfile_cannot_read_name_the_av_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # as without PyAV installed: `import av` raises ImportError
    webm = tmp_path / "recording.webm"
    webm.write_bytes(b"\x1aE\xdf\xa3" + bytes(64))
    aac = tmp_path / "song.aac"
    aac.write_bytes(b"\xff\xf1\x50\x80" + bytes(64))
    for path, kind in ((_m4a_without_audio(tmp_path), "an MP4/M4A file"), (webm, "a WebM/Matroska file"),
                       (aac, "an AAC file")):
        expected = (f"{path}: is {kind}, which libsndfile cannot decode; install PyAV to read it "
                    "(pip install -e '.[av]') or convert the file to wav/flac")
        for read in (load_windows, check_readable):
            with pytest.raises(AudioError) as err:
                read(path)
            assert str(err.value) == expected


def test_pyav_decodes_m4a_and_webm(tmp_path, caplog):
    av = pytest.importorskip("av", reason="PyAV (the av extra) is not installed")
    t = np.arange(2 * 48000) / 48000
    stereo = np.stack([0.5 * np.sin(2 * np.pi * 440 * t), 0.5 * np.sin(2 * np.pi * 1800 * t)]).astype(np.float32)
    for name, container, codec in (("clip.m4a", "mp4", "aac"), ("clip.webm", "webm", "libopus")):
        path = tmp_path / name
        with av.open(str(path), "w", format=container) as out:
            stream = out.add_stream(codec, rate=48000, layout="stereo")
            for start in range(0, stereo.shape[1], 960):
                frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(stereo[:, start:start + 960]), format="fltp",
                                                   layout="stereo")
                frame.sample_rate, frame.pts = 48000, start
                out.mux(stream.encode(frame))
            out.mux(stream.encode(None))
        samples, seconds = read_audio(path)
        assert seconds == pytest.approx(2.0, abs=0.05) and len(samples) == pytest.approx(32000, abs=800), name
        spectrum = np.abs(np.fft.rfft(samples[4000:28000]))
        assert np.argmax(spectrum) * 16000 / 24000 == pytest.approx(440, abs=2), name  # the first channel
        windows, _ = load_windows(path, max_windows=1, config=AudioConfig(window_seconds=1.0))
        assert windows.shape == (1, 16000)
        assert "the last 1.0 s were dropped" in _audio_warnings(caplog)[-1]
        check_readable(path)
    with pytest.raises(AudioError, match="is an MP4/M4A file that cannot be decoded"):
        load_windows(_m4a_without_audio(tmp_path))
