"""Pack b-bit integers densely into bytes, row by row, and back.

Each row is one little-endian bit stream: value j of a row occupies bits [j·b, (j+1)·b) of it,
least significant bit first. That makes
    8 bits   one value per byte, as is
    4 bits   two per byte, low nibble first
    2 bits   four per byte, lowest bits first
    3 bits   eight values in three bytes
and a row of n values takes ceil(n·b / 8) bytes, whatever n (the last byte is zero-padded).
"""

import torch
from torch import Tensor

from llmlab.errors import LlmlabError

_BIT = 1 << torch.arange(8, dtype=torch.uint8)  # bit weights of one byte, LSB first


def packed_width(in_features: int, bits: int) -> int:
    return (in_features * bits + 7) // 8


def pack(q: Tensor, bits: int) -> Tensor:
    """uint8 (out, in) with values < 2**bits -> uint8 (out, ceil(in*bits/8))."""
    _check_bits(bits)
    q = q.to(torch.uint8)
    if bits == 8:
        return q.contiguous()
    out, n = q.shape
    if 8 % bits == 0:  # 2 and 4 bits: whole values per byte, a shift-and-or over the byte's slots
        per = 8 // bits
        q = torch.nn.functional.pad(q, (0, -n % per)).reshape(out, -1, per)
        packed = torch.zeros(q.shape[:2], dtype=torch.uint8)
        for slot in range(per):
            packed |= q[:, :, slot] << (slot * bits)
        return packed
    stream = ((q[:, :, None] >> torch.arange(bits, dtype=torch.uint8)) & 1).reshape(out, -1)  # (out, in*bits)
    stream = torch.nn.functional.pad(stream, (0, -stream.shape[1] % 8)).reshape(out, -1, 8)
    return (stream * _BIT).sum(-1, dtype=torch.uint8)


def unpack(packed: Tensor, bits: int, in_features: int) -> Tensor:
    """The inverse of pack: uint8 (out, ceil(in*bits/8)) -> uint8 (out, in_features)."""
    _check_bits(bits)
    if packed.shape[-1] != packed_width(in_features, bits):
        raise LlmlabError(f"packed {bits}-bit rows hold {packed.shape[-1]} bytes, but {in_features} values "
                          f"need {packed_width(in_features, bits)}")
    if bits == 8:
        return packed
    out = packed.shape[0]
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
        return ((packed[:, :, None] >> shifts) & mask).reshape(out, -1)[:, :in_features]
    stream = ((packed[:, :, None] >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(out, -1)
    stream = stream[:, :in_features * bits].reshape(out, in_features, bits)
    return (stream * _BIT[:bits]).sum(-1, dtype=torch.uint8)


def _check_bits(bits: int):
    if not 1 <= bits <= 8:
        raise LlmlabError(f"can pack 1 to 8 bits per value, not {bits}")
