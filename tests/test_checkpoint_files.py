"""Hostile, damaged and misplaced checkpoint files: each is refused with one line naming the file (and the tensor),
before any tensor is read or anything is written."""

import errno
import json
import logging
import os
import re
import shutil
import struct
from pathlib import Path

import pytest

import af2_jax
from af2_jax.checkpoint import CheckpointError, SafetensorsCheckpoint
from af2_jax.checkpoint import folder as checkpoint_folder
from af2_jax.checkpoint import convert as convert_module
from af2_jax.checkpoint.convert import convert, export, inspect
from af2_jax.cli.convert import main as convert_cli
from tests.helpers import REPO

FLOAT_PARAM = "lang_encoder.model.norm.weight"  # a parameter every AF2 checkpoint has, stored as F32 in the fixture


# --- hostile safetensors headers -------------------------------------------------------------------------------
def _split(path: Path) -> tuple[dict, bytes, list[str]]:
    """(header, data region, tensor names in offset order) of a safetensors file."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    names = sorted((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"])
    return header, raw[8 + length:], names


def _file(header, data: bytes, length: int | None = None) -> bytes:
    """A safetensors file from a header (dict, JSON text or bytes) and a data region."""
    if isinstance(header, dict):
        header = json.dumps(header)
    encoded = header.encode() if isinstance(header, str) else header
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded) if length is None else length) + encoded + data


def _with(header: dict, name: str, **fields) -> dict:
    header[name] = {**header[name], **fields}
    return header


def _without(header: dict, name: str, field: str) -> dict:
    header[name] = {k: v for k, v in header[name].items() if k != field}
    return header


def _offsets(h, name):
    return h[name]["data_offsets"]


# Tensors the cases edit, picked from the file so the table fits any fixture: two neighbours in offset order, the
# last one, and a BatchNorm counter (unused at inference).
_PICK = {"mid": lambda n: n[20], "next": lambda n: n[21], "last": lambda n: n[-1],
         "dead": lambda n: next(x for x in n if x.endswith("num_batches_tracked"))}

# id -> (make(header, data, picked) -> file bytes, what the message says, which tensor it names)
HEADER_CASES = {
    "negative offset": (lambda h, d, t: _file(_with(h, t["mid"], data_offsets=[-8, _offsets(h, t["mid"])[1]]), d),
                        r"data_offsets \[-8, \d+\], not \[begin, end\]", "mid"),
    "begin after end": (lambda h, d, t: _file(_with(h, t["mid"], data_offsets=_offsets(h, t["mid"])[::-1]), d),
                        r"not \[begin, end\] with 0 <= begin <= end", "mid"),
    "three offsets": (lambda h, d, t: _file(_with(h, t["mid"], data_offsets=_offsets(h, t["mid"]) + [0]), d),
                      r"data_offsets \[\d+, \d+, 0\]", "mid"),
    "non-integer offset": (lambda h, d, t: _file(_with(h, t["mid"], data_offsets=[
        _offsets(h, t["mid"])[0], float(_offsets(h, t["mid"])[1])]), d), r"data_offsets \[\d+, \d+\.0\]", "mid"),
    "overlapping offsets": (lambda h, d, t: _file(_with(h, t["next"], data_offsets=[
        _offsets(h, t["next"])[0] - 4, _offsets(h, t["next"])[1]]), d), "overlaps the tensor before it", "next"),
    "gap between tensors": (lambda h, d, t: _file({k: v for k, v in h.items() if k != t["mid"]}, d),
                            r"leaves \d+ unused bytes before it", "next"),
    "offset past the end of the file": (lambda h, d, t: _file(h, d[:-8]), "truncated .*ends past the end", "last"),
    "bytes after the last tensor": (lambda h, d, t: _file(h, d + bytes(8)), "8 bytes after the last tensor", None),
    "duplicate key": (lambda h, d, t: _file(json.dumps(h)[:-1] + f", {json.dumps(t['mid'])}: "
                                            f"{json.dumps(h[t['mid']])}}}", d), "duplicate key", "mid"),
    "duplicate __metadata__": (lambda h, d, t: _file('{"__metadata__": {}, ' + json.dumps(h)[1:], d),
                               "duplicate key __metadata__", None),
    "unknown dtype": (lambda h, d, t: _file(_with(h, t["mid"], dtype="F31"), d), "unsupported dtype 'F31'", "mid"),
    "dtype not a string": (lambda h, d, t: _file(_with(h, t["mid"], dtype=4), d), "unsupported dtype 4", "mid"),
    "shape and byte range differ": (lambda h, d, t: _file(_with(h, t["mid"], shape=h[t["mid"]]["shape"] + [2]), d),
                                    r"has \d+ bytes, but shape .* needs \d+", "mid"),
    "huge shape on an unused tensor": (lambda h, d, t: _file(_with(h, t["dead"], shape=[2**40]), d),
                                       r"has 8 bytes, but shape \[1099511627776\] of int64 needs 8796093022208",
                                       "dead"),
    "negative dimension": (lambda h, d, t: _file(_with(h, t["mid"], shape=[-1]), d),
                           r"shape \[-1\], not a list of non-negative integers", "mid"),
    "fractional dimension": (lambda h, d, t: _file(_with(h, t["mid"], shape=[2.5]), d), r"shape \[2\.5\]", "mid"),
    "boolean dimension": (lambda h, d, t: _file(_with(h, t["mid"], shape=[True]), d), r"shape \[True\]", "mid"),
    "string dimension": (lambda h, d, t: _file(_with(h, t["mid"], shape=["4"]), d), r"shape \['4'\]", "mid"),
    "shape not a list": (lambda h, d, t: _file(_with(h, t["mid"], shape=64), d), "shape 64, not a list", "mid"),
    "NaN in the header": (lambda h, d, t: _file(_with(h, t["mid"], shape=[float("nan")]), d), "NaN is not JSON",
                          None),
    "entry not an object": (lambda h, d, t: _file({**h, t["mid"]: [1, 2]}, d), r"header entry is \[1, 2\]", "mid"),
    "entry without data_offsets": (lambda h, d, t: _file(_without(h, t["mid"], "data_offsets"), d),
                                   "header entry has no data_offsets", "mid"),
    "header not an object": (lambda h, d, t: _file("[]", d), "a JSON list, not an object", None),
    "__metadata__ not a mapping": (lambda h, d, t: _file({**h, "__metadata__": ["pt"]}, d),
                                   r"__metadata__ is \['pt'\], not an object of strings", None),
    "__metadata__ value not a string": (lambda h, d, t: _file({**h, "__metadata__": {"format": 1}}, d),
                                        "__metadata__ is .*, not an object of strings", None),
    "deep nesting": (lambda h, d, t: _file("[" * 100_000, d), r"nested too deeply", None),
    "header over the size cap": (lambda h, d, t: _file(h, d, length=100_000_001), "over the format's limit", None),
    "header past the end of the file": (lambda h, d, t: _file(h, b"", length=50_000_000),
                                        "truncated inside its header", None),
    "header not UTF-8": (lambda h, d, t: _file(b'{"\xff": 1}', d), "utf-8", None),
    "shorter than the length prefix": (lambda h, d, t: b"\x10\x00\x00", "too short", None),
}


def _hostile(golden, tmp_path: Path, case: str) -> tuple[Path, str | None]:
    """A copy of the fixture's safetensors file with its header rewritten as `case` says; and the tensor named."""
    header, data, names = _split(golden.weights)
    picked = {key: pick(names) for key, pick in _PICK.items()}
    make, _, tensor = HEADER_CASES[case]
    path = tmp_path / "hostile.safetensors"
    path.write_bytes(make(header, data, picked))
    return path, None if tensor is None else picked[tensor]


