"""The command line: the stage table, common options, and one-line errors with exit code 2."""

import json
import subprocess
import sys

import pytest

from llmlab.cli import STAGES, main
from tests.conftest import ROOT


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, f"expected one line, got:\n{err}"
    assert "Traceback" not in err
    return err


def test_help_lists_every_stage(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(verb in out for verb in STAGES)


@pytest.mark.parametrize("verb", list(STAGES))
def test_every_stage_imports_and_its_help_renders(verb, capsys):
    assert main([*verb.split(), "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: llmlab {verb} ") and STAGES[verb][4] in out and "--out" in out


def test_stage_help_lists_its_options(capsys):
    assert main(["eval", "ppl", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--seq-len" in out and "--max-windows" in out and "--json" in out


@pytest.mark.parametrize("argv, message", [
    (["evall", "ppl"], "unknown stage 'evall' (did you mean 'eval"),
    (["eval"], "'eval' needs a sub-command: eval ppl"),
    (["eval", "ppl", "--seq-lenn", "8"], "unknown option '--seq-lenn' (did you mean '--seq-len'?)"),
    (["eval", "ppl", "--seq-len", "long"], "--seq-len expects an integer, got 'long'"),
    (["eval", "ppl", "--seq-len"], "option --seq-len needs a value"),
    (["eval", "ppl", "--model", "tiny-llama", "--data", "missing.txt"], "data file not found: missing.txt"),
    (["eval", "ppl", "--model", "no-such-model", "--data", "x"], "data file not found"),
    (["eval", "ppl", "--model", "tiny-lama", "--data", "__file__"], "unknown model 'tiny-lama' (did you mean 'tiny-llama'?)"),
    (["eval", "ppl", "--model", "./no/such/folder", "--data", "__file__"], "model path not found: ./no/such/folder"),
    (["eval", "ppl", "--model", "tiny-llama", "--data", "__file__", "--seq-len", "100000"],
     "longer than the model's context of 512 tokens"),
    (["eval", "ppl", "--config", "nope.yaml"], "config file not found: nope.yaml"),
    (["runs", "show", "nobody"], "no run named 'nobody'"),
])
def test_user_mistakes_are_one_line_errors_with_exit_2(capsys, tmp_path, argv, message):
    (tmp_path / "__file__").write_text("some text to score " * 50)
    assert main(argv) == 2
    assert message in _error(capsys)


def test_unknown_key_in_yaml_config(capsys, tmp_path):
    (tmp_path / "c.yaml").write_text("model: tiny-llama\nseqlen: 8\n")
    assert main(["eval", "ppl", "--config", "c.yaml"]) == 2
    assert "unknown key 'config.seqlen' (did you mean 'seq_len'?)" in _error(capsys)


def test_yaml_config_and_overrides_reach_the_verb(capsys, tmp_path):
    (tmp_path / "t.txt").write_text("The cat sat on the mat. " * 40)
    (tmp_path / "c.yaml").write_text("model: tiny-gpt2\ndata: t.txt\nseq_len: 32\n")
    assert main(["eval", "ppl", "--config", "c.yaml", "--seq-len", "64", "--json", "--name", "mine"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["seq_len"] == 64 and summary["model"] == "tiny-gpt2" and summary["run"] == "mine"


def test_runs_list_show_compare(capsys, tmp_path):
    (tmp_path / "t.txt").write_text("The cat sat on the mat. " * 40)
    for name, model in [("a", "tiny-llama"), ("b", "tiny-gpt2")]:
        assert main(["eval", "ppl", "--model", model, "--data", "t.txt", "--seq-len", "64", "--name", name]) == 0
    capsys.readouterr()
    assert main(["runs", "list"]) == 0
    listing = capsys.readouterr().out
    assert "a " in listing and "b " in listing and "ppl=" in listing
    assert main(["runs", "show", "a"]) == 0
    assert "seq_len: 64" in capsys.readouterr().out
    assert main(["runs", "compare", "a", "b", "--json"]) == 0
    out = capsys.readouterr().out
    assert "ppl" in out and set(json.loads(out.strip().splitlines()[-1])) == {"a", "b"}


def test_debug_shows_the_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "llmlab.cli", "eval", "ppl", "--data", "x.txt", "--debug"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "LlmlabError" in proc.stderr


def test_console_script_exit_code_is_2():
    proc = subprocess.run([str(ROOT / ".venv" / "bin" / "llmlab"), "eval", "ppl", "--data", "missing.txt"],
                          capture_output=True, text=True) if (ROOT / ".venv" / "bin" / "llmlab").exists() else None
    if proc is None:
        pytest.skip("no console script in .venv")
    assert proc.returncode == 2 and proc.stderr.startswith("llmlab: error: data file not found")


def test_public_api_is_importable_from_the_package():
    import llmlab

    for name in llmlab.__all__:
        assert getattr(llmlab, name) is not None
    model, tok = llmlab.load_model("tiny-llama")
    assert isinstance(llmlab.generate(model, tok, "hi", llmlab.SamplingConfig(max_new_tokens=3)), str)
