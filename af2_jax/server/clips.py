"""Audio parts of a request read into model windows, through exactly the file path `infer` uses (so the same clip
gets the same answer): the bytes of an `input_audio` part or a `data:` URL go to a private temporary file; a
`file://` URL is read only inside `--allowed-local-dir`, after resolving links. Blocking: run it off the event loop.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np

from af2_jax.audio.io import AudioError, dropped_note, read_windows
from af2_jax.config import AudioConfig
from af2_jax.server.protocol import APIError, AudioSource


def read_clip(source: AudioSource, *, max_windows: int, config: AudioConfig, allowed_dir: str | None
              ) -> tuple[np.ndarray, np.ndarray, str | None]:
    """`(windows, mask, note)`: the clip cut to `max_windows` windows, `note` saying what was cut (None if
    nothing). An APIError (400 unreadable audio, 403 a path outside the allowed folder) names the part."""
    if source.path is not None:
        path = _allowed(source, allowed_dir)
        return _read(path, path, source, max_windows, config)
    with tempfile.TemporaryDirectory(prefix="af2_serve_") as folder:
        path = os.path.join(folder, f"clip.{source.format}")
        with open(path, "wb") as f:
            f.write(source.data)
        return _read(path, source.where, source, max_windows, config)


def _allowed(source: AudioSource, allowed_dir: str | None) -> str:
    if allowed_dir is None:
        raise APIError(403, f"{source.where}: file:// URLs are refused: the server was started without "
                            "--allowed-local-dir; send the audio as input_audio or a data: URL",
                       param=source.where, code="forbidden_path", kind="permission_error")
    real, root = os.path.realpath(source.path), os.path.realpath(allowed_dir)
    if os.path.commonpath([real, root]) != root:
        raise APIError(403, f"{source.where}: {source.path} is outside the folder this server may read "
                            f"(--allowed-local-dir {allowed_dir}, links resolved)",
                       param=source.where, code="forbidden_path", kind="permission_error")
    return real


def _read(path: str, name: str, source: AudioSource, max_windows: int, config: AudioConfig):
    try:
        windows, mask, dropped = read_windows(path, max_windows, config=config)
    except AudioError as err:
        raise APIError(400, str(err).replace(path, name, 1), param=source.where, code="invalid_audio") from None
    note = f"{source.where}: {dropped_note(dropped, max_windows, config)}" if dropped else None
    return windows, mask, note

