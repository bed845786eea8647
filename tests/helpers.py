"""What the tests, their subprocess checks (tests/*_check.py) and the benchmarks (bench/) share: the golden fixtures,
real audio made on this machine, small models and training configs, and the comparisons parity tests make.

Plain functions and classes: the pytest fixtures built from them live in tests/conftest.py, which also sets up the
test session (a throwaway AF2_JAX_HOME, float32 parity mode). Importing this module changes nothing and does not
import JAX, so a check script can still set XLA_FLAGS after importing it. Scripts outside pytest import it as
`tests.helpers` with the repository root on sys.path.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

# --- golden fixtures -----------------------------------------------------------------------------------------------
# Found through AF2_FIXTURES (default: the repository's tests/fixtures). Every folder in it with a config.json is a
# fixture, so parity tests cover new ones.
IN_REPO_FIXTURES = REPO / "tests" / "fixtures"
FIXTURES = Path(os.environ.get("AF2_FIXTURES", IN_REPO_FIXTURES)).resolve()
FIXTURE_DIRS = sorted(p for p in FIXTURES.iterdir() if (p / "config.json").is_file()) if FIXTURES.is_dir() else []
SHAPE_MAPS = sorted(FIXTURES.glob("af2_*_shapes.json"))


def fixture_set_problem() -> str | None:
    """Why FIXTURES cannot be tested (one line naming the fix), or None. A missing folder fails the run; it is never
    a skip."""
    if not FIXTURES.is_dir():
        if "AF2_FIXTURES" in os.environ:
            return (f"AF2_FIXTURES={FIXTURES} is not a folder: point it at a folder of golden fixtures, or unset it "
                    f"to use {IN_REPO_FIXTURES}")
        return (f"the golden fixtures folder {FIXTURES} is missing: restore it with git checkout -- tests/fixtures, "
                "or set AF2_FIXTURES to a folder of golden fixtures")
    if not FIXTURE_DIRS:
        return (f"AF2_FIXTURES={FIXTURES} holds no fixture folder with a config.json: point it at a folder of golden "
                f"fixtures, or unset it to use {IN_REPO_FIXTURES}")
    if not SHAPE_MAPS:  # an empty parametrisation would skip every shape-map test without a word
        return (f"AF2_FIXTURES={FIXTURES} holds no af2_*_shapes.json release shape map: copy them from "
                f"{IN_REPO_FIXTURES}, or unset AF2_FIXTURES to use that folder")
    return None


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
    """One golden fixture folder: its config, inputs and outputs, loaded lazily. `scratch` is where files derived
    from it (the released layout) are written."""

    def __init__(self, path: Path, scratch: Path):
        self.path = path
        self.name = path.name
        self.scratch = scratch
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
        metadata.json (one copy of the weights in git), so the chunks are written from model.safetensors into
        `scratch` on first use."""
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
                                                      self.scratch / "releases" / self.name)
        return self._release

    @property
    def reference(self):
        """Our PyTorch reference (tests/reference) with this fixture's weights, built once."""
        if self._reference is None:
            from af2_jax.checkpoint import SafetensorsCheckpoint
            from tests.reference import AF2Reference

            self._reference = AF2Reference(self.raw_config)
            self._reference.load_original(dict(SafetensorsCheckpoint(self.weights).items()))
        return self._reference


def is_layered(path: str) -> bool:
    """Whether a parameter path of a stacked `AF2Model` holds all LM layers on a leading axis: the key map then
    addresses it per layer, as `path[i]`."""
    from af2_jax.checkpoint.keymap import to_source

    return to_source(f"{path}[0]") is not None


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


def _run_tool(*cmd):
    tool = shutil.which(cmd[0])
    if tool is None:
        raise RuntimeError(f"{cmd[0]} is missing; install the Debian packages espeak-ng sox libsox-fmt-all")
    subprocess.run(cmd, check=True, capture_output=True)


