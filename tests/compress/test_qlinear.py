"""QuantLinear: packed storage, torch's integer kernels against the dequantized weight, and the fallbacks."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from llmlab.models.packed.io import LAYERS as QUANTIZED
from llmlab.models.packed.qlinear import QuantLinear, quantized_linears
from llmlab.models.packed.quant import QuantSpec, fit_grid, quantize


def _layer(spec, out_features=64, in_features=256, bias=True, seed=0):
    torch.manual_seed(seed)
    return QuantLinear.from_float(nn.Linear(in_features, out_features, bias=bias), spec)


def _reference(layer, x):
    return F.linear(x.float(), layer.dequantized_weight(), None if layer.bias is None else layer.bias.float())


KERNEL_CASES = [  # spec, the kernel it must pick
    (QuantSpec(8, 0, symmetric=True), "int8"),
    (QuantSpec(8, -1, symmetric=True), "int8"),
    (QuantSpec(4, 32), "int4"),
    (QuantSpec(4, 128, symmetric=True), "int4"),
    (QuantSpec(4, 0), "int4"),       # per channel: kernel groups of 256, the row's scale repeated
    (QuantSpec(4, 64 * 3), "int4"),  # groups of 192 → kernel groups of 64
    (QuantSpec(4, 100), "int4"),     # 100 does not divide 576: groups of 96 → kernel groups of 32
]


@pytest.mark.parametrize("spec, kind", KERNEL_CASES)
def test_kernel_layouts_are_exactly_the_stored_grid(spec, kind, monkeypatch):
    """In fp32 (slow, for this check) the kernels differ from F.linear on Ŵ only in summation order."""
    monkeypatch.setattr(QuantLinear, "kernel_dtype", torch.float32)
    layer = _layer(spec, in_features=576 if spec.group_size in (100, 192) else 256)
    x = torch.randn(2, 5, layer.in_features)
    y = layer(x)
    assert layer._kernel["kind"] == kind
    assert y.dtype == torch.float32 and y.shape == (2, 5, 64)
    torch.testing.assert_close(y, _reference(layer, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec, kind", KERNEL_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_in_bf16_match_the_dequantized_weight(spec, kind, dtype):
    """By default the kernels take bf16 activations and scales: bf16's 8-bit mantissa is the tolerance."""
    layer = _layer(spec, in_features=576 if spec.group_size in (100, 192) else 256)
    x = torch.randn(2, 5, layer.in_features, dtype=dtype)
    y = layer(x)
    assert layer._kernel["kind"] == kind and y.dtype == dtype
    ref = _reference(layer, x)
    assert (y.float() - ref).abs().max() <= 2e-2 * ref.abs().max()


@pytest.mark.parametrize("spec", [QuantSpec(3, 64), QuantSpec(2, 32, True), QuantSpec(8, 0), QuantSpec(8, 32, True)])
def test_other_formats_dequantize_and_matmul(spec):
    layer = _layer(spec)
    x = torch.randn(3, 256)
    torch.testing.assert_close(layer(x), _reference(layer, x), rtol=1e-6, atol=1e-6)
    assert layer._kernel is None


def test_use_kernels_false_takes_the_dequantize_path(monkeypatch):
    layer = _layer(QuantSpec(4, 32))
    x = torch.randn(4, 256)
    monkeypatch.setattr(QuantLinear, "use_kernels", False)
    torch.testing.assert_close(layer(x), _reference(layer, x), rtol=1e-6, atol=1e-6)
    assert layer._kernel is None


@pytest.mark.parametrize("spec", [QuantSpec(8, 0, True), QuantSpec(4, 32), QuantSpec(3, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_output_dtype_follows_the_input(spec, dtype):
    layer = _layer(spec)
    assert layer(torch.randn(1, 3, 256, dtype=dtype)).dtype == dtype


def test_int4_kernel_needs_rows_in_sixteens():
    layer = _layer(QuantSpec(4, 32), out_features=24)
    x = torch.randn(2, 256)
    torch.testing.assert_close(layer(x), _reference(layer, x), rtol=1e-6, atol=1e-6)
    assert layer._kernel is None


def test_storage_is_packed_and_the_kernel_layout_is_not_saved():
    layer = _layer(QuantSpec(4, 32), out_features=64, in_features=256)
    assert layer.qweight.shape == (64, 128) and layer.qweight.dtype == torch.uint8
    assert layer.scales.shape == layer.zeros.shape == (64, 8) and layer.zeros.dtype == torch.uint8
    layer(torch.randn(1, 256))
    assert layer._kernel is not None
    assert set(layer.state_dict()) == {"qweight", "scales", "zeros", "bias"}
    three = _layer(QuantSpec(3, 64), in_features=256)
    assert three.qweight.shape == (64, 96)  # 256 * 3 / 8 bytes per row


def test_moving_the_layer_rebuilds_the_kernel_layout():
    layer = _layer(QuantSpec(8, 0, True))
    x = torch.randn(2, 256)
    y = layer(x)
    layer.to(torch.bfloat16)
    assert layer._kernel is None and layer.scales.dtype == torch.bfloat16
    assert layer(x.bfloat16()).dtype == torch.bfloat16
    other = _layer(QuantSpec(8, 0, True), seed=1)
    layer.load_state_dict(other.state_dict())
    assert layer._kernel is None
    assert not torch.allclose(layer(x.bfloat16()).float(), y, atol=1e-2)


def test_gradients_flow_to_the_input_through_the_dequantize_path():
    """The kernels have no backward; LoRA on a quantized base needs dL/dx, never dL/dW."""
    layer = _layer(QuantSpec(4, 32))
    x = torch.randn(2, 256, requires_grad=True)
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, layer.dequantized_weight().sum(0).expand(2, -1), rtol=1e-5, atol=1e-5)
    assert all(not p.requires_grad for p in layer.parameters())


def test_from_float_takes_a_solved_grid_and_conv1d():
    torch.manual_seed(0)
    linear, spec = nn.Linear(64, 32), QuantSpec(4, 16)
    scale, zero = fit_grid(linear.weight, spec)
    q = quantize(linear.weight, scale, zero, spec)
    layer = QuantLinear.from_float(linear, spec, q=q, scale=scale, zero=zero)
    torch.testing.assert_close(layer.dequantized_weight(), (q.float() - zero.repeat_interleave(16, 1))
                               * scale.repeat_interleave(16, 1))
    with pytest.raises(ValueError, match="do not fit a 32x64 weight"):
        QuantLinear.from_float(linear, spec, q=q[:, :32], scale=scale, zero=zero)
    conv = Conv1D(32, 64)  # GPT-2's linear: y = x @ W + b with W (in, out)
    conv.weight.data.normal_()
    from_conv = QuantLinear.from_float(conv, spec)
    assert (from_conv.in_features, from_conv.out_features) == (64, 32)
    x = torch.randn(3, 64)
    assert (from_conv(x) - conv(x)).abs().max() < 0.3 * conv(x).abs().max()


def test_registry_and_rebuild_from_config():
    layer = _layer(QuantSpec(4, 32))
    assert QUANTIZED["weight_only"] is QuantLinear and layer.kind == "weight_only"
    empty = QUANTIZED[layer.kind].empty(256, 64, True, **layer.config())
    empty.load_state_dict(layer.state_dict())
    x = torch.randn(2, 256)
    assert torch.equal(empty(x), layer(x))
    model = nn.Sequential(nn.Linear(4, 4), layer)
    assert list(quantized_linears(model)) == ["1"]
    assert "bits=4, group_size=32" in repr(layer)
