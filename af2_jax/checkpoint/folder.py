"""The files of an af2-jax checkpoint folder apart from the weights, and writing a folder atomically.

    DST/config.json   {"model_type", "af2_jax": {format, dtype, clap_prefix, source}, ...AF2Config.to_dict()}
    DST/params/       Orbax tree (`orbax_tree`): nested dict by checkpoint path (`af2_jax.nn.layer_stack.slots`)
    DST/unused/       Orbax tree: the original's tensors that are dead at inference, by original name (split on
                      "."), original dtypes, so an export loses nothing
    DST/tokenizer/    optional: the tokenizer (`AF2Tokenizer.save`)
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from af2_jax.checkpoint.errors import RECONVERT, CheckpointError, parse_json, reason
from af2_jax.config import AF2Config

log = logging.getLogger(__name__)

FORMAT = "af2-jax/1"
META_KEY = "af2_jax"


# Tells transformers what the folder holds: without a model type, reading `tokenizer/` through AutoTokenizer looks
# for one here and warns about a Mistral tokenizer regex that does not concern this model.
MODEL_TYPE = "audio_flamingo_2_jax"


def write_config(folder: Path, config: AF2Config, meta: dict) -> None:
    data = {"model_type": MODEL_TYPE, META_KEY: {"format": FORMAT, **meta}, **config.to_dict()}
    (folder / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_config(folder: Path) -> tuple[AF2Config, dict]:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: no config.json; pass a folder written by `python -m af2_jax.convert`")
    data = parse_json(path, path.read_bytes(), "configuration", fix=RECONVERT)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a JSON object; {RECONVERT}")
    meta = data.pop(META_KEY, None)
    data.pop("model_type", None)  # for transformers only; checkpoints written before it existed lack it
    if meta is None:
        raise CheckpointError(f"{path}: not an af2-jax checkpoint config (no '{META_KEY}' section); convert the "
                              "original weights with `python -m af2_jax.convert`")
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: the '{META_KEY}' section is not an object; {RECONVERT}")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {meta.get('format')!r}, this version reads {FORMAT!r}")
    try:
        return AF2Config.from_dict(data), meta
    except (TypeError, ValueError, KeyError, AttributeError) as err:  # unknown keys, wrong types, inconsistent sizes
        raise CheckpointError(f"{path}: invalid configuration ({reason(err)}); {RECONVERT}") from None



def check_tokenizer(folder: Path, config: AF2Config) -> None:
    """A tokenizer saved with the checkpoint must fit its embedding (checked before the weights are read)."""
    tokenizer_json = folder / "tokenizer" / "tokenizer.json"
    if not tokenizer_json.is_file():
        return
    from tokenizers import Tokenizer

    try:
        size = Tokenizer.from_file(str(tokenizer_json)).get_vocab_size(with_added_tokens=True)
    except Exception as err:  # the tokenizers library raises plain Exception for a damaged file
        raise CheckpointError(f"{tokenizer_json}: unreadable ({reason(err)}); {RECONVERT}") from None
    if size != config.lm.vocab_size:
        raise CheckpointError(f"{tokenizer_json}: {size} tokens but the model has {config.lm.vocab_size} "
                              "embedding rows; re-convert the checkpoint")


class AtomicFolder:
    """Writes a folder under a temporary name next to `dst` and renames it into place only when complete.
    An existing `dst` is refused unless `overwrite`; then it is replaced only after the new one is whole.

    Constructing it checks `dst` and removes what an interrupted run for the same `dst` left next to it; entering
    creates the temporary folder, which proves the place writable: enter before any heavy work, and do that work
    inside, so that a failure leaves nothing behind."""

    def __init__(self, dst, overwrite: bool):
        self.dst = Path(dst)
        if self.dst.exists() and not overwrite:
            raise CheckpointError(f"{self.dst}: already exists; pass --overwrite to replace it, or choose another DST")
        try:
            self.dst.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:  # e.g. a file where a parent folder should be
            raise CheckpointError(f"{self.dst}: cannot create its parent folder {self.dst.parent} ({reason(err)}); "
                                  "choose another DST") from None
        self._remove_leftovers()

    def _remove_leftovers(self) -> None:
        """Partial folders of a killed run (mkdtemp's names: the prefix and 8 characters of [a-z0-9_]) and the old
        copy of a replaced `dst`; nothing else is touched. An old copy is kept while `dst` is missing: the run was
        killed between its two renames, and that copy is the only complete one."""
        pattern = re.compile(re.escape(f".{self.dst.name}.") + r"(partial-[a-z0-9_]{8}|old-[0-9]+)")
        for entry in sorted(self.dst.parent.iterdir()):
            if not pattern.fullmatch(entry.name) or not entry.is_dir() or entry.is_symlink():
                continue
            if entry.name.startswith(f".{self.dst.name}.old-") and not self.dst.exists():
                log.warning("kept %s: it holds the previous %s, which an interrupted run did not put back; rename "
                            "it to %s or delete it", entry, self.dst.name, self.dst.name)
                continue
            log.info("removing %s, left over from an interrupted run", entry)
            shutil.rmtree(entry, ignore_errors=True)

    def __enter__(self) -> Path:
        try:
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.dst.name}.partial-", dir=self.dst.parent))
        except OSError as err:  # a read-only filesystem or folder: found before reading or writing any data
            raise CheckpointError(f"{self.dst}: cannot write in {self.dst.parent} ({reason(err)}); choose a "
                                  "writable DST") from None
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the result should look like any other folder
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        if self.dst.exists():
            old = self.dst.parent / f".{self.dst.name}.old-{os.getpid()}"
            os.rename(self.dst, old)
            os.rename(self.tmp, self.dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(self.tmp, self.dst)
        return False