def make_audio_files(folder: Path) -> dict[str, Path]:
    """Real recordings and synthesised files in `folder`: speech, stereo (wav and mp3), 25 s, six minutes, silence,
    and a signal that never goes below zero."""
    import soundfile

    files = {
        "speech": folder / "speech.wav",
        "stereo": folder / "stereo.wav",
        "stereo_mp3": folder / "stereo.mp3",
        "long25": folder / "long25.flac",
        "six_minutes": folder / "six_minutes.ogg",
        "silence": folder / "silence.wav",
        "positive": folder / "positive.wav",
    }
    _run_tool("espeak-ng", "-w", str(files["speech"]),
              "The quick brown fox jumps over the lazy dog near the river bank.")
    # Left: a 440 Hz tone, right: pink noise, so the channel policy is visible.
    _run_tool("sox", "-n", "-r", "44100", "-c", "2", str(files["stereo"]), "synth", "3", "sine", "440", "pinknoise",
              "gain", "-6")
    _run_tool("sox", "-n", "-r", "44100", "-c", "2", str(files["stereo_mp3"]), "synth", "4", "sine", "330", "sine",
              "880", "gain", "-6")
    _run_tool("sox", "-n", "-r", "16000", "-c", "1", str(files["long25"]), "synth", "25", "sine", "200-3000", "gain",
              "-3")
    _run_tool("sox", "-n", "-r", "8000", "-c", "1", str(files["six_minutes"]), "synth", "360", "brownnoise", "gain",
              "-10")
    soundfile.write(str(files["silence"]), np.zeros(32000, np.int16), 16000)
    t = np.arange(16000) / 16000
    soundfile.write(str(files["positive"]), 0.5 + 0.25 * np.sin(2 * np.pi * 100 * t), 16000, subtype="FLOAT")
    return files


# --- small models --------------------------------------------------------------------------------------------------
def write_small_checkpoint(path: Path, tokenizer) -> Path:
    """A small random-weight model with the real 151669-token vocabulary and `tokenizer` (AF2's), as an af2-jax
    checkpoint at `path`."""
    from flax import nnx

    import af2_jax
    from af2_jax.config import AF2Config, AudioTransformerConfig, HTSATConfig, LMConfig
    from af2_jax.nn.af2 import AF2Model

    config = AF2Config(
        htsat=HTSATConfig(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16)),
        audio_transformer=AudioTransformerConfig(d_model=128, n_heads=2, n_layers=2, d_inner=256),
        lm=LMConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2))
    af2_jax.save(AF2Model(config, rngs=nnx.Rngs(0)), path, tokenizer=tokenizer, dtype="float32")
    return path


def bench_small_config():
    """The benchmarks' small AF2 (the issue's): LM hidden 512, 8 layers, 8 heads / 2 KV, intermediate 1536, vocab
    151669, cross-attention at every layer, HTSAT embed 64 / depths 2-2-6-2, audio transformer 3 layers."""
    from af2_jax.config import AF2Config, AudioTransformerConfig, HTSATConfig, LMConfig

    return AF2Config(
        htsat=HTSATConfig(embed_dim=64, depths=(2, 2, 6, 2), num_heads=(2, 4, 8, 16)),
        audio_transformer=AudioTransformerConfig(d_model=512, n_heads=8, n_layers=3, d_inner=2048),
        lm=LMConfig(hidden_size=512, intermediate_size=1536, num_layers=8, num_heads=8, num_kv_heads=2),
    )


def build_pair(config, with_reference: bool, dtype):
    """The reference with random weights and the JAX model loaded from the same tensors (or JAX alone)."""
    if not with_reference:
        return random_model_from(config, dtype), None
    import tempfile

    import safetensors.numpy
    import torch

    from af2_jax.checkpoint import load_original
    from tests.reference import AF2Reference, original_schema

    torch.manual_seed(0)
    ref = AF2Reference(original_schema(config))
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape) / p.shape[-1] ** 0.5)
            elif "gate" in name:
                p.fill_(0.5)
        ref.clap.nvclap.bn0.running_mean.normal_(-40, 10)
        ref.clap.nvclap.bn0.running_var.uniform_(100, 400)
    ref.eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "weights.safetensors"
        safetensors.numpy.save_file({k: v.detach().numpy() for k, v in ref.state_dict().items()}, str(path))
        model = load_original(path, config, dtype=dtype, param_dtype=dtype)
    return model, ref


