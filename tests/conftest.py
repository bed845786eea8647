"""Shared test setup: a throwaway AF2_JAX_HOME, float32 parity mode, the golden fixtures, and real audio made on this
machine.

Fixtures are found through AF2_FIXTURES (default: the repository's tests/fixtures). A missing folder fails the run;
it is never a skip. Every folder in it with a config.json is a fixture, so parity tests cover new ones.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# What the CLIs keep between runs (converted releases, compiled programs) goes to a folder of this session, never the
# user's ~/.cache, whatever the environment says. Set before JAX is imported, because JAX reads
# JAX_COMPILATION_CACHE_DIR once at import; subprocesses started by tests inherit both.
SESSION_ROOT = Path(tempfile.mkdtemp(prefix="af2_jax_tests_"))
atexit.register(shutil.rmtree, SESSION_ROOT, ignore_errors=True)
os.environ["AF2_JAX_HOME"] = str(SESSION_ROOT / "home")
os.environ["JAX_COMPILATION_CACHE_DIR"] = str(SESSION_ROOT / "home" / "xla")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import soundfile  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_enable_x64", False)

IN_REPO_FIXTURES = REPO / "tests" / "fixtures"
FIXTURES = Path(os.environ.get("AF2_FIXTURES", IN_REPO_FIXTURES)).resolve()

if not FIXTURES.is_dir():
    if "AF2_FIXTURES" in os.environ:
        raise pytest.UsageError(f"AF2_FIXTURES={FIXTURES} is not a folder: point it at a folder of golden fixtures, "
                                f"or unset it to use {IN_REPO_FIXTURES}")
    raise pytest.UsageError(f"the golden fixtures folder {FIXTURES} is missing: restore it with "
                            "git checkout -- tests/fixtures, or set AF2_FIXTURES to a folder of golden fixtures")
FIXTURE_DIRS = sorted(p for p in FIXTURES.iterdir() if (p / "config.json").is_file())
if not FIXTURE_DIRS:
    raise pytest.UsageError(f"AF2_FIXTURES={FIXTURES} holds no fixture folder with a config.json: point it at a "
                            f"folder of golden fixtures, or unset it to use {IN_REPO_FIXTURES}")
SHAPE_MAPS = sorted(FIXTURES.glob("af2_*_shapes.json"))
if not SHAPE_MAPS:  # an empty parametrisation would skip every shape-map test without a word
    raise pytest.UsageError(f"AF2_FIXTURES={FIXTURES} holds no af2_*_shapes.json release shape map: copy them from "
                            f"{IN_REPO_FIXTURES}, or unset AF2_FIXTURES to use that folder")


def write_released_layout(weights: Path, metadata: Path, aliases: dict[str, str], dst: Path) -> Path:
    """Writes `dst/safe_ckpt/`: `metadata` and one chunk for each of its entries, holding the tensors it names, taken
    from the single file `weights`. A name missing from `weights` is a second name of a tensor (`aliases`: alias ->
    the name kept in `weights`) and gets its twin's bytes, as in the released checkpoints."""
    import safetensors.numpy

    tensors = safetensors.numpy.load_file(str(weights))
    safe = dst / "safe_ckpt"
    safe.mkdir(parents=True)
    for chunk, names in json.loads(metadata.read_text()).items():
        missing = [n for n in names if n not in tensors and aliases.get(n) not in tensors]
        if missing:
            raise ValueError(f"{metadata}: {len(missing)} tensors of {chunk} (first {missing[0]}) are neither in "
                             f"{weights} nor aliases in config.json checkpoint_keys.aliases_dropped_from_file")
        safetensors.numpy.save_file({n: tensors[n] if n in tensors else tensors[aliases[n]] for n in names},
                                    str(safe / f"{chunk}.safetensors"))
    shutil.copyfile(metadata, safe / "metadata.json")
    return dst


