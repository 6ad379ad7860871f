"""Bit packing: the documented byte layout, and exact round trips for every width, ragged rows included."""

import pytest
import torch

from llmlab.errors import LlmlabError
from llmlab.models.packed.bitpack import pack, packed_width, unpack


def test_layouts_by_hand():
    assert pack(torch.tensor([[1, 15, 2]], dtype=torch.uint8), 4).tolist() == [[0xF1, 0x02]]  # low nibble first
    assert pack(torch.tensor([[1, 2, 3, 0, 3]], dtype=torch.uint8), 2).tolist() == [[0b00111001, 0b11]]
    # 3 bits: eight values in three bytes, value j at bits 3j..3j+2 of a little-endian 24-bit word
    word = sum(v << (3 * j) for j, v in enumerate([1, 2, 3, 4, 5, 6, 7, 0]))
    expected = [word & 0xFF, (word >> 8) & 0xFF, word >> 16]
    assert pack(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]], dtype=torch.uint8), 3).tolist() == [expected]
    q = torch.tensor([[0, 255, 7]], dtype=torch.uint8)
    assert torch.equal(pack(q, 8), q)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("in_features", [1, 3, 8, 10, 13, 64, 100])
def test_round_trip_is_exact(bits, in_features):
    torch.manual_seed(bits * 1000 + in_features)
    q = torch.randint(0, 2 ** bits, (7, in_features), dtype=torch.uint8)
    packed = pack(q, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (7, -(-in_features * bits // 8)) == (7, packed_width(in_features, bits))
    assert torch.equal(unpack(packed, bits, in_features), q)


def test_three_bits_use_three_eighths_of_a_byte():
    q = torch.randint(0, 8, (4, 576), dtype=torch.uint8)
    assert pack(q, 3).shape == (4, 216)  # 576 * 3 / 8
    assert torch.equal(unpack(pack(q, 3), 3, 576), q)


def test_wrong_width_is_an_error():
    with pytest.raises(LlmlabError, match="packed 4-bit rows hold 3 bytes, but 8 values need 4"):
        unpack(torch.zeros(2, 3, dtype=torch.uint8), 4, 8)
