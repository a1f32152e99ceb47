"""Slots of a sharded region (``server/CLUSTER.md`` §1): which of the 4,096 slots an entity
belongs to, computed exactly as quiverd does, so a client can send each entity to its owner.

    from quiver.slots import slot_of
    slot_of("u1")          # a one-part key
    slot_of(("u1", 3))     # a composite key (string and int64 parts)
"""

from __future__ import annotations

from collections.abc import Sequence

#: How many slots a sharded region's entities are split into (``SLOTS`` in the engine).
SLOTS = 4096
#: The salt of the slot hash (``SLOT_HASH_SALT`` in the engine).
SLOT_HASH_SALT = b"quiver/slot\x00"

_MASK = (1 << 64) - 1
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1

KeyPart = str | int


def encode_entity_key(parts: Sequence[KeyPart]) -> bytes:
    """The engine's encoding of an entity key: per part a type tag, then a string's UTF-8 bytes
    with ``0x00`` escaped as ``0x00 0xff`` and ended by ``0x00 0x01``, or an int64's 8
    big-endian bytes with the sign bit flipped."""
    out = bytearray()
    for p in parts:
        if isinstance(p, bool) or not isinstance(p, str | int):
            raise TypeError(f"entity key parts are str or int, not {type(p).__name__}")
        if isinstance(p, str):
            out.append(0x01)
            out += p.encode().replace(b"\x00", b"\x00\xff")
            out += b"\x00\x01"
        else:
            if not _INT64_MIN <= p <= _INT64_MAX:
                raise ValueError(f"entity key part {p} is outside int64")
            out.append(0x02)
            out += ((p & _MASK) ^ (1 << 63)).to_bytes(8, "big")
    return bytes(out)


def stable_hash64(data: bytes, salt: bytes = b"") -> int:
    """The engine's fixed hash: FNV-1a over ``salt`` then ``data``, then MurmurHash3's 64-bit
    finaliser."""
    h = 0xCBF29CE484222325
    for b in salt + data:
        h ^= b
        h = (h * 0x100000001B3) & _MASK
    h ^= h >> 33
    h = (h * 0xFF51AFD7ED558CCD) & _MASK
    h ^= h >> 33
    h = (h * 0xC4CEB9FE1A85EC53) & _MASK
    return h ^ (h >> 33)


def slot_of(key: KeyPart | Sequence[KeyPart]) -> int:
    """The slot of an entity key (one part, or a tuple or list of parts)."""
    parts: Sequence[KeyPart] = (key,) if isinstance(key, str | int) else key
    return stable_hash64(encode_entity_key(parts), SLOT_HASH_SALT) >> (64 - 12)