class Fixture:
    """One golden fixture folder: its config, inputs and outputs, loaded lazily."""

    def __init__(self, path: Path):
        self.path = path
        self.name = path.name
        self.raw_config = json.loads((path / "config.json").read_text())
        self._inputs = self._outputs = self._reference = self._release = None

    @property
    def config(self):
        from af2_jax.config import AF2Config

        return AF2Config.from_original_config(self.raw_config)

    @property
    def inputs(self):
        if self._inputs is None:
            self._inputs = dict(np.load(self.path / "inputs.npz"))
        return self._inputs

    @property
    def outputs(self):
        if self._outputs is None:
            self._outputs = dict(np.load(self.path / "outputs.npz"))
        return self._outputs

    @property
    def weights(self) -> Path:
        return self.path / "model.safetensors"

    @property
    def release(self) -> Path:
        """These weights in the released repository's layout (`safe_ckpt/metadata.json` + chunks, aliases included).
        A fixture set that ships the chunks in `hf_repo/safe_ckpt/` is used as it is; the in-repo one keeps only
        metadata.json (one copy of the weights in git), so the chunks are written from model.safetensors into this
        session's folder on first use."""
        if self._release is None:
            shipped = self.path / "hf_repo"
            metadata = shipped / "safe_ckpt" / "metadata.json"
            if not metadata.is_file():
                raise FileNotFoundError(f"{metadata} is missing: every fixture needs hf_repo/safe_ckpt/metadata.json "
                                        "(tests/fixtures/README.md)")
            if any(metadata.parent.glob("*.safetensors")):
                self._release = shipped
            else:
                aliases = self.raw_config["checkpoint_keys"]["aliases_dropped_from_file"]
                self._release = write_released_layout(self.weights, metadata, aliases,
                                                      SESSION_ROOT / "releases" / self.name)
        return self._release

    @property
    def reference(self):
        """Our PyTorch reference (tests/reference) with this fixture's weights, built once per session."""
        if self._reference is None:
            from af2_jax.checkpoint import SafetensorsCheckpoint
            from reference import AF2Reference

            self._reference = AF2Reference(self.raw_config)
            self._reference.load_original(dict(SafetensorsCheckpoint(self.weights).items()))
        return self._reference


_LOADED = {p: Fixture(p) for p in FIXTURE_DIRS}


@pytest.fixture(params=FIXTURE_DIRS, ids=[p.name for p in FIXTURE_DIRS], scope="session")
def golden(request) -> Fixture:
    return _LOADED[request.param]


@pytest.fixture(params=SHAPE_MAPS, ids=[p.name for p in SHAPE_MAPS], scope="session")
def shape_map(request) -> dict:
    return json.loads(request.param.read_text())


def rel_err(actual, expected) -> float:
    """Max abs error relative to the max abs value of the expected array."""
    expected = np.asarray(expected, np.float64)
    return float(np.max(np.abs(np.asarray(actual, np.float64) - expected)) / np.max(np.abs(expected)))


def assert_log_mel_close(mel, expected) -> None:
    """The bound that describes a float32 log-mel against the original's: float32 STFT rounding alone moves the
    quietest bins (~125 dB below a clip's peak) by up to ~0.13 dB, while bins within 100 dB of the peak agree to a
    few hundredths. So: at most 0.1 dB within 100 dB of the clip's peak, at most 0.25 dB anywhere, mean at most
    1e-3 dB. `mel`, `expected`: (clips, windows, frames, bins)."""
    mel, expected = np.asarray(mel, np.float64), np.asarray(expected, np.float64)
    assert mel.shape == expected.shape, (mel.shape, expected.shape)
    err = np.abs(mel - expected)
    clip_peak = expected.max(axis=tuple(range(1, expected.ndim)), keepdims=True)
    loud = expected >= clip_peak - 100.0
    assert err[loud].max() <= 0.1, f"{err[loud].max()} dB within 100 dB of the peak"
    assert err.max() <= 0.25, f"{err.max()} dB"
    assert err.mean() <= 1e-3, f"mean {err.mean()} dB"


# --- real audio ------------------------------------------------------------------------------------------------
def pygame_clip_dir() -> Path:
    spec = importlib.util.find_spec("pygame")
    if spec is None:
        raise RuntimeError("pygame-ce is not installed; install the [test] extra")
    return Path(spec.submodule_search_locations[0]) / "examples" / "data"


def _run(*cmd):
    tool = shutil.which(cmd[0])
    if tool is None:
        raise RuntimeError(f"{cmd[0]} is missing; install the Debian packages espeak-ng sox libsox-fmt-all")
    subprocess.run(cmd, check=True, capture_output=True)


