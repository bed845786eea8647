"""Reads original AF2 weights one tensor at a time, from the released layout or plain safetensors files.

Layouts accepted:
- the released repository (`DIR/safe_ckpt/metadata.json` mapping chunk name -> tensor names, chunks in
  `DIR/safe_ckpt/<chunk>.safetensors`), or the `safe_ckpt` folder itself;
- one `.safetensors` file, or a folder of them.

Headers are parsed directly and each tensor is read by offset with plain file reads, so names, shapes and dtypes are
known without touching tensor data, and memory stays at about one tensor (safetensors' own reader maps the file and
keeps read pages resident while it is open).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from pathlib import Path
from typing import Iterator

import ml_dtypes
import numpy as np

from af2_jax.checkpoint.errors import CheckpointError, parse_json, quoted_name, shown

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
# safetensors' own limit (MAX_HEADER_SIZE): a longer header is not a safetensors file.
_MAX_HEADER_BYTES = 100_000_000
_INDEX_LIMIT = 2**64  # shapes and offsets are Rust usize in safetensors


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor of a safetensors file lies: the file, dtype, shape and absolute byte range `[start, end)`."""

    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset of the data
    end: int


def _is_index(value) -> bool:
    return type(value) is int and 0 <= value < _INDEX_LIMIT  # type(), not isinstance: JSON true is no index


def _entry(path: Path, name: str, entry) -> tuple[np.dtype, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one header entry, each checked as safetensors' TensorInfo would parse it."""
    where = f"{path}: tensor {quoted_name(name)}"
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where}: header entry is {shown(entry)}, not an object with dtype, shape and "
                              "data_offsets; the file is corrupt, re-download it")
    missing = [key for key in ("dtype", "shape", "data_offsets") if key not in entry]
    if missing:
        raise CheckpointError(f"{where}: header entry has no {', '.join(missing)}; the file is corrupt, "
                              "re-download it")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise CheckpointError(f"{where} has unsupported dtype {shown(dtype)} (readable: {', '.join(_DTYPES)})")
    if not isinstance(shape, list) or not all(_is_index(d) for d in shape):
        raise CheckpointError(f"{where} has shape {shown(shape)}, not a list of non-negative integers; the file "
                              "is corrupt, re-download it")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_index(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise CheckpointError(f"{where} has data_offsets {shown(offsets)}, not [begin, end] with 0 <= begin <= "
                              "end; the file is corrupt, re-download it")
    return np.dtype(_DTYPES[dtype]), tuple(shape), offsets[0], offsets[1]


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor name -> TensorInfo from a safetensors file header (no tensor data read).

    Everything the header alone can tell is checked here, as the safetensors library checks it before handing out
    any tensor (`read_metadata`, `Metadata::validate`): entries well-formed, dtypes known, each byte range exactly
    the size its shape and dtype need, and the ranges tiling the data region in offset order, with no gap or overlap,
    up to the end of the file. Reading a tensor afterwards can then neither pick up other bytes nor allocate more
    than the file holds."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) != 8:
            raise CheckpointError(f"{path}: too short to be a safetensors file; re-download it")
        (length,) = struct.unpack("<Q", prefix)
        if length > _MAX_HEADER_BYTES:
            raise CheckpointError(f"{path}: not a safetensors file (header length {length} is over the format's "
                                  f"limit of {_MAX_HEADER_BYTES}); re-download it")
        if 8 + length > size:
            raise CheckpointError(f"{path}: truncated inside its header ({length} header bytes announced, "
                                  f"{size - 8} present); re-download it")
        header = parse_json(path, f.read(length), "safetensors header")
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, not an "
                              "object); re-download the file")
    entries = []
    for name, entry in header.items():
        if name == "__metadata__":
            # safetensors reads it as an optional map of strings to strings
            if entry is not None and not (isinstance(entry, dict) and all(isinstance(v, str)
                                                                          for v in entry.values())):
                raise CheckpointError(f"{path}: __metadata__ is {shown(entry)}, not an object of strings; the "
                                      "file is corrupt, re-download it")
            continue
        entries.append((name, *_entry(path, name, entry)))
    base, expected = 8 + length, 0
    infos = {}
    for name, dtype, shape, begin, end in sorted(entries, key=lambda e: (e[3], e[4])):
        where = f"{path}: tensor {quoted_name(name)}"
        if begin != expected:
            problem = ("overlaps the tensor before it" if begin < expected
                       else f"leaves {begin - expected} unused bytes before it")
            raise CheckpointError(f"{where} starts at data byte {begin}, expected {expected} ({problem}); the file "
                                  "is corrupt, re-download it")
        needed = math.prod(shape) * dtype.itemsize
        if end - begin != needed:
            raise CheckpointError(f"{where} has {end - begin} bytes, but shape {list(shape)} of {dtype.name} needs "
                                  f"{needed}; the file is corrupt, re-download it")
        if base + end > size:
            raise CheckpointError(f"{path}: truncated (tensor {quoted_name(name)} ends past the end of the file); "
                                  "re-download it")
        infos[name] = TensorInfo(path, dtype, shape, base + begin, base + end)
        expected = end
    if base + expected != size:
        raise CheckpointError(f"{path}: {size - base - expected} bytes after the last tensor, which no header "
                              "entry describes; the file is corrupt, re-download it")
    return {name: infos[name] for name, *_ in entries}  # keys() keeps the order of the file


