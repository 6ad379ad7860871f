"""The affine grid: exact numbers on toy rows, shapes of every grouping, and parity with torchao."""

import logging

import pytest
import torch

from llmlab.errors import LlmlabError
from llmlab.models.packed.quant import EPS, QuantSpec, dequantize, fake_quantize, fit_grid, quantize, quantize_column


def test_asymmetric_two_bit_row_by_hand():
    w = torch.tensor([[-1.0, 0.0, 0.5, 2.0]])
    spec = QuantSpec(bits=2, group_size=0)
    scale, zero = fit_grid(w, spec)
    assert scale.tolist() == [[1.0]] and zero.tolist() == [[1.0]]  # S = (2 - (-1)) / 3, Z = round(1 / S)
    q = quantize(w, scale, zero, spec)
    assert q.dtype == torch.uint8 and q.tolist() == [[0, 1, 1, 3]]  # round(0.5) = 0 (half to even), + Z
    assert dequantize(q, scale, zero, spec).tolist() == [[-1.0, 0.0, 0.0, 2.0]]


def test_symmetric_eight_bit_row_by_hand():
    w = torch.tensor([[-1.27, 0.5, 1.27, 0.0]])
    spec = QuantSpec(bits=8, group_size=0, symmetric=True)
    scale, zero = fit_grid(w, spec)
    assert scale.item() == pytest.approx(0.01) and zero.item() == 128  # S = absmax / 127, Z = 2^7
    assert quantize(w, scale, zero, spec).tolist() == [[1, 178, 255, 128]]


@pytest.mark.parametrize("group_size, shape", [(16, (6, 4)), (0, (6, 1)), (-1, (1, 1)), (64, (6, 1))])
def test_grid_shapes(group_size, shape):
    w = torch.randn(6, 64)
    for symmetric in (False, True):
        scale, zero = fit_grid(w, QuantSpec(4, group_size, symmetric))
        assert scale.shape == zero.shape == shape and scale.dtype == zero.dtype == torch.float32
        assert (scale > 0).all() and torch.equal(zero, zero.round()) and 0 <= zero.min() and zero.max() <= 15


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [False, True])
def test_round_to_nearest_error_is_at_most_half_a_step(bits, symmetric):
    torch.manual_seed(bits)
    w = torch.randn(8, 96)
    spec = QuantSpec(bits, 32, symmetric)
    scale, zero = fit_grid(w, spec)
    q = quantize(w, scale, zero, spec)
    assert int(q.max()) <= spec.qmax
    err = (dequantize(q, scale, zero, spec) - w).abs().reshape(8, 3, 32)
    assert (err <= scale[..., None] / 2 * (1 + 1e-5)).all()
    assert torch.equal(fake_quantize(w, spec), dequantize(q, scale, zero, spec))


def test_zero_stays_exact_and_all_zero_groups_are_safe():
    w = torch.randn(4, 32)
    w[:, :8] = 0  # a pruned block, and a whole group of zeros in row 0
    w[0, :16] = 0
    for symmetric in (False, True):
        spec = QuantSpec(3, 16, symmetric)
        scale, _ = fit_grid(w, spec)
        assert scale[0, 0] == EPS
        assert (fake_quantize(w, spec)[:, :8] == 0).all()