def random_model_from(config, dtype):
    """An AF2Model of `config` with random weights scaled to keep activations finite (no reference)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from af2_jax.nn.af2 import AF2Model

    abstract = nnx.eval_shape(lambda: AF2Model(config, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    key = jax.random.key(0)
    for n, (_, var) in enumerate(nnx.to_flat_state(state)):
        shape = var.shape
        if isinstance(var, nnx.BatchStat):
            value = jnp.ones(shape, jnp.float32) * (100.0 if len(shape) else 1.0)
        elif len(shape) >= 2:
            value = jax.random.normal(jax.random.fold_in(key, n), shape, jnp.float32) / np.sqrt(shape[-1])
        else:
            value = jnp.ones(shape, jnp.float32)
        var.set_value(value.astype(var.dtype))
    return nnx.merge(graphdef, state)


# --- training ------------------------------------------------------------------------------------------------------
def write_tone_dataset(root: Path, per_split: int = 8) -> Path:
    """A tiny sound-QA set in the original manifest format: sine tones, "is the tone low or high?"."""
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


def read_events(folder) -> dict:
    """What TensorBoard shows of a run folder: {"scalars": {tag: [(step, value)]}, "texts": {tag: [(step,
    markdown)]}, "hparams": {key: value}}."""
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.plugins.hparams import metadata as hparams_metadata

    events = event_accumulator.EventAccumulator(str(folder), size_guidance={event_accumulator.SCALARS: 0,
                                                                            event_accumulator.TENSORS: 0})
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    texts = {tag.removesuffix("/text_summary"): [(e.step, e.tensor_proto.string_val[0].decode())
                                                 for e in events.Tensors(tag)]
             for tag in _plugin_tags(events, "text")}
    hparams = {}
    for content in _plugin_tags(events, "hparams").values():
        for key, value in hparams_metadata.parse_session_start_info_plugin_data(content).hparams.items():
            hparams[key] = getattr(value, value.WhichOneof("kind"))
    return {"scalars": scalars, "texts": texts, "hparams": hparams}


def _plugin_tags(events, plugin: str) -> dict:
    try:
        return events.PluginTagToContent(plugin)
    except KeyError:  # nothing of that plugin in the folder
        return {}


# --- child processes -----------------------------------------------------------------------------------------------
class ChildProcesses:
    """Commands run one at a time in a background thread, in the order they were started, while the tests before
    the ones that read their results go on in this process. A test that is about a child process (several devices,
    a fresh interpreter) mostly waits on it; on a machine with a second core that wait overlaps the tests before it
    instead of adding to them. The commands run at a lower priority (nice 10): they take the cores the tests here
    leave idle without slowing those tests, which are the ones the session waits for.

    `start(key, commands)` submits `commands` once per `key` and returns Futures of their
    `subprocess.CompletedProcess` (stdout and stderr as text); a command still running at `close` is killed."""

    def __init__(self, timeout: float, env: dict):
        self._timeout, self._env = timeout, env
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="child-processes")
        self._started: dict[str, list[Future]] = {}
        self._running: set[subprocess.Popen] = set()
        self._lock = threading.Lock()

    def start(self, key: str, commands: list[list]) -> list[Future]:
        if key not in self._started:
            self._started[key] = [self._executor.submit(self._run, [str(a) for a in command])
                                  for command in commands]
        return self._started[key]

    def _run(self, command: list[str]) -> subprocess.CompletedProcess:
        with subprocess.Popen(["nice", "-n", "10", *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=self._env) as process:
            with self._lock:
                self._running.add(process)
            try:
                stdout, stderr = process.communicate(timeout=self._timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.communicate()
                raise
            finally:
                with self._lock:
                    self._running.discard(process)
        return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            for process in self._running:
                process.kill()


HELD_OUT_PER_TASK = 8  # the demo set's held-out items per task the default suite answers


def demo_data_generator():
    """train/make_demo_data.py as a module (it is a recipe script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("make_demo_data", REPO / "train" / "make_demo_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_demo_held_out(folder: Path, per_task: int = HELD_OUT_PER_TASK) -> list[str]:
    """The first `per_task` items of each task's held-out split, regenerated with the demo split's own seeds, in
    the layout train/make_demo_data.py writes (folder/manifests/Name-Task/test.json, folder/audio/...). Returns
    the task names."""
    generator = demo_data_generator()
    for number, task in enumerate(generator.TASKS):
        generator.write_split(folder, task, "test", per_task, 500 + number, str(folder))
    return list(generator.TASKS)
