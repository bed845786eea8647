"""af2-jax checkpoints on disk: an Orbax tree of the model's parameters, an Orbax tree of the tensors that are dead at
inference (kept as-is, so an export loses nothing), and `config.json`.

    DST/config.json   {"af2_jax": {format, dtype, clap_prefix, source}, ...AF2Config.to_dict()}
    DST/params/       Orbax (StandardCheckpointer): nested dict by NNX path, stacked LM layers on a leading axis
    DST/unused/       Orbax: nested dict by original name (split on "."), original dtypes
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import traceback
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from af2_jax.checkpoint.reader import CheckpointError, parse_json, reason
from af2_jax.config import AF2Config

log = logging.getLogger(__name__)

FORMAT = "af2-jax/1"
META_KEY = "af2_jax"
_RECONVERT = "re-convert the checkpoint with `python -m af2_jax.convert`"


def nest(flat: dict[str, Any]) -> dict:
    """{"a.b.c": x} -> {"a": {"b": {"c": x}}}."""
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(flatten(value, path))
        else:
            out[path] = value
    return out


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
    data = parse_json(path, path.read_bytes(), "configuration", fix=_RECONVERT)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a JSON object; {_RECONVERT}")
    meta = data.pop(META_KEY, None)
    data.pop("model_type", None)  # for transformers only; checkpoints written before it existed lack it
    if meta is None:
        raise CheckpointError(f"{path}: not an af2-jax checkpoint config (no '{META_KEY}' section); convert the "
                              "original weights with `python -m af2_jax.convert`")
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: the '{META_KEY}' section is not an object; {_RECONVERT}")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {meta.get('format')!r}, this version reads {FORMAT!r}")
    try:
        return AF2Config.from_dict(data), meta
    except (TypeError, ValueError, KeyError, AttributeError) as err:  # unknown keys, wrong types, inconsistent sizes
        raise CheckpointError(f"{path}: invalid configuration ({reason(err)}); {_RECONVERT}") from None


def save_tree(path: Path, tree: dict) -> None:
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path.absolute(), tree)


def _tree_folder(path: Path) -> None:
    if not path.is_dir():
        problem = "is not a folder" if path.exists() else "is missing"
        raise CheckpointError(f"{path}: this Orbax tree {problem}; the checkpoint is incomplete: {_RECONVERT}")


@contextlib.contextmanager
def _orbax_errors(path: Path, action: str):
    """Orbax reports a damaged tree with a multi-line message that dumps the whole TensorStore spec; the innermost
    cause's first line names the array and the problem, which is what a one-line error shows."""
    quiet = _AbandonedReads()
    try:
        yield
    except Exception as err:
        quiet.keep()
        cause = err
        while (inner := cause.__cause__ or cause.__context__) is not None:
            cause = inner
        raise CheckpointError(f"{path}: cannot {action} this Orbax tree ({reason(cause)}); the checkpoint is "
                              f"damaged: {_RECONVERT}") from err
    quiet.remove()


_ORBAX_SOURCE = f"{os.sep}orbax{os.sep}"


class _AbandonedReads:
    """Drops the reports of the reads Orbax abandons when one array fails. It closes its event loop while TensorStore
    still completes the other reads it had started, and for as long as they run (on a full release, until well after
    the one-line error) each reports 'Event loop is closed', and each abandoned read task its own failure, through
    sys.unraisablehook, the asyncio logger and "never awaited" warnings: pages of tracebacks. Installed around an
    Orbax call (the first reports come while its error unwinds); kept after a failure, removed after a success."""

    def __init__(self):
        self.previous = sys.unraisablehook
        sys.unraisablehook = self.unraisable
        logging.getLogger("asyncio").addFilter(self)

    def unraisable(self, unraisable) -> None:
        closed_loop = isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == \
            "Event loop is closed"
        code = getattr(unraisable.object, "cr_code", None)  # a read coroutine closed before it finished
        if not (closed_loop or (code is not None and _ORBAX_SOURCE in code.co_filename)):
            self.previous(unraisable)

    def filter(self, record: logging.LogRecord) -> bool:
        """False for asyncio's "exception was never retrieved" / "destroyed but pending" on an Orbax task, which
        names Orbax's source in the task or in the exception's traceback."""
        if _ORBAX_SOURCE in record.getMessage():
            return False
        err = record.exc_info[1] if record.exc_info else None
        while err is not None:
            if any(_ORBAX_SOURCE in frame.filename for frame in traceback.extract_tb(err.__traceback__)):
                return False
            err = err.__cause__ or err.__context__
        return True

    def keep(self) -> None:
        # Coroutines that never started are reported when collected, often at exit.
        warnings.filterwarnings("ignore", r"coroutine '_read\w*' was never awaited", RuntimeWarning)

    def remove(self) -> None:
        if sys.unraisablehook == self.unraisable:
            sys.unraisablehook = self.previous
        logging.getLogger("asyncio").removeFilter(self)


