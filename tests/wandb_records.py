"""Read a W&B offline run's transaction log (``run-<id>.wandb``): wandb 0.31 writes it but ships no reader.

The file is a 7-byte header (``b":W&B"``, magic 0xBEE1 as little-endian uint16, version 0) followed by LevelDB's
log format: 32 KiB blocks (counted from the start of the file, header included) holding chunks with a 7-byte
header ``crc32 (uint32 LE) | length (uint16 LE) | type (uint8)``, type FULL=1, FIRST=2, MIDDLE=3, LAST=4; a block
tail shorter than 7 bytes is zero padding. Unlike LevelDB, W&B's crc is plain zlib CRC-32 of the type byte and the
payload (no crc32c, no masking) - checked on files written by wandb 0.31. Each assembled payload is a serialized
``wandb.proto.wandb_internal_pb2.Record``; a ``history`` record is one ``run.log`` call, its items carry ``key`` (or
``nested_key``) and ``value_json``.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

BLOCK_SIZE = 32 * 1024
CHUNK_HEADER = struct.Struct("<IHB")
FILE_HEADER = struct.Struct("<4sHB")
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_payloads(path: str | Path) -> Iterator[bytes]:
    """The record payloads of a ``.wandb`` file, chunks reassembled and CRCs checked."""
    data = Path(path).read_bytes()
    ident, magic, version = FILE_HEADER.unpack_from(data, 0)
    if (ident, magic, version) != (b":W&B", 0xBEE1, 0):
        raise ValueError(f"{path} is not a W&B transaction log (header {ident!r} {magic:#x} v{version})")
    offset, pending = FILE_HEADER.size, None
    while offset + CHUNK_HEADER.size <= len(data):
        room = BLOCK_SIZE - offset % BLOCK_SIZE
        if room < CHUNK_HEADER.size:  # block trailer: skip to the next block
            offset += room
            continue
        crc, length, kind = CHUNK_HEADER.unpack_from(data, offset)
        if crc == length == kind == 0:  # zero padding (a preallocated or unfinished tail)
            offset += room
            continue
        start = offset + CHUNK_HEADER.size
        chunk = data[start : start + length]
        if len(chunk) != length or zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != crc:
            raise ValueError(f"{path}: corrupt chunk at byte {offset}")
        offset = start + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind in (MIDDLE, LAST) and pending is not None:
            pending += chunk
            if kind == LAST:
                yield pending
                pending = None
        else:
            raise ValueError(f"{path}: unexpected chunk type {kind} at byte {offset}")


def read_records(path: str | Path) -> Iterator[wandb_internal_pb2.Record]:
    for payload in read_payloads(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        yield record


def history_rows(path: str | Path) -> list[dict[str, Any]]:
    """Every ``run.log`` row as a dict of decoded JSON values; a media value (stored flattened under a
    ``nested_key`` such as ``["val/cam_panel", "captions"]``) comes back as one dict, e.g. ``row["val/cam_panel"]``."""
    rows = []
    for record in read_records(path):
        if record.WhichOneof("record_type") != "history":
            continue
        row: dict[str, Any] = {}
        for item in record.history.item:
            *parents, leaf = list(item.nested_key) or [item.key]
            node = row
            for parent in parents:
                node = node.setdefault(parent, {})
            node[leaf] = json.loads(item.value_json)
        rows.append(row)
    return rows


def finished_log(run_dir: str | Path, timeout: float = 60.0) -> Path:
    """The ``run-*.wandb`` file of an offline run folder, once its ``exit`` record is in.

    ``run.finish()`` can return before wandb's service has written the last records, so a reader waits for them.
    """
    files = sorted(Path(run_dir).glob("run-*.wandb"))
    if len(files) != 1:
        raise FileNotFoundError(f"expected one run-*.wandb in {run_dir}, found {[f.name for f in files]}")
    deadline = time.monotonic() + timeout
    while not any(record.WhichOneof("record_type") == "exit" for record in _complete_records(files[0])):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{files[0]} has no exit record after {timeout} s: the run did not finish")
        time.sleep(0.1)
    return files[0]


def _complete_records(path: Path) -> Iterator[wandb_internal_pb2.Record]:
    """The records of a log that may still be being written (a torn last chunk ends the iteration)."""
    try:
        yield from read_records(path)
    except ValueError:
        return