def test_quantize_column_is_the_same_rounding():
    """GPTQ's inner step must land on exactly the grid the stored layer dequantizes to."""
    w = torch.randn(5, 64)
    spec = QuantSpec(4, 16)
    scale, zero = fit_grid(w, spec)
    full = dequantize(quantize(w, scale, zero, spec), scale, zero, spec)
    for j in (0, 17, 63):
        assert torch.equal(quantize_column(w[:, j], scale[:, j // 16], zero[:, j // 16], spec.qmax), full[:, j])
    assert torch.equal(quantize_column(w[:, 16:32], scale[:, 1:2], zero[:, 1:2], spec.qmax), full[:, 16:32])


@pytest.mark.parametrize("kwargs, message", [
    ({"bits": 1}, "bits must be an integer from 2 to 8, got 1"),
    ({"bits": 9}, "bits must be an integer from 2 to 8, got 9"),
    ({"group_size": -2}, "got -2"),
])
def test_bad_specs_are_one_line_errors(kwargs, message):
    with pytest.raises(LlmlabError, match=message):
        QuantSpec(**kwargs)


def test_a_group_size_that_does_not_divide_the_row_takes_the_largest_divisor_below_it():
    spec = QuantSpec(4, 128)
    assert (spec.group_for(576), spec.n_groups(576)) == (96, 6)  # SmolLM2's width: 128 does not divide it
    assert (spec.group_for(1536), spec.n_groups(1536)) == (128, 12)
    w = torch.randn(4, 576)
    scale, zero = fit_grid(w, spec)
    assert scale.shape == (4, 6)
    torch.testing.assert_close(fake_quantize(w, spec), fake_quantize(w, QuantSpec(4, 96)))


# ---- parity with torchao's affine quantization primitives on the same weights ----

def _torchao():
    logging.getLogger("torchao").setLevel(logging.ERROR)  # it warns about CUDA-only .so files on import
    return pytest.importorskip("torchao.quantization.quant_primitives")


def _weights():
    torch.manual_seed(0)
    w = torch.randn(64, 256) * 0.02
    w[3, 7], w[10, 100] = 0.5, -0.4  # outliers, as real layers have
    return w


def test_int8_per_channel_symmetric_matches_torchao():
    """torchao's MappingType.SYMMETRIC divides absmax by (quant_max - quant_min) / 2, so its default
    int8 range [-128, 127] gives S = absmax / 127.5; ours (GPTQ's, LLM.int8()'s) is absmax / 127, the
    restricted range. Asked for [1, 255] in uint8, torchao fits the very grid we store (Z = 128):
    scales, zero points, integers and dequantized weights must be bit-identical."""
    tq = _torchao()
    w, spec = _weights(), QuantSpec(8, 0, symmetric=True)
    block = (1, w.shape[1])
    scale_ao, zero_ao = tq.choose_qparams_affine(w, tq.MappingType.SYMMETRIC, block, torch.uint8, quant_min=1,
                                                 quant_max=255, eps=EPS, scale_dtype=torch.float32)
    q_ao = tq.quantize_affine(w, block, scale_ao, zero_ao, torch.uint8, quant_min=1, quant_max=255)
    w_ao = tq.dequantize_affine(q_ao, block, scale_ao, zero_ao, torch.uint8, quant_min=1, quant_max=255)
    scale, zero = fit_grid(w, spec)
    q = quantize(w, scale, zero, spec)
    assert torch.equal(scale[:, 0], scale_ao.flatten()) and torch.equal(zero[:, 0].int(), zero_ao.flatten().int())
    assert torch.equal(q, q_ao)
    assert torch.equal(dequantize(q, scale, zero, spec), w_ao)  # tolerance 0


def test_int8_signed_view_matches_torchao_int8():
    """The same grid in torchao's signed int8 storage (range [-127, 127], Z = 0): q_ours - 128 == q_int8."""
    tq = _torchao()
    w, spec = _weights(), QuantSpec(8, 0, symmetric=True)
    block = (1, w.shape[1])
    scale_ao, zero_ao = tq.choose_qparams_affine(w, tq.MappingType.SYMMETRIC, block, torch.int8, quant_min=-127,
                                                 quant_max=127, eps=EPS, scale_dtype=torch.float32)
    q_ao = tq.quantize_affine(w, block, scale_ao, zero_ao, torch.int8, quant_min=-127, quant_max=127)
    scale, zero = fit_grid(w, spec)
    assert torch.equal(quantize(w, scale, zero, spec).int() - 128, q_ao.int())
    w_ao = tq.dequantize_affine(q_ao, block, scale_ao, zero_ao, torch.int8, quant_min=-127, quant_max=127)
    assert torch.equal(fake_quantize(w, spec), w_ao)


def test_int4_groupwise_asymmetric_matches_torchao():
    """Asymmetric with an integer zero point (torchao's choose_qparams_affine ASYMMETRIC, which like
    us stretches the range to include 0): identical. torchao's int4 *weight-only* path instead uses
    the tinygemm convention (float zero, Z_f = min + S·8, no rounding) — a different grid, so it is
    not the oracle here; our int4 kernel test covers that convention (test_qlinear)."""
    tq = _torchao()
    w, spec = _weights(), QuantSpec(4, 32, symmetric=False)
    block = (1, 32)
    scale_ao, zero_ao = tq.choose_qparams_affine(w, tq.MappingType.ASYMMETRIC, block, torch.uint8, quant_min=0,
                                                 quant_max=15, eps=EPS, scale_dtype=torch.float32,
                                                 zero_point_dtype=torch.int32)
    q_ao = tq.quantize_affine(w, block, scale_ao, zero_ao, torch.uint8, quant_min=0, quant_max=15)
    w_ao = tq.dequantize_affine(q_ao, block, scale_ao, zero_ao, torch.uint8, quant_min=0, quant_max=15)
    scale, zero = fit_grid(w, spec)
    q = quantize(w, scale, zero, spec)
    assert torch.equal(scale, scale_ao.reshape(scale.shape)) and torch.equal(zero.int(), zero_ao.reshape(zero.shape))
    assert torch.equal(q, q_ao)
    assert torch.equal(dequantize(q, scale, zero, spec), w_ao)  # tolerance 0
