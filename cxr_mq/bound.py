"""Bound objects: an uploaded update names its round and its hospital in a small header.

An update object is ``BOUND_MAGIC``, a 2-byte big-endian length, a msgpack map
``{"round": r, "hospital": h}``, then the codec's stream. Its sha256, which covers the header,
is in the hospital's signed ``update_ready``; so the signature binds the object to (round,
hospital), and the aggregator, before adding anything, checks that the object it downloaded
is bound to the round and hospital the message names (and that the message names the one
key where that update may live, ``rounds/<r>/updates/<h>``: see ``RoundPolicy``). A copy of
an old or of another hospital's update therefore cannot be passed off in another round or
under another name without a signature of its own hospital over that very copy.
"""
from __future__ import annotations

from typing import BinaryIO

import msgpack

BOUND_MAGIC = b"CXRB\x01"
MAX_HEADER_BYTES = 512


class BindingError(ValueError):
    """An object that is not bound, or bound to another round or hospital; ``str`` is the reason."""


def write_header(out: BinaryIO, round_no: int, hospital: str) -> int:
    body = msgpack.packb({"round": int(round_no), "hospital": str(hospital)}, use_bin_type=True)
    if len(body) > MAX_HEADER_BYTES:
        raise BindingError(f"bound header too long ({len(body)} bytes)")
    data = BOUND_MAGIC + len(body).to_bytes(2, "big") + body
    out.write(data)
    return len(data)


def read_header(src: BinaryIO) -> tuple[int, str]:
    """Read the header at ``src``'s position; leaves ``src`` at the codec stream."""
    magic = src.read(len(BOUND_MAGIC))
    if magic != BOUND_MAGIC:
        raise BindingError("object is not bound to a round and hospital (no bound header)")
    size = int.from_bytes(src.read(2), "big")
    if not 0 < size <= MAX_HEADER_BYTES:
        raise BindingError(f"bound header length {size} out of range")
    body = src.read(size)
    try:
        fields = msgpack.unpackb(body, raw=False, strict_map_key=True)
        round_no, hospital = fields["round"], fields["hospital"]
    except Exception:  # noqa: BLE001 - msgpack raises several types; all mean "not a header"
        raise BindingError("bound header unreadable") from None
    if not isinstance(round_no, int) or isinstance(round_no, bool) or not isinstance(hospital, str):
        raise BindingError("bound header unreadable")
    return round_no, hospital


def check_header(src: BinaryIO, round_no: int, hospital: str) -> None:
    """Read the header and refuse an object bound to anything but (``round_no``, ``hospital``)."""
    bound_round, bound_hospital = read_header(src)
    if (bound_round, bound_hospital) != (round_no, hospital):
        raise BindingError(f"object is bound to round {bound_round} hospital {bound_hospital!r}, "
                           f"not round {round_no} hospital {hospital!r}")