def _assert_one_line(message: str, *names: str) -> None:
    assert "\n" not in message.strip(), message
    for name in names:
        assert name in message, (name, message)


def _error_line(stderr: str) -> str:
    """A CLI's refusal: its last stderr line, `error: ...` (progress lines may come before it, nothing after)."""
    lines = stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), stderr
    assert sum(line.startswith("error: ") for line in lines) == 1, stderr
    return lines[-1]


@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_hostile_header_is_refused_before_any_tensor_is_read(golden, tmp_path, case):
    path, tensor = _hostile(golden, tmp_path, case)
    with pytest.raises(CheckpointError, match=HEADER_CASES[case][1]) as err:
        SafetensorsCheckpoint(path)
    _assert_one_line(str(err.value), str(path), *([tensor] if tensor else []))


def test_the_reference_reader_refuses_the_hostile_headers_too(golden, tmp_path):
    """The table asks no more than the safetensors library (except duplicate keys, which it resolves silently)."""
    from safetensors import safe_open

    for case in HEADER_CASES:
        if case.startswith("duplicate"):
            continue
        path, _ = _hostile(golden, tmp_path, case)
        with pytest.raises(Exception):
            with safe_open(str(path), "np"):
                pass
    # and the fixture itself passes both readers
    assert sorted(SafetensorsCheckpoint(golden.weights).keys()) == sorted(safe_open(str(golden.weights), "np").keys())


