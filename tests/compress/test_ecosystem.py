"""Folders other tools load: weight-only layers as compressed-tensors that transformers reads with llmlab's
logits; every other packed layer as an llmlab-only architecture that transformers refuses without remote
code and loads through llmlab with it."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmlab.compress import quantize_model, save_quantized
from llmlab.compress.calibrate import calibration_data
from llmlab.compress.lowrank import LowRankConfig, decompose
from llmlab.models import load_model
from llmlab.models.packed import ecosystem
from llmlab.models.packed.bitpack import pack
from llmlab.models.packed.qlinear import QuantLinear

IDS = torch.tensor([[5, 80, 81, 82, 90, 100, 7, 64]])
TEXT = "The cat sat on the mat. A dog ran after a red ball in the park. " * 20


@pytest.fixture(autouse=True)
def dequantize_path(monkeypatch):
    """llmlab's exact path (the dequantized weight), so the comparison is of formats, not of kernels."""
    monkeypatch.setattr(QuantLinear, "use_kernels", False)


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("method, options", [
    ("rtn", {"bits": 4, "group_size": 32, "symmetric": True}),
    ("rtn", {"bits": 4, "group_size": 32, "symmetric": False}),
    ("rtn", {"bits": 8, "group_size": 0, "symmetric": True}),
    ("rtn", {"bits": 3, "group_size": 32, "symmetric": False}),  # values straddle the int32 words
    ("rtn", {"bits": 2, "group_size": 0, "symmetric": False}),
    ("rtn", {"bits": 4, "group_size": 48, "symmetric": False}),  # 48 divides no width: groups of 32, per group
    ("gptq", {"bits": 4, "group_size": 32}),
])
def test_transformers_loads_a_weight_only_folder_with_llmlabs_logits(tmp_path, method, options):
    pytest.importorskip("compressed_tensors")
    model, tokenizer = load_model("tiny-llama")
    calib = calibration_data(tokenizer, TEXT, n_samples=2, seq_len=32) if method == "gptq" else None
    quantize_model(model, method, calib, **options)
    save_quantized(model, tokenizer, tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "q")  # plain transformers + compressed-tensors
    ours, _ = load_model(tmp_path / "q")
    torch.testing.assert_close(_logits(theirs), _logits(model), rtol=0, atol=1e-5)
    torch.testing.assert_close(_logits(ours), _logits(model), rtol=0, atol=0)  # and llmlab reads it back exactly


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_the_packed_words_are_compressed_tensors_own(bits):
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    q = torch.randint(0, 2 ** bits, (6, 70), dtype=torch.uint8)  # 70: not a whole number of words
    signed = (q.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)
    assert torch.equal(ecosystem.to_stream_int32(pack(q, bits)), helpers.pack_to_int32(signed, bits))
    zp = helpers.pack_to_int32(signed, bits, packed_dim=0)  # zero points are packed down the columns
    assert torch.equal(ecosystem.to_stream_int32(pack(q.T, bits)).T, zp)


def _other_kinds(tmp_path):
    nf4, tokenizer = load_model("tiny-llama")
    quantize_model(nf4, "nf4")
    save_quantized(nf4, tokenizer, tmp_path / "nf4")
    low, _ = load_model("tiny-llama")
    decompose(low, None, LowRankConfig(rank=8))
    save_quantized(low, tokenizer, tmp_path / "lowrank")
    return {"nf4": nf4, "lowrank": low}


def test_other_packed_layers_make_an_llmlab_only_architecture(tmp_path, monkeypatch):
    models = _other_kinds(tmp_path)
    monkeypatch.setattr("sys.stdin", None)  # transformers would ask whether to run the folder's code
    for name, model in models.items():
        config = json.loads((tmp_path / name / "config.json").read_text())
        assert config["model_type"] == "llmlab_packed" and config["llmlab_model_type"] == "llama"
        with pytest.raises(Exception, match="trust_remote_code|custom code"):  # loudly, never random weights
            AutoModelForCausalLM.from_pretrained(tmp_path / name)
        theirs = AutoModelForCausalLM.from_pretrained(tmp_path / name, trust_remote_code=True)
        torch.testing.assert_close(_logits(theirs), _logits(model), rtol=0, atol=0)
        ours, _ = load_model(tmp_path / name)
        torch.testing.assert_close(_logits(ours), _logits(model), rtol=0, atol=0)
