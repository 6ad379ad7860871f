"""`llmlab quantize` and `quantize_model`: a smoke run whose output the other verbs use, and bad input."""

import json

import pytest
import torch

from llmlab.cli import main
from llmlab.compress import quantize_model
from llmlab.compress.quantize import get_method
from llmlab.errors import LlmlabError
from llmlab.models import load_model
from llmlab.models.packed.qlinear import quantized_linears
from llmlab.runs import Registry

TEXT = "The cat sat on the mat. A dog ran after a red ball in the park. " * 40


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_quantize_then_eval_and_generate(capsys, tmp_path):
    (tmp_path / "t.txt").write_text(TEXT)
    assert main(["quantize", "--model", "tiny-llama", "--method", "rtn", "--bits", "4", "--group-size", "32",
                 "--out", "X", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["method"], summary["bits"], summary["group_size"], summary["quantized_layers"]) == ("rtn", 4, 32, 14)
    assert summary["model_bytes"] < summary["float_bytes"] and summary["size_on_disk_bytes"] > 0
    assert summary["seconds"] >= 0 and summary["peak_rss_mb"] > 0
    assert Registry().rows("quantize")[0]["summary"]["size_on_disk_bytes"] == summary["size_on_disk_bytes"]
    assert (tmp_path / "X" / "model" / "llmlab_quantization.json").is_file()

    assert main(["eval", "ppl", "--model", "X", "--data", "t.txt", "--seq-len", "64", "--max-windows", "2",
                 "--json"]) == 0
    ppl = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ppl"]
    assert 1 < ppl < 1000
    assert main(["generate", "--model", "X", "--prompt", "hi", "--max-new-tokens", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["new_tokens"] == 4


def test_calibrated_method_through_the_verb(capsys, tmp_path):
    (tmp_path / "calib.txt").write_text(TEXT)
    assert main(["quantize", "--model", "tiny-llama", "--method", "gptq", "--bits", "4", "--group-size", "32",
                 "--calib", "calib.txt", "--n-samples", "4", "--seq-len", "32", "--options.damp", "0.05",
                 "--out", "G", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["method"] == "gptq" and summary["quantized_layers"] == 14
    model, _ = load_model(tmp_path / "G")
    assert len(quantized_linears(model)) == 14


@pytest.mark.parametrize("argv, message", [
    (["--bits", "9"], "bits must be an integer from 2 to 8, got 9"),
    (["--method", "rnt"], "unknown quantization method 'rnt' (did you mean 'rtn'?)"),
    (["--method", "gptq"], "--method gptq needs calibration text: give --calib FILE"),
    (["--options.bitz", "3"], "unknown key 'options.bitz' (did you mean 'bits'?)"),
    (["--bits", "4", "--options.bits", "3"], "--bits 4 and --options.bits 3 disagree"),
    (["--method", "llm_int8", "--bits", "4"], "--bits does not apply to --method llm_int8"),
    (["--method", "gptq", "--calib", "short.txt", "--n-samples", "64"], "calibration text has"),
    (["--lorc-rank", "0"], "--lorc-rank must be at least 1, got 0"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(capsys, tmp_path, argv, message):
    (tmp_path / "short.txt").write_text("too short")
    assert main(["quantize", "--model", "tiny-llama", "--out", "X", *argv]) == 2
    assert message in _error(capsys)
    assert not (tmp_path / "X").exists() and not (tmp_path / "runs").exists()


def test_quantizing_a_quantized_folder_is_refused(capsys):
    assert main(["quantize", "--model", "tiny-llama", "--bits", "8", "--group-size", "0", "--out", "A"]) == 0
    capsys.readouterr()
    assert main(["quantize", "--model", "A", "--bits", "4", "--group-size", "32", "--out", "B"]) == 2
    assert "model.layers.0.self_attn.q_proj is already quantized (weight_only" in _error(capsys)


def test_lorc_and_a_decomposed_folder_through_the_verb(capsys, tmp_path):
    from llmlab.models.packed.lowrank import LoRCLinear, LowRankLinear

    assert main(["quantize", "--model", "tiny-llama", "--bits", "4", "--group-size", "32", "--lorc-rank", "4",
                 "--out", "L", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["lorc_rank"] == 4 and summary["quantized_layers"] == 14
    model, _ = load_model("L")
    assert sum(isinstance(m, LoRCLinear) for m in model.modules()) == 14

    assert main(["decompose", "--model", "tiny-llama", "--rank", "16", "--out", "D"]) == 0
    assert main(["quantize", "--model", "D", "--bits", "4", "--group-size", "16", "--out", "Q", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["quantized_layers"] == 28  # u and v
    model, _ = load_model("Q")
    assert sum(isinstance(m, LowRankLinear) for m in model.modules()) == 14 and len(quantized_linears(model)) == 28
    (tmp_path / "t.txt").write_text(TEXT)
    assert main(["eval", "ppl", "--model", "Q", "--data", "t.txt", "--seq-len", "64", "--max-windows", "1",
                 "--json"]) == 0
    assert 1 < json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ppl"] < 1000


def test_help_lists_each_methods_options(capsys):
    assert main(["quantize", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--group-size" in out and "--options.*" not in out
    assert "rtn: --options.bits [4]; --options.group-size [128]" in out
    assert "gptq (needs --calib):" in out and "--options.damp [0.01]" in out


def test_python_api():
    model, _ = load_model("tiny-llama")
    with torch.no_grad():
        before = model(torch.tensor([[1, 2, 3]])).logits
    assert quantize_model(model, "rtn", bits=8, group_size=0, symmetric=True) is model
    assert len(quantized_linears(model)) == 14 and model.llmlab_quant_method == "rtn"
    with torch.no_grad():
        assert (model(torch.tensor([[1, 2, 3]])).logits - before).abs().max() < 0.02 * before.abs().max()
    fresh, _ = load_model("tiny-llama")
    with pytest.raises(LlmlabError, match="unknown key 'rtn.group'"):
        quantize_model(fresh, "rtn", group=32)
    with pytest.raises(LlmlabError, match="gptq needs calibration data"):
        quantize_model(fresh, "gptq", bits=4, group_size=32)
    cfg_cls, fn, needs_calib = get_method("rtn")
    assert cfg_cls.__name__ == "RTNConfig" and fn.__name__ == "quantize_rtn" and not needs_calib


@pytest.mark.slow
def test_the_default_command_works_on_the_built_in_model(tmp_path, capsys):
    # RTN at group 128: SmolLM2's 576-wide layers take groups of 96 (128 does not divide 576); 1,536 keeps 128
    assert main(["quantize", "--out", "W", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["group_size"] == 128 and summary["group_sizes_used"] == {"576": 96}
    model, tok = load_model(tmp_path / "W")
    assert len(quantized_linears(model)) == 30 * 7
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