@pytest.fixture(scope="session")
def audio_files(tmp_path_factory) -> dict[str, Path]:
    """Real recordings and synthesised files, made once per session."""
    d = tmp_path_factory.mktemp("audio")
    files = {
        "speech": d / "speech.wav",
        "stereo": d / "stereo.wav",
        "stereo_mp3": d / "stereo.mp3",
        "long25": d / "long25.flac",
        "six_minutes": d / "six_minutes.ogg",
        "silence": d / "silence.wav",
        "positive": d / "positive.wav",
    }
    _run("espeak-ng", "-w", str(files["speech"]), "The quick brown fox jumps over the lazy dog near the river bank.")
    # Left: a 440 Hz tone, right: pink noise, so the channel policy is visible.
    _run("sox", "-n", "-r", "44100", "-c", "2", str(files["stereo"]), "synth", "3", "sine", "440", "pinknoise",
         "gain", "-6")
    _run("sox", "-n", "-r", "44100", "-c", "2", str(files["stereo_mp3"]), "synth", "4", "sine", "330", "sine", "880",
         "gain", "-6")
    _run("sox", "-n", "-r", "16000", "-c", "1", str(files["long25"]), "synth", "25", "sine", "200-3000", "gain", "-3")
    _run("sox", "-n", "-r", "8000", "-c", "1", str(files["six_minutes"]), "synth", "360", "brownnoise", "gain",
         "-10")
    soundfile.write(str(files["silence"]), np.zeros(32000, np.int16), 16000)
    t = np.arange(16000) / 16000
    soundfile.write(str(files["positive"]), 0.5 + 0.25 * np.sin(2 * np.pi * 100 * t), 16000, subtype="FLOAT")
    return files


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory):
    """A small random-weight model with the real 151669-token vocabulary and tokenizer, as an af2-jax checkpoint."""
    import af2_jax
    from af2_jax.config import AF2Config, AudioTransformerConfig, HTSATConfig, LMConfig
    from af2_jax.nn.af2 import AF2Model
    from flax import nnx

    config = AF2Config(
        htsat=HTSATConfig(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16)),
        audio_transformer=AudioTransformerConfig(d_model=128, n_heads=2, n_layers=2, d_inner=256),
        lm=LMConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2))
    path = tmp_path_factory.mktemp("ckpt") / "small"
    af2_jax.save(AF2Model(config, rngs=nnx.Rngs(0)), path, tokenizer=af2_jax.load_tokenizer(), dtype="float32")
    return path


def write_tone_dataset(root: Path, per_split: int = 8) -> Path:
    """A tiny sound-QA set in the original manifest format: sine tones, "is the tone low or high?"."""
    import json

    import soundfile

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        folder = root / "audio" / split
        folder.mkdir(parents=True, exist_ok=True)
        data = {}
        for index in range(per_split):
            high = bool(index % 2)
            t = np.arange(int(rng.uniform(0.5, 2.0) * 16000)) / 16000
            wave = 0.5 * np.sin(2 * np.pi * (rng.uniform(2000, 3000) if high else rng.uniform(200, 300)) * t)
            soundfile.write(folder / f"{index}.flac", wave.astype(np.float32), 16000)
            data[str(index)] = {"name": f"{index}.flac", "prompt": "Is the tone low or high?",
                                "output": "High" if high else "Low", "duration": len(t) / 16000}
        manifest = {"split": split, "split_path": f"audio/{split}", "flamingo_task": "Tones-PitchQA",
                    "total_num": per_split, "data": data}
        (root / "manifests" / "Tones-PitchQA").mkdir(parents=True, exist_ok=True)
        (root / "manifests" / "Tones-PitchQA" / f"{split}.json").write_text(json.dumps(manifest))
    return root


# A training config small enough for tests: small widths, the real tokenizer and vocabulary.
TINY_TRAIN_OVERRIDES = {
    "htsat": {"embed_dim": 8, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 4]},
    "audio_transformer": {"d_model": 64, "n_heads": 2, "n_layers": 1, "d_inner": 64},
    # Open gates: at the original's 0, tanh(0) = 0 cuts the audio path and every weight behind the gates (the audio
    # encoder, the audio transformer, the cross-attention weights) gets exactly zero gradient.
    "cross_attention": {"heads": 2, "dim_head": 16, "ff_mult": 1, "gate_init": 0.5},
    "lm": {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2},
    "audio": {"max_windows": 1},
}


def tiny_train_config(data_root: Path, out_dir: Path, **sections) -> dict:
    raw = {
        "model": {"init": "random", "overrides": TINY_TRAIN_OVERRIDES, "compute_dtype": "float32"},
        "data": {"dataset_file_root": str(data_root / "manifests"), "data_root": str(data_root),
                 "dataset_blending_config": {"Tones-PitchQA/train": {"weight": 1.0}},
                 "valid_dataset_config": {"Tones-PitchQA/test": True}, "max_tokens": 16, "max_num_window": 1},
        "optim": {"trainable": "full", "batch_size": 4, "learning_rate": 1e-3, "warmup_steps": 2,
                  "loss_positions": 4},
        "run": {"out_dir": str(out_dir), "steps": 6, "save_every": 3, "log_every": 1, "seed": 0},
    }
    for section, values in sections.items():
        raw[section].update(values)
    return raw
