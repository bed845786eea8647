"""What every command shares (af2_jax/cli/common.py): the exit-code table, the console scripts, the accelerator
extras, the one-line warning on a CPU-only jaxlib, and JAX's start-up noise muted without muting its warnings.

Each CLI's own bad argument / bad input pair lives here for convert, plan and audio; infer's and train's beside their
other tests (test_infer.py, test_metrics.py)."""

from __future__ import annotations

import importlib
import logging
import re
from importlib import metadata

import jax
import pytest

from af2_jax.cli import common as cli
from tests.helpers import FIXTURE_DIRS

COMMANDS = {name: f"af2_jax.cli.{name}"
            for name in ("infer", "convert", "train", "plan", "audio", "serve", "eval")}
# What `python -m af2_jax.X` runs: a shim over the command's module.
SHIMS = {"infer": "af2_jax.infer", "convert": "af2_jax.convert", "train": "af2_jax.train", "plan": "af2_jax.plan",
         "audio": "af2_jax.audio.__main__", "serve": "af2_jax.serve", "eval": "af2_jax.eval"}


def _requirements() -> list[str]:
    return metadata.requires("af2-jax") or []


def test_accelerator_extras_pin_the_core_jax():
    """`pip install -e '.[tpu]'` (or cuda, cuda12) installs jax's accelerator build of exactly the core pin."""
    core = next(r for r in _requirements() if re.fullmatch(r"jax==[\d.]+", r))
    version = core.split("==")[1]
    extras = metadata.metadata("af2-jax").get_all("Provides-Extra")
    for extra, jax_extra in [("tpu", "tpu"), ("cuda", "cuda13"), ("cuda12", "cuda12")]:
        assert extra in extras
        assert f'jax[{jax_extra}]=={version}; extra == "{extra}"' in _requirements()


def test_optional_extras_are_pinned_and_not_in_the_core():
    requirements = _requirements()
    for extra, package in [("hf", "transformers"), ("av", "av"), ("wandb", "wandb")]:
        pinned = [r for r in requirements if r.startswith(f"{package}==") and f'extra == "{extra}"' in r]
        assert pinned, f"extra {extra} does not pin {package}"
        assert not any(r.startswith(f"{package}==") and "extra" not in r for r in requirements)


def test_every_command_has_a_console_script_and_shows_the_exit_codes(capsys):
    scripts = {e.name: e.value for e in metadata.entry_points(group="console_scripts") if e.name.startswith("af2-")}
    assert scripts == {f"af2-{name}": f"{module}:main" for name, module in COMMANDS.items()}
    for name, module in COMMANDS.items():
        assert importlib.import_module(SHIMS[name]).main is importlib.import_module(module).main
        with pytest.raises(SystemExit) as done:
            importlib.import_module(module).main(["--help"])
        assert done.value.code == 0
        assert cli.EXIT_CODES in capsys.readouterr().out, module


@pytest.mark.parametrize("command, bad_argument, bad_input, message", [
    ("convert", ["--dtype", "int3", "src"], ["/nonexistent/release", "--dry-run"], "/nonexistent/release"),
    ("plan", ["--batch", "many"], ["--mesh", "tensor=two"], "mesh spec 'tensor=two'"),
    ("audio", ["x.wav", "--max-windows", "0"], ["/nonexistent/clip.wav"], "/nonexistent/clip.wav"),
    ("serve", ["--slots", "0"], ["--max-len", "40000"], "--max-len 40000 is over the model's 32768 positions"),
])
def test_exit_codes(command, bad_argument, bad_input, message, capsys):
    main = importlib.import_module(COMMANDS[command]).main
    with pytest.raises(SystemExit) as done:
        main(bad_argument)
    assert done.value.code == cli.EXIT_ARGUMENTS
    capsys.readouterr()
    assert main(bad_input) == cli.EXIT_INPUT
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_serve_refuses_a_multi_process_launch_in_one_line(monkeypatch, capsys):
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "host-a,host-b")
    assert importlib.import_module(COMMANDS["serve"]).main([]) == cli.EXIT_INPUT
    err = capsys.readouterr().err
    assert err.startswith("error: this is one process of a multi-process launch") and err.count("\n") == 1, err


def test_ctrl_c_is_130_and_says_what_is_kept(monkeypatch, capsys):
    import af2_jax.cli.convert

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(af2_jax.cli.convert, "inspect", interrupted)
    assert af2_jax.cli.convert.main(["some/release", "--dry-run"]) == cli.EXIT_INTERRUPTED
    assert "interrupted" in capsys.readouterr().err


@pytest.fixture
def gpu_visible_but_cpu_jaxlib(monkeypatch):
    """This host as it would look with a GPU and the CPU-only jaxlib: the probe sees a GPU, JAX computes on the
    CPU, and the user did not ask for the CPU by name (the suite runs with JAX_PLATFORMS=cpu, which means it)."""
    monkeypatch.setattr(cli, "visible_accelerators", lambda: ["an NVIDIA GPU"])
    platforms = jax.config.jax_platforms
    jax.config.update("jax_platforms", "")
    yield
    jax.config.update("jax_platforms", platforms)


def test_cpu_while_a_gpu_is_visible_is_one_warning_line(gpu_visible_but_cpu_jaxlib, caplog):
    with caplog.at_level(logging.WARNING, logger="af2_jax"):
        cli.warn_if_cpu_only()
    [record] = caplog.records
    assert "running on the CPU although an NVIDIA GPU is visible" in record.getMessage()
    assert ".[cuda]" in record.getMessage() and "\n" not in record.getMessage()


def test_the_cli_warns_through_the_shared_helper(gpu_visible_but_cpu_jaxlib, capsys):
    """plan, as every command, calls the helper once JAX is about to be used (its plan still prints)."""
    import af2_jax.plan

    code = af2_jax.plan.main(["--model", str(FIXTURE_DIRS[0] / "config.json"), "--no-compile"])
    assert code == 0
    err = capsys.readouterr().err
    assert err.count("running on the CPU although an NVIDIA GPU is visible") == 1, err


def test_cpu_asked_for_by_name_or_no_accelerator_is_silent(gpu_visible_but_cpu_jaxlib, monkeypatch, caplog):
    with caplog.at_level(logging.WARNING, logger="af2_jax"):
        jax.config.update("jax_platforms", "cpu")  # JAX_PLATFORMS=cpu: the user means it
        cli.warn_if_cpu_only()
        jax.config.update("jax_platforms", "")
        monkeypatch.setattr(cli, "visible_accelerators", lambda: [])
        cli.warn_if_cpu_only()
    assert not caplog.records


def test_jax_start_up_noise_is_muted_but_its_warnings_pass():
    noise = cli._JaxStartupNoise()

    def record(level, message):
        return logging.LogRecord("jax._src.xla_bridge", level, __file__, 1, message, None, None)

    assert not noise.filter(record(logging.INFO, "Unable to initialize backend 'tpu': not found"))
    assert not noise.filter(record(logging.WARNING, "An NVIDIA GPU may be present on this machine, but a "
                                                    "CUDA-enabled jaxlib is not installed. Falling back to cpu."))
    assert noise.filter(record(logging.WARNING, "CUDA backend failed to initialize: out of memory."))
