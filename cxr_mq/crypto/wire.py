"""The wire format: what an update, an aggregate and a key file look like as bytes.

Stream format (an update and an aggregate look the same)::

    MAGIC (8 bytes) | u32 header length | msgpack header | chunk*
    chunk := u32 blob length | blob

The header names the format version, profile, key fingerprint, parameter count, chunk count
and how many updates the stream sums. A key file is ``KEY_MAGIC`` and a msgpack payload
whose ``profile`` field names the codec class that reads it. Also here: packing uint64
words into fixed-width little-endian records, as chunks carry them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import BinaryIO

import msgpack
import numpy as np

from .errors import CodecError

UPDATE_MAGIC = b"CXRMQct\x01"
KEY_MAGIC = b"CXRMQky\x01"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 1 << 16
MAX_CHUNK_BYTES = 1 << 26
MAX_PARAMS = 1 << 33
MAX_UPDATES = 1 << 20  # what a header may claim at all; a round allows far fewer
MAX_CONTRIBUTORS = 10_000  # the most updates any round's sum may take
U32 = struct.Struct(">I")


@dataclass(frozen=True)
class UpdateHeader:
    profile: str
    fingerprint: str
    n_params: int
    n_chunks: int
    n_updates: int = 1  # how many updates this stream sums (1 for a single update)


def read_exact(src: BinaryIO, n: int, what: str, error: type[CodecError] = CodecError) -> bytes:
    parts = []
    remaining = n
    while remaining:
        part = src.read(remaining)
        if not part:
            raise error(f"truncated stream: {what} needs {n} bytes, got {n - remaining}")
        parts.append(part)
        remaining -= len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def write_frame(out: BinaryIO, blob: bytes) -> int:
    out.write(U32.pack(len(blob)))
    out.write(blob)
    return U32.size + len(blob)


def read_frame(src: BinaryIO, what: str, limit: int = MAX_CHUNK_BYTES) -> bytes:
    (length,) = U32.unpack(read_exact(src, U32.size, f"{what} length"))
    if length > limit:
        raise CodecError(f"{what} claims {length} bytes, more than the limit {limit}")
    return read_exact(src, length, what)


def write_header(out: BinaryIO, header: UpdateHeader) -> int:
    body = msgpack.packb(
        {
            "v": FORMAT_VERSION,
            "profile": header.profile,
            "fingerprint": header.fingerprint,
            "n_params": header.n_params,
            "n_chunks": header.n_chunks,
            "n_updates": header.n_updates,
        }
    )
    out.write(UPDATE_MAGIC)
    return len(UPDATE_MAGIC) + write_frame(out, body)


def parse_header(src: BinaryIO) -> UpdateHeader:
    magic = read_exact(src, len(UPDATE_MAGIC), "magic")
    if magic != UPDATE_MAGIC:
        raise CodecError(f"not a cxr-mq ciphertext stream (magic {magic!r})")
    body = read_frame(src, "header", MAX_HEADER_BYTES)
    try:
        fields = msgpack.unpackb(body)
        if fields["v"] != FORMAT_VERSION:
            raise CodecError(f"stream format version {fields['v']}, this codec reads {FORMAT_VERSION}")
        header = UpdateHeader(
            profile=str(fields["profile"]),
            fingerprint=str(fields["fingerprint"]),
            n_params=int(fields["n_params"]),
            n_chunks=int(fields["n_chunks"]),
            n_updates=int(fields["n_updates"]),
        )
    except CodecError:
        raise
    except Exception as exc:  # msgpack, KeyError, TypeError: all mean a bad header
        raise CodecError(f"unreadable stream header: {exc}") from exc
    if not (1 <= header.n_params <= MAX_PARAMS and header.n_chunks >= 1 and 1 <= header.n_updates <= MAX_UPDATES):
        raise CodecError(f"stream header out of range: {header}")
    return header


def expect_eof(src: BinaryIO) -> None:
    if src.read(1):
        raise CodecError("trailing bytes after the last chunk")


def read_into(src: BinaryIO, view: memoryview, what: str) -> None:
    readinto = getattr(src, "readinto", None)
    offset = 0
    while offset < len(view):
        if readinto is not None:
            got = readinto(view[offset:])
        else:
            part = src.read(len(view) - offset)
            got = len(part) if part else 0
            view[offset : offset + got] = part or b""
        if not got:
            raise CodecError(f"truncated stream: {what} needs {len(view)} bytes, got {offset}")
        offset += got


def pack_words(values: np.ndarray, width: int) -> bytes:
    """Little-endian ``width``-byte records of uint64 ``values`` whose top bytes are zero.

    Even and odd records are OR-ed in as overlapping unaligned words: records of one parity
    never overlap each other, and the bytes a word spills into its neighbour are zero.
    """
    flat = np.ascontiguousarray(values, dtype=np.uint64).reshape(-1)
    if flat.size % 2:
        flat = np.append(flat, np.uint64(0))
    out = np.zeros(flat.size * width + 8, dtype=np.uint8)
    half = flat.size // 2
    for parity in (0, 1):
        words = strided_words(out, parity * width, (half,), (2 * width,))
        np.bitwise_or(words, flat[parity::2], out=words)
    return out[: values.size * width].tobytes()


def unpack_words(data, width: int) -> np.ndarray:
    """The uint64 values of consecutive little-endian ``width``-byte records (the inverse of
    :func:`pack_words`)."""
    buf = bytes(data) + bytes(8 - width)  # the last record is read as a whole word
    count = (len(buf) - (8 - width)) // width
    return strided_words(buf, 0, (count,), (width,)) & np.uint64((1 << (8 * width)) - 1)


def strided_words(buf, offset: int, shape: tuple, strides: tuple) -> np.ndarray:
    return np.ndarray(shape, dtype="<u8", buffer=buf, offset=offset, strides=strides)


def pack_key(payload: dict) -> bytes:
    return KEY_MAGIC + msgpack.packb(payload, use_bin_type=True)