def restore_tree(path: Path, abstract: dict) -> dict:
    import orbax.checkpoint as ocp

    _tree_folder(path)
    with _orbax_errors(path, "read"), ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(path.absolute(), abstract)


def stored_shapes(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Flat path -> (shape, dtype) of an Orbax tree, from its metadata alone."""
    import orbax.checkpoint as ocp

    _tree_folder(path)
    with _orbax_errors(path, "read the metadata of"), ocp.StandardCheckpointer() as checkpointer:
        meta = checkpointer.metadata(path.absolute())
    if hasattr(meta, "item_metadata"):  # a StepMetadata; older Orbax versions return the tree itself
        if meta.item_metadata is None:  # Orbax logs a warning and returns no tree instead of raising
            raise CheckpointError(f"{path}: cannot read the metadata of this Orbax tree "
                                  f"({_unreadable_metadata(path)}); the checkpoint is damaged: {_RECONVERT}")
        meta = meta.item_metadata.tree
    return {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in flatten(meta).items()}


def _unreadable_metadata(path: Path) -> str:
    """Why Orbax found no tree metadata in `path`, as far as the files tell (Orbax drops its own reason)."""
    metadata = path / "_METADATA"
    if not metadata.is_file():
        return "_METADATA is missing"
    try:
        json.loads(metadata.read_bytes())
    except ValueError:
        return "_METADATA is corrupt"
    return "its array index, manifest.ocdbt and d/, is corrupt"


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


def state_variables(state, prefix: str = "") -> list[tuple[str, nnx.Variable]]:
    """(dotted path, variable) for every variable of an NNX state; setting a variable updates that state."""
    return [(prefix + ".".join(str(k) for k in path), var) for path, var in nnx.to_flat_state(state)]


def model_variables(model: nnx.Module) -> list[tuple[str, nnx.Variable]]:
    return state_variables(nnx.split(model)[1])


# Top-level attributes of AF2Model whose parameters checkpoints keep stacked on a leading `layers` axis.
STACKED_ROOTS = ("layers",)


def is_stacked(path: str) -> bool:
    """Whether a dotted parameter path (of either layout) belongs to the stacked LM layers."""
    return path.split(".", 1)[0] in STACKED_ROOTS


def stacked_groups(variables) -> dict[str, list[nnx.Variable]]:
    """`(dotted path, variable)` pairs of either layout grouped by their path in the stacked layout that
    checkpoints use: an unstacked model's `layers.{i}.rest` joins the other layers' copies under `layers.rest`, in
    layer order; every other variable is a group of one."""
    groups: dict[str, dict[int, nnx.Variable]] = {}
    for path, var in variables:
        root, index, rest = (path.split(".", 2) + ["", ""])[:3]
        if root in STACKED_ROOTS and index.isdigit():
            groups.setdefault(f"{root}.{rest}", {})[int(index)] = var
        else:
            groups.setdefault(path, {})[0] = var
    return {path: [layers[i] for i in sorted(layers)] for path, layers in groups.items()}


def checkpoint_arrays(model) -> list[tuple[str, jax.Array, nnx.Variable]]:
    """(checkpoint path, value, variable) for every variable, in the stacked layout checkpoints use whatever the
    model's: an unstacked model's layers are stacked one parameter at a time (with layer 0's variable)."""
    arrays = [(p, v[...], v) for p, v in model_variables(model) if model.scan_layers or not is_stacked(p)]
    if not model.scan_layers:
        from af2_jax.nn.af2 import stacked_layer_arrays

        arrays += stacked_layer_arrays(model)
    return arrays


def storage_dtype(var: nnx.Variable, dtype) -> np.dtype:
    """Parameters are stored in the requested dtype; BatchNorm running statistics always in float32 (bfloat16
    would move the mel normalisation by tenths of a dB)."""
    return np.dtype(np.float32) if isinstance(var, nnx.BatchStat) else np.dtype(dtype)


def save(model, dst, *, tokenizer=None, dtype=None, overwrite: bool = False, meta: dict | None = None) -> Path:
    """Writes a model (and optionally its tokenizer) as an af2-jax checkpoint, e.g. after training. With several
    JAX processes every process calls it: each writes its own shards, process 0 the rest."""
    arrays = checkpoint_arrays(model)
    dtype = np.dtype(dtype or model.dtype)
    if jax.process_count() > 1:
        return _save_from_processes(model, arrays, Path(dst), tokenizer, dtype, overwrite, meta)
    params = {p: jax.device_put(np.asarray(value).astype(storage_dtype(var, dtype))) for p, value, var in arrays}
    with AtomicFolder(dst, overwrite) as tmp:
        save_tree(tmp / "params", nest(params))
        if tokenizer is not None:
            tokenizer.save(tmp / "tokenizer")
        write_config(tmp, model.config, {"dtype": dtype.name, "unused": {}, **(meta or {})})
    return Path(dst)


def _save_from_processes(model, arrays, dst: Path, tokenizer, dtype, overwrite: bool, meta) -> Path:
    """`save` for a model sharded over several processes (shared filesystem): Orbax writes every process's shards
    into a temporary folder, then process 0 adds config and tokenizer and renames it into place."""
    from jax.experimental import multihost_utils

    if dst.exists() and not overwrite:  # every process sees the same filesystem, so all refuse together
        raise CheckpointError(f"{dst}: already exists; pass overwrite=True to replace it, or choose another path")
    tmp = dst.parent / f".{dst.name}.partial"
    if jax.process_index() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    multihost_utils.sync_global_devices("af2_jax.save:start")
    save_tree(tmp / "params", nest({p: value.astype(storage_dtype(var, dtype)) for p, value, var in arrays}))
    if jax.process_index() == 0:
        if tokenizer is not None:
            tokenizer.save(tmp / "tokenizer")
        write_config(tmp, model.config, {"dtype": dtype.name, "unused": {}, **(meta or {})})
        if dst.exists():
            shutil.rmtree(dst)
        os.rename(tmp, dst)
    multihost_utils.sync_global_devices("af2_jax.save:end")
    return dst


def cache_dir() -> Path:
    """$AF2_JAX_HOME (default ~/.cache/af2_jax): the converted release (`infer --download`) and, in `xla/`, compiled
    programs."""
    return Path(os.environ.get("AF2_JAX_HOME", Path.home() / ".cache" / "af2_jax"))


# Set to 0 to keep af2-jax from turning JAX's persistent compilation cache on.
COMPILATION_CACHE_SWITCH = "AF2_JAX_COMPILATION_CACHE"


def use_compilation_cache() -> str | None:
    """Turns on JAX's persistent compilation cache in $AF2_JAX_HOME/xla, so a later process that compiles the same
    programs loads them from disk (on GPUs, over a minute per program for the release). A folder the user chose
    (JAX_COMPILATION_CACHE_DIR, or jax_compilation_cache_dir in jax.config) is kept, and
    AF2_JAX_COMPILATION_CACHE=0 leaves the cache as JAX has it. Returns the folder in use, or None."""
    chosen = jax.config.jax_compilation_cache_dir
    if chosen or os.environ.get(COMPILATION_CACHE_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return chosen or None
    folder = str(cache_dir() / "xla")
    jax.config.update("jax_compilation_cache_dir", folder)
    return folder


def load(path, dtype="bfloat16", mesh=None, *, param_dtype=None, scan_layers: bool = True):
    """Loads a checkpoint written by `python -m af2_jax.convert` as an `AF2Model` whose weights and activations
    are in `dtype` ("float32" or "bfloat16"); `param_dtype` keeps the weights in another dtype (training: float32
    master weights, bfloat16 compute). With a `mesh` (`af2_jax.sharding.make_mesh`), every parameter is
    restored straight into its shards as the rules table places it: no host holds a full copy. `scan_layers=False`
    returns the layers unstacked, the faster layout for decoding (`af2_jax.nn.af2`): the checkpoint's stacked
    parameters are cut into the layers as they are restored. Also turns on the compilation cache
    (`use_compilation_cache`)."""
    from af2_jax.nn.af2 import AF2Model, layer_pieces, layer_sharding

    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder; convert the release with "
                              "`python -m af2_jax.convert SRC DST` and pass DST")
    config, _ = read_config(folder)
    _check_tokenizer(folder, config)
    use_compilation_cache()
    dtype = jnp.dtype(dtype)
    param_dtype = jnp.dtype(param_dtype or dtype)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: AF2Model(
        config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0), scan_layers=scan_layers)))
    groups = stacked_groups(state_variables(state))  # checkpoint path -> the model's variable(s) holding it
    cut = {p for p in groups if is_stacked(p) and not scan_layers}  # stored stacked, held one variable per layer
    expected = {p: ((len(vs),) if p in cut else ()) + tuple(vs[0].shape) for p, vs in groups.items()}
    stored = stored_shapes(folder / "params")
    missing = sorted(set(expected) - set(stored))
    extra = sorted(set(stored) - set(expected))
    wrong = sorted(p for p in set(expected) & set(stored) if stored[p][0] != expected[p])
    if missing or extra or wrong:
        raise CheckpointError(f"{folder}: parameters do not match config.json (missing {missing[:5]}, unexpected "
                              f"{extra[:5]}, wrong shape {wrong[:5]}); re-convert the checkpoint")
    if mesh is None:
        # Onto one device, whatever layout wrote the checkpoint (a multi-host training run, `convert --mesh`):
        # restored on the host, then each variable is copied to the device, so cutting layers compiles nothing.
        target = {p: np.empty(expected[p], storage_dtype(vs[0], param_dtype)) for p, vs in groups.items()}
    else:
        from af2_jax.sharding import Placement, format_mesh, variable_sharding

        placement = Placement(mesh, config)
        log.info("mesh %s: %s", format_mesh(dict(mesh.shape)), placement.report())
        target = {p: jax.ShapeDtypeStruct(expected[p], storage_dtype(vs[0], param_dtype),
                                          sharding=layer_sharding(variable_sharding(vs[0], placement), stacked=True)
                                          if p in cut else variable_sharding(vs[0], placement))
                  for p, vs in groups.items()}
    restored = flatten(restore_tree(folder / "params", nest(target)))
    for p, variables in groups.items():
        value = restored.pop(p)
        pieces = layer_pieces(value) if p in cut else [value]
        if mesh is None:  # one transfer per variable (jnp.asarray would compile a copy for every shape)
            pieces = jax.device_put(pieces, jax.local_devices()[0])
        elif p in cut:
            value.delete()  # the layers hold their own copies now
        for var, piece in zip(variables, pieces):
            var.set_value(piece)
    return nnx.merge(graphdef, state)


def _check_tokenizer(folder: Path, config: AF2Config) -> None:
    """A tokenizer saved with the checkpoint must fit its embedding (checked before the weights are read)."""
    tokenizer_json = folder / "tokenizer" / "tokenizer.json"
    if not tokenizer_json.is_file():
        return
    from tokenizers import Tokenizer

    try:
        size = Tokenizer.from_file(str(tokenizer_json)).get_vocab_size(with_added_tokens=True)
    except Exception as err:  # the tokenizers library raises plain Exception for a damaged file
        raise CheckpointError(f"{tokenizer_json}: unreadable ({reason(err)}); {_RECONVERT}") from None
    if size != config.lm.vocab_size:
        raise CheckpointError(f"{tokenizer_json}: {size} tokens but the model has {config.lm.vocab_size} "
                              "embedding rows; re-convert the checkpoint")
