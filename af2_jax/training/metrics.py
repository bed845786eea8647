"""Training metrics to the console, to `metrics.jsonl`, and to TensorBoard event files (written directly in the
TFRecord + `Event` protobuf format, so no TensorFlow or tensorboard package is needed to produce them)."""

from __future__ import annotations

import json
import socket
import struct
import time
from pathlib import Path


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        out.append(bits | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
    return _varint(number << 3 | wire) + payload


def _bytes_field(number: int, data: bytes) -> bytes:
    return _field(number, 2, _varint(len(data)) + data)


def event(wall_time: float, step: int, *, file_version: str | None = None, scalars: dict | None = None) -> bytes:
    """An `Event` message: wall_time (1, double), step (2, int64), file_version (3) or summary (5) of
    `Summary.Value{tag (1), simple_value (2, float)}`."""
    body = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
    if file_version is not None:
        body += _bytes_field(3, file_version.encode())
    if scalars:
        values = b"".join(_bytes_field(1, _bytes_field(1, tag.encode()) + _field(2, 5, struct.pack("<f", value)))
                          for tag, value in scalars.items())
        body += _bytes_field(5, values)
    return body


def record(data: bytes) -> bytes:
    """One TFRecord: length, masked CRC of the length, data, masked CRC of the data."""
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", masked_crc(header)) + data + struct.pack("<I", masked_crc(data))


class MetricsWriter:
    """Appends scalars to `DIR/events.out.tfevents.*` and `DIR/metrics.jsonl`; only the main process writes."""

    def __init__(self, folder, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
        self._events = open(folder / name, "ab")
        self._jsonl = open(folder / "metrics.jsonl", "a")
        self._events.write(record(event(time.time(), 0, file_version="brain.Event:2")))

    def scalars(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        values = {k: float(v) for k, v in values.items()}
        self._events.write(record(event(time.time(), step, scalars=values)))
        self._events.flush()
        self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self._events.close()
            self._jsonl.close()


def read_scalars(path) -> list[tuple[int, dict]]:
    """Reads back (step, {tag: value}) from an event file written here, checking every CRC."""
    data = Path(path).read_bytes()
    out, pos = [], 0
    while pos < len(data):
        header = data[pos: pos + 8]
        (length,) = struct.unpack("<Q", header)
        if struct.unpack("<I", data[pos + 8: pos + 12])[0] != masked_crc(header):
            raise ValueError(f"{path}: bad length CRC at byte {pos}")
        body = data[pos + 12: pos + 12 + length]
        if struct.unpack("<I", data[pos + 12 + length: pos + 16 + length])[0] != masked_crc(body):
            raise ValueError(f"{path}: bad data CRC at byte {pos}")
        pos += 16 + length
        step, values = _parse_event(body)
        if values:
            out.append((step, values))
    return out


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _fields(data: bytes):
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(data, pos)
        elif wire == 1:
            value, pos = data[pos: pos + 8], pos + 8
        elif wire == 5:
            value, pos = data[pos: pos + 4], pos + 4
        else:
            length, pos = _read_varint(data, pos)
            value, pos = data[pos: pos + length], pos + length
        yield number, value


def _parse_event(body: bytes) -> tuple[int, dict]:
    step, values = 0, {}
    for number, value in _fields(body):
        if number == 2:
            step = value
        elif number == 5:
            for _, entry in _fields(value):
                fields = dict(_fields(entry))
                values[fields[1].decode()] = struct.unpack("<f", fields[2])[0]
    return step, values