class SafetensorsCheckpoint:
    """All tensors of a checkpoint, addressed by name, read lazily."""

    def __init__(self, source):
        self.source = Path(source)
        self.files = _resolve_files(self.source)
        self.tensors: dict[str, TensorInfo] = {}
        for file in self.files:
            for name, info in read_header(file).items():
                if name in self.tensors:
                    raise CheckpointError(f"{file}: tensor {name} also appears in {self.tensors[name].file}")
                self.tensors[name] = info

    def keys(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        return self.tensors[name]

    def get(self, name: str) -> np.ndarray:
        info = self.tensors[name]  # sizes were checked against the file when its header was read
        out = np.empty(info.shape, dtype=info.dtype)
        with open(info.file, "rb") as f:
            f.seek(info.start)
            read = f.readinto(memoryview(out.reshape(-1).view(np.uint8)))
        if read != info.end - info.start:
            raise CheckpointError(f"{info.file}: shorter than when it was opened (tensor {name} is cut off); was it "
                                  "replaced while reading? Re-download it")
        return out

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for name in self.tensors:
            yield name, self.get(name)


def _resolve_files(source: Path) -> list[Path]:
    if not source.exists():
        raise CheckpointError(f"{source}: no such file or folder; pass a released checkpoint folder "
                              "(with safe_ckpt/metadata.json) or .safetensors files")
    if source.is_file():
        if source.suffix != ".safetensors":
            raise CheckpointError(f"{source}: not a .safetensors file")
        return [source]
    for folder in (source / "safe_ckpt", source):
        metadata = folder / "metadata.json"
        if metadata.is_file():
            chunks = parse_json(metadata, metadata.read_bytes(), "chunk index")
            if not (isinstance(chunks, dict) and all(isinstance(names, list) and all(isinstance(n, str) for n in names)
                                                     for names in chunks.values())):
                raise CheckpointError(f"{metadata}: not a chunk index (an object mapping each chunk name to its list "
                                      "of tensor names); re-download it")
            for chunk in chunks:
                # Chunk names become file names: one that could point outside the folder is refused.
                if not chunk or any(part in chunk for part in ("/", "\\", "..", "\0")):
                    raise CheckpointError(f"{metadata}: chunk name {shown(chunk)} is not a plain file name; "
                                          "re-download it")
            files = [folder / f"{chunk}.safetensors" for chunk in chunks]
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{metadata} lists chunks that are missing: {', '.join(missing)}; "
                                      "download every chunk")
            return files
    files = sorted(source.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{source}: no safe_ckpt/metadata.json and no .safetensors files in it")
    return files


_CODES = {np.dtype(v): k for k, v in _DTYPES.items()}


def write_safetensors(path: Path, entries) -> None:
    """Writes a safetensors file tensor by tensor. `entries`: (name, shape, dtype, produce) where `produce()`
    returns the array; the header is written first from the shapes, so only one tensor is in memory at a time."""
    header, offset = {}, 0
    for name, shape, dtype, _ in entries:
        dtype = np.dtype(dtype)
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format aligns tensor data to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for name, shape, dtype, produce in entries:
            array = np.asarray(produce(), dtype=np.dtype(dtype))  # ascontiguousarray would make 0-d arrays 1-d
            if array.shape != tuple(shape):
                raise CheckpointError(f"internal error: {name} produced {array.shape}, expected {tuple(shape)}")
            f.write(array.tobytes(order="C"))