def _no_output(folder: Path) -> list[str]:
    """What a refused run left in `folder` beyond the hostile source."""
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".safetensors"))


def test_negative_offset_is_refused_by_convert_and_dry_run(golden, tmp_path, capsys):
    src, tensor = _hostile(golden, tmp_path, "negative offset")
    config = str(golden.path / "config.json")
    assert convert_cli([str(src), str(tmp_path / "out"), "--model", config]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    _assert_one_line(err, str(src), tensor)
    assert convert_cli([str(src), "--dry-run", "--model", config]) == 1
    _assert_one_line(capsys.readouterr().err, str(src), tensor)
    assert _no_output(tmp_path) == []


def test_integer_dtype_for_a_float_parameter_is_refused(golden, tmp_path, capsys, caplog):
    header, data, _ = _split(golden.weights)
    assert header[FLOAT_PARAM]["dtype"] == "F32"
    src = tmp_path / "int.safetensors"
    src.write_bytes(_file(_with(header, FLOAT_PARAM, dtype="I32"), data))  # same item size: the header is valid
    config = str(golden.path / "config.json")
    caplog.set_level(logging.INFO, logger="af2_jax")
    with pytest.raises(CheckpointError, match=re.escape(FLOAT_PARAM) + " is int32, expected a floating-point"):
        inspect(src, config)
    assert convert_cli([str(src), "--dry-run", "--model", config]) == 1
    _assert_one_line(_error_line(capsys.readouterr().err), str(src), FLOAT_PARAM)
    # A killed run's partial folder is cleaned up by the next run, even one whose source is then refused.
    leftover = tmp_path / ".out.partial-k1ll3d_0"
    leftover.mkdir()
    assert convert_cli([str(src), str(tmp_path / "out"), "--model", config]) == 1
    _assert_one_line(_error_line(capsys.readouterr().err), str(src), FLOAT_PARAM)
    assert f"removing {leftover}, left over from an interrupted run" in caplog.text
    assert _no_output(tmp_path) == []  # no DST, no partial folder (the refusal came after the DST check)


# --- the released layout's chunk index -------------------------------------------------------------------------
METADATA_CASES = {
    "not an object": ('["model_chunk_0"]', "not a chunk index"),
    "names not a list": ('{"model_chunk_0": "a.weight"}', "not a chunk index"),
    "names not strings": ('{"model_chunk_0": [1]}', "not a chunk index"),
    "parent folder": ('{"../model_chunk_0": []}', r"chunk name '\.\./model_chunk_0' is not a plain file name"),
    "subfolder": ('{"sub/model_chunk_0": []}', r"chunk name 'sub/model_chunk_0' is not a plain file name"),
    "backslash": ('{"..\\\\model_chunk_0": []}', "is not a plain file name"),
    "duplicate chunk": ('{"model_chunk_0": [], "model_chunk_0": []}', "duplicate key model_chunk_0"),
    "not JSON": ('{"model_chunk_0": [', "corrupt chunk index"),
}


@pytest.mark.parametrize("case", list(METADATA_CASES))
def test_bad_chunk_index_is_refused(tmp_path, case):
    text, message = METADATA_CASES[case]
    metadata = tmp_path / "release" / "safe_ckpt" / "metadata.json"
    metadata.parent.mkdir(parents=True)
    metadata.write_text(text)
    with pytest.raises(CheckpointError, match=message) as err:
        SafetensorsCheckpoint(tmp_path / "release")
    _assert_one_line(str(err.value), str(metadata))


# --- damaged af2-jax checkpoints -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def converted(golden, tmp_path_factory) -> Path:
    return convert(golden.weights, tmp_path_factory.mktemp("converted") / "jax", golden.path / "config.json",
                   "float32")


def _garbage(path: Path) -> None:
    path.write_bytes(b"\xffgarbage\x00" * 7)


def _edit_config(folder: Path, edit) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


def _tokenizer_garbage(folder: Path) -> None:
    (folder / "tokenizer").mkdir()
    _garbage(folder / "tokenizer" / "tokenizer.json")


# id -> (damage(folder), what the message says)
DAMAGE_CASES = {
    "params missing": (lambda d: shutil.rmtree(d / "params"), "params: this Orbax tree is missing"),
    "_METADATA garbage": (lambda d: _garbage(d / "params" / "_METADATA"), r"\(_METADATA is corrupt\)"),
    "_METADATA deleted": (lambda d: (d / "params" / "_METADATA").unlink(), r"\(_METADATA is missing\)"),
    "array index garbage": (lambda d: [_garbage(p) for p in (d / "params" / "d").iterdir()],
                            "array index, manifest.ocdbt and d/, is corrupt"),
    "array data garbage": (lambda d: [_garbage(p) for p in (d / "params" / "ocdbt.process_0" / "d").iterdir()],
                           r"cannot read this Orbax tree \([A-Z_]+: Error reading \"[\w.]+/"),
    "array data truncated": (lambda d: [p.write_bytes(p.read_bytes()[:p.stat().st_size // 2])
                                        for p in (d / "params" / "ocdbt.process_0" / "d").iterdir()],
                             "cannot read this Orbax tree"),
    "config not JSON": (lambda d: (d / "config.json").write_text("{nope"), "corrupt configuration"),
    "config a list": (lambda d: (d / "config.json").write_text("[1]"), "config.json: not a JSON object"),
    "config section not an object": (lambda d: _edit_config(d, lambda c: {**c, "lm": 5}),
                                     "lm is 5, expected an object"),
    "config string for an int": (lambda d: _edit_config(d, lambda c: {**c, "lm": {**c["lm"], "num_layers": "2"}}),
                                 "lm.num_layers is '2', expected an integer"),
    "config list of strings": (lambda d: _edit_config(d, lambda c: {**c, "htsat": {**c["htsat"], "depths": ["2"]}}),
                               "htsat.depths is .*, expected a list of integers"),
    "config unknown key": (lambda d: _edit_config(d, lambda c: {**c, "bogus": 1}), r"unknown AF2Config fields"),
    "config af2_jax section not an object": (lambda d: _edit_config(d, lambda c: {**c, "af2_jax": "x"}),
                                             "the 'af2_jax' section is not an object"),
    "tokenizer garbage": (_tokenizer_garbage, "tokenizer.json: unreadable"),
}


@pytest.mark.parametrize("case", list(DAMAGE_CASES))
def test_damaged_checkpoint_gives_one_line(converted, tmp_path, case):
    damage, message = DAMAGE_CASES[case]
    folder = tmp_path / "damaged"
    shutil.copytree(converted, folder)
    damage(folder)
    with pytest.raises(CheckpointError, match=message) as err:
        af2_jax.load(folder, dtype="float32")
    _assert_one_line(str(err.value), str(folder))


def test_infer_cli_on_damaged_arrays_prints_one_line(small_checkpoint, tmp_path, capsys):
    from af2_jax.cli.infer import main as infer_cli

    folder = tmp_path / "damaged"
    shutil.copytree(small_checkpoint, folder)
    for chunk in (folder / "params" / "ocdbt.process_0" / "d").iterdir():
        _garbage(chunk)
    code = infer_cli(["--checkpoint", str(folder), "--audio", str(REPO / "infer" / "examples" / "three_beeps.flac"),
                      "--prompt", "q"])
    assert code == 1
    _assert_one_line(_error_line(capsys.readouterr().err), str(folder / "params"), "cannot read this Orbax tree")


# --- the destination -------------------------------------------------------------------------------------------
def _no_tensor_reads(monkeypatch) -> None:
    def fail(self, name):
        raise AssertionError(f"tensor {name} was read before the destination was checked")

    monkeypatch.setattr(SafetensorsCheckpoint, "get", fail)


def test_unwritable_dst_is_refused_before_any_tensor_is_read(golden, converted, tmp_path, capsys, monkeypatch):
    _no_tensor_reads(monkeypatch)
    blocker = tmp_path / "file"
    blocker.write_text("mine")
    dst = blocker / "out"  # tests run as root: a regular file in the way is what no permission can bypass
    assert convert_cli([str(golden.weights), str(dst), "--model", str(golden.path / "config.json")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "cannot create its parent folder" in err
    _assert_one_line(err, str(dst))

    def no_restore(*args):
        raise AssertionError("the source was read before the destination was checked")

    monkeypatch.setattr(convert_module, "restore_tree", no_restore)
    assert convert_cli([str(converted), str(dst), "--export"]) == 1
    _assert_one_line(capsys.readouterr().err, str(dst))
    assert blocker.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_read_only_dst_is_refused_before_any_tensor_is_read(golden, tmp_path, monkeypatch):
    _no_tensor_reads(monkeypatch)

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    # root can write anywhere: simulate the filesystem
    monkeypatch.setattr(checkpoint_folder.tempfile, "mkdtemp", read_only)
    dst = tmp_path / "out"
    with pytest.raises(CheckpointError, match="cannot write in .*Read-only file system.*choose a writable DST") as err:
        convert(golden.weights, dst, golden.path / "config.json")
    _assert_one_line(str(err.value), str(dst))
    assert not dst.exists()


def test_only_leftovers_of_the_same_dst_are_removed(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="af2_jax")
    dst = tmp_path / "jax"
    leftovers = [".jax.partial-ab_12xyz", ".jax.partial-00000000"]
    kept = [".jax.partial-short", ".jax.partial-abcd12345", ".jaxx.partial-abcd1234", "jax.partial-abcd1234",
            ".other.partial-abcd1234", ".jax.partial-abcd1234.bak", ".jax.old-12x"]
    for name in leftovers + kept:
        (tmp_path / name).mkdir()
        (tmp_path / name / "chunk").write_text("x")
    (tmp_path / ".jax.partial-file0000").write_text("a file, not a folder")
    (tmp_path / ".jax.old-4242").mkdir()
    checkpoint_folder.AtomicFolder(dst, overwrite=False)
    remaining = sorted(p.name for p in tmp_path.iterdir())
    # The old copy of a replaced DST is kept while DST itself is missing: it is the only complete copy.
    assert remaining == sorted(kept + [".jax.partial-file0000", ".jax.old-4242"])
    assert all(f"removing {tmp_path / name}, left over from an interrupted run" in caplog.text for name in leftovers)
    assert f"kept {tmp_path / '.jax.old-4242'}" in caplog.text
    dst.mkdir()
    checkpoint_folder.AtomicFolder(dst, overwrite=True)
    assert not (tmp_path / ".jax.old-4242").exists() and (tmp_path / ".jax.old-12x").is_dir()


def test_export_of_a_damaged_checkpoint_leaves_nothing(converted, tmp_path):
    folder = tmp_path / "damaged"
    shutil.copytree(converted, folder)
    for chunk in (folder / "unused" / "ocdbt.process_0" / "d").iterdir():
        _garbage(chunk)
    with pytest.raises(CheckpointError, match="unused: cannot read this Orbax tree"):
        export(folder, tmp_path / "export")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged"]  # no DST, no partial folder


def test_abandoned_ocdbt_reads_are_not_reported():
    """A read task Orbax abandons reaches asyncio's "never retrieved" report wrapped by asyncio alone (no Orbax frame
    in its traceback, as CI once printed); its TensorStore message marks it. Other reports pass."""
    import logging

    from af2_jax.checkpoint.orbax_tree import _AbandonedReads

    def report(err):
        return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, "Task exception was never retrieved", (),
                                 (type(err), err, None))

    quiet = _AbandonedReads()
    try:
        read = ValueError('OUT_OF_RANGE: Error reading "x/0.0" in OCDBT database at local file "/d/params/": '
                          "Requested byte range [5, 9) is not valid for value of size 7")
        assert not quiet.filter(report(read))
        assert quiet.filter(report(ValueError("something else")))
    finally:
        quiet.remove()
