"""`llmlab prune` and `prune_model`: smoke runs whose output other verbs take, composition, bad input."""

import json

import pytest
import torch

from llmlab import methods
from llmlab.cli import main
from llmlab.stages import prune as prune_module
from llmlab.compress.prune import prune_method, prune_model
from llmlab.compress.sparsity import sparsity_report
from llmlab.errors import LlmlabError
from llmlab.models import load_model
from llmlab.runs import Registry, RunOptions
from llmlab.stages.prune import PruneConfig, prune_verb

TEXT = "The cat sat on the mat. A dog ran after a red ball in the park. " * 40


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def _summary(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_prune_then_eval_generate_and_quantize(capsys, tmp_path):
    (tmp_path / "calib.txt").write_text(TEXT)
    assert main(["prune", "--model", "tiny-llama", "--method", "wanda", "--sparsity", "0.5", "--pattern", "2:4",
                 "--calib", "calib.txt", "--n-samples", "4", "--seq-len", "32", "--out", "P", "--json"]) == 0
    summary = _summary(capsys)
    assert (summary["method"], summary["target"], summary["sparsity"]) == ("wanda", "2:4 (50%)", 0.5)
    assert summary["sparsity_min"] == summary["sparsity_max"] == 0.5 and len(summary["per_layer_sparsity"]) == 14
    assert summary["params"] == summary["dense_params"] > summary["nonzero_params"]
    assert summary["seconds"] >= 0 and summary["peak_rss_mb"] > 0
    assert Registry().rows("prune")[0]["summary"]["zero_weights"] == summary["zero_weights"]
    model, _ = load_model(tmp_path / "P")  # a plain transformers folder with the zeros in it
    assert sparsity_report(model)["overall"] == 0.5

    assert main(["eval", "ppl", "--model", "P", "--data", "calib.txt", "--seq-len", "64", "--max-windows", "2",
                 "--json"]) == 0
    assert 1 < _summary(capsys)["ppl"] < 1000
    assert main(["generate", "--model", "P", "--prompt", "hi", "--max-new-tokens", "4", "--json"]) == 0
    assert _summary(capsys)["new_tokens"] == 4
    assert main(["quantize", "--model", "P", "--method", "rtn", "--bits", "4", "--group-size", "32",
                 "--out", "Q", "--json"]) == 0
    assert _summary(capsys)["quantized_layers"] == 14
    from llmlab.models.packed.qlinear import quantized_linears

    quantized, _ = load_model(tmp_path / "Q")
    w = quantized_linears(quantized)["model.layers.0.self_attn.q_proj"].dequantized_weight()
    assert ((w != 0).view(64, 16, 4).sum(-1) <= 2).all()  # min/max grids hold 0 exactly: still 2:4


@pytest.mark.parametrize("method", ["magnitude", "sparsegpt"])
def test_other_methods_through_the_verb(capsys, tmp_path, method):
    (tmp_path / "calib.txt").write_text(TEXT)
    assert main(["prune", "--model", "tiny-llama", "--method", method, "--sparsity", "0.25", "--calib", "calib.txt",
                 "--n-samples", "4", "--seq-len", "32", "--options.skip", r"[mlp\.down]", "--out", "P", "--json"]) == 0
    summary = _summary(capsys)
    assert summary["target"] == "25% unstructured" and len(summary["per_layer_sparsity"]) == 14
    down = {k: v for k, v in summary["per_layer_sparsity"].items() if "down_proj" in k}
    assert set(down.values()) == {0.0}  # skipped
    assert all(0.25 <= v < 0.26 for k, v in summary["per_layer_sparsity"].items() if k not in down)


def test_prune_model_from_python(tiny_llama):
    from copy import deepcopy

    from llmlab.compress.calibrate import calibration_data

    model, tok = deepcopy(tiny_llama[0]), tiny_llama[1]
    calib = calibration_data(tok, TEXT, n_samples=4, seq_len=32)
    assert prune_model(model, "sparsegpt", calib, pattern="4:8", damp=0.05) is model
    assert sparsity_report(model)["overall"] == pytest.approx(0.5, abs=0.01)
    with pytest.raises(LlmlabError, match="unknown key 'wanda.dampp'"):
        prune_model(model, "wanda", calib, dampp=0.1)
    with pytest.raises(LlmlabError, match="wanda needs calibration data"):
        prune_model(model, "wanda", None)


@pytest.mark.parametrize("argv, message", [
    (["--sparsity", "1.0"], "sparsity must be in [0, 1), got 1.0"),
    (["--sparsity", "-0.5"], "sparsity must be in [0, 1), got -0.5"),
    (["--pattern", "2:3"], "pattern 2:3: M=3 does not divide the in_features=64 of model.layers.0.self_attn.q_proj"),
    (["--pattern", "24"], "pattern must be 'N:M' with 1 <= N <= M"),
    (["--sparsity", "0.7", "--pattern", "2:4"], "pattern 2:4 keeps 2 of every 4 weights, sparsity 0.5, not 0.7"),
    (["--n-samples", "500"], "calibration text has 2,560 tokens, fewer than"),
    (["--method", "wandaa"], "unknown pruning method 'wandaa' (did you mean 'wanda'?)"),
    (["--method", "sparsegpt", "--calib", ""], "--method sparsegpt needs calibration text: give --calib FILE"),
    (["--options.dampp", "0.1", "--method", "sparsegpt"], "unknown key 'options.dampp' (did you mean 'damp'?)"),
    (["--sparsity", "0.5", "--options.sparsity", "0.4"], "--sparsity 0.5 and --options.sparsity 0.4 disagree"),
    (["--calib", "missing.txt"], "calibration file not found: missing.txt"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(capsys, tmp_path, argv, message):
    (tmp_path / "short.txt").write_text(TEXT)
    assert main(["prune", "--model", "tiny-llama", "--calib", "short.txt", "--n-samples", "4", "--seq-len", "32",
                 "--out", "X", *argv]) == 2
    assert message in _error(capsys)
    assert not (tmp_path / "X").exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("options, message", [
    ({"pattern": "3:6"}, "M=6 does not divide the in_features=64"),
    ({"n_samples": 500}, "calibration text has"),
])
def test_the_verb_function_raises_before_writing(tmp_path, options, message):
    (tmp_path / "calib.txt").write_text(TEXT)
    cfg = PruneConfig(model="tiny-llama", method="wanda", calib="calib.txt", seq_len=32, **options)
    with pytest.raises(LlmlabError, match=message):
        prune_verb(cfg, RunOptions(out="X"))
    assert not (tmp_path / "X").exists() and not (tmp_path / "runs").exists()
    with pytest.raises(LlmlabError, match=r"sparsity must be in \[0, 1\)"):
        PruneConfig(model="tiny-llama", method="magnitude", sparsity=1.0)


def test_a_missing_method_file_is_a_clear_error(monkeypatch):
    ghost = methods.Entry("llmlab.compress.ghost_pruner", "GhostConfig", "prune_ghost", "", True, {"sparsity_key": "ratio"})
    monkeypatch.setitem(methods.TABLE["prune"], "ghost", ghost)
    with pytest.raises(LlmlabError, match=r"pruning method 'ghost' is not available in this llmlab "
                                          r"\(no llmlab/compress/ghost_pruner.py\)"):
        prune_method("ghost")
    llm_pruner = methods.entry("prune", "llm_pruner")
    assert (llm_pruner.module, llm_pruner.config, llm_pruner.function, llm_pruner.needs_calib,
            llm_pruner.extra["sparsity_key"]) == ("llmlab.compress.llm_pruner", "LLMPrunerConfig", "prune_llm_pruner",
                                                  True, "ratio")


def test_pattern_does_not_apply_to_llm_pruner(capsys):
    try:
        prune_method("llm_pruner")
    except LlmlabError:
        pytest.skip("llm_pruner.py is not there yet")
    assert main(["prune", "--model", "tiny-llama", "--method", "llm_pruner", "--pattern", "2:4",
                 "--calib", "x.txt", "--out", "X"]) == 2
    assert "--pattern does not apply to --method llm_pruner" in _error(capsys)


def test_help_lists_each_methods_options(capsys):
    assert main(["prune", "--help"]) == 0
    out = capsys.readouterr().out
    assert "wanda (needs --calib): --options.sparsity [None]" in out and "--options.mask-block [128]" in out
    assert prune_module.__doc__.splitlines()[0].startswith("`llmlab prune`")


def test_zeros_stay_zero_in_bf16(tiny_llama, tmp_path):
    (tmp_path / "calib.txt").write_text(TEXT)
    cfg = PruneConfig(model="tiny-llama", method="sparsegpt", pattern="2:4", calib="calib.txt", n_samples=4,
                      seq_len=32, dtype="bf16")
    summary = prune_verb(cfg, RunOptions(out="B"))
    assert summary["sparsity_min"] >= 0.5
    model, _ = load_model(tmp_path / "B", dtype="bf16")
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert sparsity_report(model)["min"] >= 0.5
