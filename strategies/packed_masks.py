"""Boolean masks held as packed bits: one bit an entry, an eighth of a bool tensor's bytes.

A statistics pass that has already drawn a tensor's masks (DELLA's, whose ranking costs a sort
per row) keeps them for the merge pass in this form, so that a large tensor (a big vocabulary's
embedding) fits the same memory budget as a small one kept as bools would.
"""

from __future__ import annotations

from collections import deque

import torch

BITS = 8
ONE_PER_BYTE = 0x0101010101010101


def pack_bits(flat: torch.Tensor) -> torch.Tensor:
    """A flat bool tensor of a multiple of 8 entries as bytes (entry 8j + b is bit b of byte j).

    Each 8 entries, as the 8 bytes of an int64 (0 or 1 each: bit 8b set for entry b), are folded
    into its low byte by shifts of 7, 14 and 28 (which together move bit 8b to bit b and put no
    other bit there): a few integer passes, where a multiply-and-sum over the bits takes 3-5x longer."""
    words = flat.to(torch.uint8, copy=True).view(torch.int64)
    words |= words >> 7
    words |= words >> 14
    words |= words >> 28
    return words.to(torch.uint8)


def unpack_bits(packed: torch.Tensor) -> torch.Tensor:
    """pack_bits undone, by the same shifts the other way: 8 bool entries a byte, flat."""
    words = packed.to(torch.int64)
    words |= words << 28
    words |= words << 14
    words |= words << 7
    return words.bitwise_and_(ONE_PER_BYTE).view(torch.uint8).view(torch.bool)


class PackedMasks:
    """Bool masks added in order and taken back in the same order and shapes, held as packed bits.

    Each added mask becomes one chunk of whole bytes; the entries left over at its end wait for
    the next mask's first ones to fill their byte, which then goes to the end of the previous
    chunk. So once `close()`d the masks hold ceil(entries / 8) bytes, and taking one mask back
    unpacks its own chunk (and fewer than 8 entries of the next)."""

    def __init__(self) -> None:
        self.chunks: deque[torch.Tensor] = deque()  # uint8, whole bytes
        self.pending: torch.Tensor | None = None  # the last mask's entries not yet packed (< 8)
        self.unpacked: torch.Tensor | None = None  # entries unpacked by take() but not yet taken (< 8)
        self.entries = 0  # entries added and not yet taken

    @property
    def nbytes(self) -> int:
        """Bytes held now (chunks, pending and unpacked entries)."""
        loose = sum(t.numel() for t in (self.pending, self.unpacked) if t is not None)
        return sum(c.numel() for c in self.chunks) + loose

    def add(self, mask: torch.Tensor) -> None:
        flat = mask.reshape(-1).bool()
        self.entries += flat.numel()
        if self.pending is not None:  # fill the byte the previous mask left open
            filled = torch.cat([self.pending, flat[: BITS - self.pending.numel()]])
            flat = flat[BITS - self.pending.numel() :]
            self.pending = None
            if filled.numel() < BITS:
                self.pending = filled
                return
            self._append_to_last(pack_bits(filled))
        whole = flat.numel() // BITS * BITS
        if whole:
            self.chunks.append(pack_bits(flat[:whole]))
        if whole < flat.numel():
            self.pending = flat[whole:].clone()

    def close(self) -> None:
        """Pack the last entries (padded to a byte): no more masks will be added."""
        if self.pending is not None:
            padding = torch.zeros(BITS - self.pending.numel(), dtype=torch.bool, device=self.pending.device)
            self._append_to_last(pack_bits(torch.cat([self.pending, padding])))
            self.pending = None

    def take(self, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        """The oldest mask not yet taken, of this shape, as bool (after close())."""
        n = 1
        for d in shape:
            n *= d
        if n > self.entries:
            raise ValueError(f"internal: {n} mask entries asked for, {self.entries} held")
        parts = [] if self.unpacked is None else [self.unpacked]
        have = sum(p.numel() for p in parts)
        while have < n:
            parts.append(unpack_bits(self.chunks.popleft()))
            have += parts[-1].numel()
        if not parts:  # an empty mask
            return torch.zeros(shape, dtype=torch.bool)
        flat = parts[0] if len(parts) == 1 else torch.cat(parts)
        self.unpacked = flat[n:].clone() if have > n else None
        self.entries -= n
        if not self.entries:  # what is left is the last byte's padding
            self.unpacked = None
        return flat[:n].reshape(shape)

    def _append_to_last(self, byte: torch.Tensor) -> None:
        if self.chunks:
            self.chunks[-1] = torch.cat([self.chunks[-1], byte])
        else:
            self.chunks.append(byte)


def packed_bytes(entries: int) -> int:
    """Bytes PackedMasks holds for this many entries once closed."""
    return (entries + BITS - 1) // BITS
