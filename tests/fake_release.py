"""Sparse fake releases: safetensors files whose headers are real and whose data is a file hole, so a 37 GB release
costs no disk. Built from the fixtures' shape maps (`af2_*_shapes.json`)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

_CODES = {"float32": ("F32", 4), "int64": ("I64", 8), "bfloat16": ("BF16", 2), "float16": ("F16", 2)}


def full_state_dict(shape_map: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every name of the released state_dict (aliases included) -> (shape, dtype), in the original order."""
    tensors = {k: (tuple(v[0]), v[1]) for k, v in shape_map["state_dict"].items()}
    for alias, twin in shape_map["aliases"].items():
        tensors[alias] = tensors[twin]
    return tensors


def constant_buffers(tensors: dict[str, tuple[tuple[int, ...], str]], config) -> dict[str, np.ndarray]:
    """Real values for the constant buffers (relative_position_index, attn_mask, inv_freq), which a converter checks."""
    from af2_jax.checkpoint import keymap

    values = {}
    for name in tensors:
        kind = keymap.constant_kind(name)
        if kind is not None:
            values[name] = keymap.expected_constant(config, kind[0], *kind[1])
    return values


def write_sparse_safetensors(path: Path, tensors: dict[str, tuple[tuple[int, ...], str]],
                             data: dict[str, np.ndarray] | None = None) -> None:
    """Headers for `tensors`; data only for the names in `data`, a hole everywhere else."""
    data = data or {}
    header, offset = {}, 0
    for name, (shape, dtype) in tensors.items():
        code, size = _CODES[dtype]
        nbytes = int(np.prod(shape, dtype=np.int64)) * size
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        f.truncate(8 + len(encoded) + offset)  # the data is a hole: no disk blocks
        for name, value in data.items():
            if name in header:
                f.seek(8 + len(encoded) + header[name]["data_offsets"][0])
                f.write(np.asarray(value).tobytes())


def write_sparse_release(folder: Path, tensors: dict[str, tuple[tuple[int, ...], str]], chunks: int = 2,
                         data: dict[str, np.ndarray] | None = None) -> Path:
    """`folder/safe_ckpt/metadata.json` + `chunks` sparse chunk files, names split in order."""
    safe = folder / "safe_ckpt"
    safe.mkdir(parents=True)
    names = list(tensors)
    per_chunk = -(-len(names) // chunks)
    metadata = {}
    for c in range(chunks):
        part = names[c * per_chunk:(c + 1) * per_chunk]
        metadata[f"model_chunk_{c}"] = part
        write_sparse_safetensors(safe / f"model_chunk_{c}.safetensors", {n: tensors[n] for n in part}, data)
    (safe / "metadata.json").write_text(json.dumps(metadata))
    return folder
