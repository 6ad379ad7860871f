"""Saving and loading quantized models: identical logits, smaller files, every verb's loader, damaged files."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmlab.compress.rtn import RTNConfig, quantize_rtn
from llmlab.errors import LlmlabError
from llmlab.models import load_model, save_model
from llmlab.models.packed import io
from llmlab.models.packed.io import MARKER, WEIGHTS, load_quantized, save_quantized
from llmlab.models.packed.qlinear import QuantLinear, quantized_linears

IDS = torch.tensor([[5, 70, 300, 12, 99, 255, 1, 42, 7, 128, 64, 3]])


def _quantized(name="tiny-llama", **cfg):
    model, tokenizer = load_model(name)
    return quantize_rtn(model, None, RTNConfig(**{"bits": 4, "group_size": 32, **cfg})), tokenizer


@torch.no_grad()
def _logits(model):
    return model(IDS).logits


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-qwen2"])
def test_round_trip_gives_identical_logits(tmp_path, name):
    model, tokenizer = _quantized(name)
    before = _logits(model)
    save_quantized(model, tokenizer, tmp_path / "q")
    loaded, tok = load_model(tmp_path / "q")  # the loader every verb uses
    assert torch.equal(_logits(loaded), before)
    assert set(quantized_linears(loaded)) == set(quantized_linears(model))
    assert tok("hello").input_ids == tokenizer("hello").input_ids
    marker = json.loads((tmp_path / "q" / MARKER).read_text())
    assert marker["format"] == 1 and marker["method"] == "rtn"
    first = next(iter(marker["modules"].values()))
    assert first == {"kind": "weight_only", "bits": 4, "group_size": 32, "symmetric": False}


def test_tied_embeddings_are_saved_once_and_tied_again(tmp_path):
    model, tokenizer = _quantized()
    save_quantized(model, tokenizer, tmp_path / "q")
    keys = set(load_file(tmp_path / "q" / WEIGHTS))
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    assert not any(k.endswith("q_proj.weight") for k in keys)  # no float copy of a quantized weight
    loaded, _ = load_quantized(tmp_path / "q")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_the_folder_is_smaller_than_the_float_one(tmp_path):
    model, tokenizer = load_model("tiny-llama")
    save_model(model, tokenizer, tmp_path / "fp32")
    quantize_rtn(model, None, RTNConfig(bits=4, group_size=32))
    save_quantized(model, tokenizer, tmp_path / "q")
    size = lambda d: (d / WEIGHTS).stat().st_size  # noqa: E731
    # tiny-llama's decoder linears hold 73,728 weights: 4 bytes each in fp32, half a byte packed plus a
    # float32 scale and a uint8 zero per group of 32; the rest of the file (embeddings, norms) is the same
    saved = 73_728 * (4 - 0.5 - 5 / 32)
    assert 0.98 * saved < size(tmp_path / "fp32") - size(tmp_path / "q") < saved


def test_bf16_load_keeps_the_packed_integers(tmp_path):
    model, tokenizer = _quantized()
    save_quantized(model, tokenizer, tmp_path / "q")
    loaded, _ = load_model(tmp_path / "q", dtype="bf16")
    layer = loaded.model.layers[0].self_attn.q_proj
    assert isinstance(layer, QuantLinear) and layer.qweight.dtype == torch.uint8
    assert layer.scales.dtype == torch.bfloat16 and _logits(loaded).dtype == torch.bfloat16


def test_missing_scales_are_named(tmp_path):
    model, tokenizer = _quantized()
    save_quantized(model, tokenizer, tmp_path / "q")
    path = tmp_path / "q" / WEIGHTS
    tensors = load_file(path)
    del tensors["model.layers.1.mlp.down_proj.weight_scale"]  # the compressed-tensors name
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(LlmlabError) as e:
        load_model(tmp_path / "q")
    message = str(e.value)
    assert "no tensor 'model.layers.1.mlp.down_proj.weight_scale' (the scales of a quantized layer)" in message
    assert "\n" not in message


def test_a_mis_shaped_tensor_and_an_unknown_kind_are_named(tmp_path):
    model, tokenizer = _quantized()
    save_quantized(model, tokenizer, tmp_path / "q")
    marker = json.loads((tmp_path / "q" / MARKER).read_text())
    marker["modules"]["model.layers.0.mlp.up_proj"]["group_size"] = 16
    (tmp_path / "q" / MARKER).write_text(json.dumps(marker))
    with pytest.raises(LlmlabError, match="tensor 'model.layers.0.mlp.up_proj.weight_scale' has shape"):
        load_model(tmp_path / "q")
    marker["modules"]["model.layers.0.mlp.up_proj"] = {"kind": "weight-only", "bits": 4}
    (tmp_path / "q" / MARKER).write_text(json.dumps(marker))
    with pytest.raises(LlmlabError, match="kind 'weight-only'.*did you mean 'weight_only'"):
        load_model(tmp_path / "q")


def test_a_failed_save_leaves_nothing(tmp_path, monkeypatch):
    model, tokenizer = _quantized()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(io, "save_file", broken)
    with pytest.raises(OSError):
        save_quantized(model, tokenizer, tmp_path / "q")
    assert list(tmp_path.iterdir()) == []
