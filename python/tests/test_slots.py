"""quiver.slots computes the slots quiverd does: the values pinned here are the engine's
(storage/src/slot.rs pins the same ones)."""

from __future__ import annotations

import pytest

from quiver.slots import SLOTS, encode_entity_key, slot_of


@pytest.mark.parametrize(
    ("key", "slot"),
    [("", 1521), ("u1", 2258), ("user-42", 831), (0, 2825), (-7, 553), (("u1", 3), 3486)],
)
def test_slot_values_are_the_engines(key: str | int | tuple[str | int, ...], slot: int) -> None:
    assert slot_of(key) == slot


def test_keys_encode_as_the_engine_does() -> None:
    assert encode_entity_key(["a\x00b"]) == b"\x01a\x00\xffb\x00\x01"
    assert encode_entity_key([-1]) == b"\x02" + bytes([0x7F] + [0xFF] * 7)
    assert encode_entity_key([0, "x"]) == b"\x02\x80" + bytes(7) + b"\x01x\x00\x01"


def test_slots_cover_the_range_and_bad_parts_are_refused() -> None:
    seen = {slot_of(f"u{i}") for i in range(20_000)}
    assert min(seen) >= 0 and max(seen) < SLOTS and len(seen) > 4000
    with pytest.raises(TypeError):
        slot_of(True)
    with pytest.raises(TypeError):
        slot_of((1.5,))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        slot_of(1 << 63)
