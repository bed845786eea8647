"""What every command-line entry point shares: its name, logging, the exit-code table, the accelerator check, and
turning the package's errors into one line and an exit code.

Each `af2_jax.cli.<command>` module keeps its own parser and hands its work to the library; these helpers give every
command the same behaviour around them, so a rule here (which log lines are noise, what Ctrl-C returns) has one owner.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("af2_jax")

# The one exit-code table (every --help and the README show it).
EXIT_CODES = """\
Exit codes:
  0    done (also a planned stop on SIGTERM: training saves a checkpoint first)
  1    an input, item, config file or key=value could not be used, or the plan does not fit (one-line error)
  2    bad command-line arguments
  130  interrupted by Ctrl-C (SIGINT)"""
EXIT_INPUT, EXIT_ARGUMENTS, EXIT_INTERRUPTED = 1, 2, 130


def prog(command: str) -> str:
    """The name the user typed: `af2-infer` through the console script, `python -m af2_jax.infer` otherwise."""
    script = os.path.basename(sys.argv[0]) if sys.argv else ""
    return script if script.startswith("af2-") else f"python -m af2_jax.{command}"


class _TqdmSafeHandler(logging.StreamHandler):
    """Writes log lines through `tqdm.write`, so a line logged while a progress bar is drawn appears above the bar
    instead of inside one of its frames."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001  (logging must never raise; this is what StreamHandler does too)
            self.handleError(record)


class _JaxStartupNoise(logging.Filter):
    """Drops what JAX logs while looking for backends that are not there ("Unable to initialize backend 'tpu'",
    INFO) and its "GPU/TPU may be present" warning, which `warn_if_cpu_only` replaces with one line naming the fix.
    Every other JAX warning passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return False
        return "may be present on this machine" not in record.getMessage()


class _LevelPrefix(logging.Formatter):
    """Marks warnings and errors (`warning: ...`) when the format does not show the level itself. Python warnings
    arrive already marked by `_one_line_warning`."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING and record.name != "py.warnings" and "levelname" not in self._fmt:
            return f"{record.levelname.lower()}: {text}"
        return text


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}"  # logged through captureWarnings, which ends the line


def setup_logging(fmt: str = "%(message)s", level: int = logging.INFO) -> None:
    """Logs to stderr through tqdm; Python warnings become one `warning: ...` line without source paths; JAX's
    backend-probing noise is dropped (only that: its other warnings stay); absl (Orbax) and matplotlib (the eval
    report's chart) speak from WARNING up."""
    handler = _TqdmSafeHandler(sys.stderr)
    handler.setFormatter(_LevelPrefix(fmt))
    root = logging.getLogger()
    for earlier in [h for h in root.handlers if isinstance(h, _TqdmSafeHandler)]:  # main() called again
        root.removeHandler(earlier)
    root.addHandler(handler)  # other handlers stay (a host application's, pytest's)
    root.setLevel(level)
    logging.getLogger("absl").setLevel(logging.WARNING)
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    bridge = logging.getLogger("jax._src.xla_bridge")
    if not any(isinstance(f, _JaxStartupNoise) for f in bridge.filters):
        bridge.addFilter(_JaxStartupNoise())
    warnings.simplefilter("default")
    warnings.formatwarning = _one_line_warning
    logging.captureWarnings(True)


def visible_accelerators() -> list[str]:
    """Accelerators the host shows (device files, PCI ids), whether or not the installed jaxlib can use them."""
    from jax._src import hardware_utils  # JAX's own probe: the same one behind its "may be present" warning

    seen = []
    if hardware_utils.has_visible_nvidia_gpu():
        seen.append("an NVIDIA GPU")
    if hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0:
        seen.append("a Google TPU")
    return seen


def warn_if_cpu_only() -> None:
    """One warning line when JAX computes on the CPU while a GPU or TPU is visible: the jaxlib installed cannot use
    it (the CPU-only default), and every step would run 10-100x slower than the user expects."""
    import jax

    if jax.default_backend() != "cpu" or (jax.config.jax_platforms or "").strip() == "cpu":
        return  # on an accelerator, or the CPU was asked for by name
    seen = visible_accelerators()
    if seen:
        extra = "tpu" if seen == ["a Google TPU"] else "cuda"
        log.warning("running on the CPU although %s is visible: the installed jaxlib cannot use it; install the "
                    "accelerator build with pip install -e '.[%s]' (README: Install), or set JAX_PLATFORMS=cpu to "
                    "mean it", " and ".join(seen), extra)


def package_errors() -> tuple[type[BaseException], ...]:
    """The errors the package raises for an input that cannot be used; each message names the input and the fix."""
    from af2_jax.audio.io import AudioError
    from af2_jax.checkpoint.errors import CheckpointError
    from af2_jax.sharding import MeshError
    from af2_jax.tokenizer import TokenizerError
    from af2_jax.training.config import ConfigError

    return AudioError, CheckpointError, ConfigError, MeshError, TokenizerError


def run_command(body: Callable[[], int], *, debug: bool = False, any_value_error: bool = True) -> int:
    """Runs a command's work under the exit-code table: an input that cannot be used (`package_errors`; with
    `any_value_error` also any ValueError or OSError, for commands whose inputs reach code outside the package) is one
    `error: ...` line and exit 1 (its traceback with --debug); Ctrl-C is exit 130 with what was kept."""
    errors = package_errors() + ((ValueError, OSError) if any_value_error else ())
    try:
        return body()
    except errors as err:
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C); what was already written is kept", file=sys.stderr)
        return EXIT_INTERRUPTED


QUANTIZE_HELP = ("store the language model's weights in int8 (one scale per output channel): half the bytes per "
                 "decoding step; answers nearly always the same (default: the --dtype weights)")


def load_model(path: Path, why: str, *, dtype: str, mesh, scan_layers: bool = False, quantize: str | None = None):
    """The checkpoint at `path` (chosen because `why`) loaded for serving, announced in one line: what, where, how
    long."""
    import jax

    from af2_jax.checkpoint.native import load
    from af2_jax.sharding import format_mesh

    start = time.perf_counter()
    model = load(path, dtype=dtype, mesh=mesh, scan_layers=scan_layers, quantize=quantize)
    device = jax.devices()[0]
    log.info("checkpoint: %s (%s); dtype %s%s; device %s (%s) x%d; mesh: %s; loaded in %.1f s",
             path, why, dtype, f", weights {quantize}" if quantize else "", device.platform, device.device_kind,
             jax.device_count(), format_mesh(dict(mesh.shape)) if mesh else "none (single device)",
             time.perf_counter() - start)
    return model
