"""The error every checkpoint problem becomes, and the helpers that turn hostile input into one readable line."""

from __future__ import annotations

import json
from pathlib import Path

# What the user does about a converted checkpoint that is damaged or was written by another version.
RECONVERT = "re-convert the checkpoint with `python -m af2_jax.convert`"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as given. The message names the file or tensor and the fix."""



def shown(value, limit: int = 80) -> str:
    """A value from a hostile file, on one line and cut short."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def reason(err: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type when it has none), cut short: the cause a one-line error
    can show."""
    text = next(iter(str(err).splitlines()), "") or type(err).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def quoted_name(name: str) -> str:
    """A key from a hostile file as a message shows it: as is, unless quoting is needed to keep it on one line."""
    return name if name.isprintable() else shown(name)


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")  # Python's json accepts NaN/Infinity; safetensors' serde_json does not


def parse_json(path: Path, raw: bytes, what: str, fix: str = "re-download the file"):
    """JSON from a downloaded file, refusing what Python's json lets through but a strict parser does not: duplicate
    keys (json.loads silently keeps the last), NaN/Infinity, non-UTF-8 text (json.loads would guess UTF-16/32), and
    nesting deep enough to exhaust the stack."""

    def unique(pairs):
        out = {}
        for key, value in pairs:
            if key in out:
                raise CheckpointError(f"{path}: duplicate key {quoted_name(key)} in its {what}; {fix}")
            out[key] = value
        return out

    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=unique, parse_constant=_no_constant)
    except CheckpointError:
        raise
    except RecursionError:
        raise CheckpointError(f"{path}: corrupt {what} (nested too deeply); {fix}") from None
    except ValueError as err:  # UnicodeDecodeError, JSONDecodeError, integers too long to convert
        raise CheckpointError(f"{path}: corrupt {what} ({reason(err)}); {fix}") from None
