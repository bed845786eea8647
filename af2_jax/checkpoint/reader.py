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
import os
import struct
from pathlib import Path
from typing import Iterator

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_MAX_HEADER_BYTES = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as given. The message names the file or tensor and the fix."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset of the data
    end: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor name -> TensorInfo from a safetensors file header (no tensor data read)."""
    try:
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) != 8:
                raise CheckpointError(f"{path}: too short to be a safetensors file; re-download it")
            (length,) = struct.unpack("<Q", prefix)
            if length > _MAX_HEADER_BYTES:
                raise CheckpointError(f"{path}: not a safetensors file (header length {length}); re-download it")
            header = json.loads(f.read(length))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: corrupt safetensors header; re-download the file") from None
    base = 8 + length
    size = os.path.getsize(path)
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry["dtype"] not in _DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {entry['dtype']}")
        start, end = entry["data_offsets"]
        if base + end > size:
            raise CheckpointError(f"{path}: truncated (tensor {name} ends past the end of the file); re-download it")
        tensors[name] = TensorInfo(path, np.dtype(_DTYPES[entry["dtype"]]), tuple(entry["shape"]), base + start,
                                   base + end)
    return tensors


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
        info = self.tensors[name]
        count = int(np.prod(info.shape, dtype=np.int64))
        out = np.empty(info.shape, dtype=info.dtype)
        if info.end - info.start != count * info.dtype.itemsize:
            raise CheckpointError(f"{info.file}: tensor {name} has {info.end - info.start} bytes, expected "
                                  f"{count * info.dtype.itemsize}; the file is corrupt")
        with open(info.file, "rb") as f:
            f.seek(info.start)
            f.readinto(memoryview(out.reshape(-1).view(np.uint8)))
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
            try:
                chunks = json.loads(metadata.read_text())
            except json.JSONDecodeError:
                raise CheckpointError(f"{metadata}: not valid JSON; re-download it") from None
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
