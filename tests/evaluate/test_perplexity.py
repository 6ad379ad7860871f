import json
import math

import pytest
import torch
import torch.nn.functional as F

from llmlab.cli import main
from llmlab.errors import LlmlabError
from llmlab.evaluate.perplexity import perplexity, windows
from tests.conftest import WIKITEXT

TEXT = ("The quick brown fox jumps over the lazy dog. " * 3 + "Pack my box with five dozen liquor jugs. ") * 4


def test_windows_non_overlapping_drop_the_remainder():
    assert windows(10, 4) == [(0, 4, 3), (4, 8, 3)]


def test_windows_sliding_score_every_token_once():
    spans = windows(10, 4, stride=2)
    assert spans == [(0, 4, 3), (2, 6, 2), (4, 8, 2), (6, 10, 2)]
    assert sum(n for *_, n in spans) == 9  # every token but the first


def _plain_hf_ppl(model, ids, seq_len):
    """The computation everyone writes: the model's own loss, one window at a time."""
    losses = [model(ids[None, b:b + seq_len], labels=ids[None, b:b + seq_len]).loss
              for b in range(0, len(ids) - seq_len + 1, seq_len)]
    return math.exp(torch.stack(losses).mean().item())


@torch.no_grad()
@pytest.mark.parametrize("batch_size", [1, 3])
def test_equals_plain_transformers_computation(tiny_llama, batch_size):
    model, tok = tiny_llama
    result = perplexity(model, tok, TEXT, seq_len=64, batch_size=batch_size, progress=False)
    ids = tok(TEXT, return_tensors="pt", add_special_tokens=False).input_ids[0]
    assert result["windows"] == len(ids) // 64
    assert result["ppl"] == pytest.approx(_plain_hf_ppl(model, ids, 64), rel=1e-4)


@torch.no_grad()
def test_sliding_window_equals_token_by_token_definition(tiny_llama):
    model, tok = tiny_llama
    text = TEXT[:150]
    seq_len, stride = 32, 8
    result = perplexity(model, tok, text, seq_len=seq_len, stride=stride, batch_size=2, progress=False)
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    # Definition: token t is predicted from the window that first scores it, i.e. with
    # context ids[begin:t] for the sliding window that contains it at its right end.
    nll = 0.0
    for begin, end, n in windows(len(ids), seq_len, stride):
        logits = model(ids[None, begin:end]).logits[0]
        for t in range(end - n, end):
            nll -= F.log_softmax(logits[t - begin - 1], -1)[ids[t]].item()
    assert result["tokens_scored"] == len(ids) - 1
    assert result["ppl"] == pytest.approx(math.exp(nll / (len(ids) - 1)), rel=1e-4)


def test_seq_len_beyond_context_and_short_text_are_errors(tiny_llama):
    model, tok = tiny_llama
    with pytest.raises(LlmlabError, match="longer than the model's context of 512 tokens"):
        perplexity(model, tok, TEXT, seq_len=4096, progress=False)
    with pytest.raises(LlmlabError, match="fewer than one window of 500"):
        perplexity(model, tok, "short", seq_len=500, progress=False)


def test_cli_smoke_run_writes_a_run_and_prints_json(tmp_path, capsys):
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    assert main(["eval", "ppl", "--model", "tiny-llama", "--data", str(data), "--seq-len", "64",
                 "--stride", "32", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["ppl"] > 1 and summary["stride"] == 32 and summary["tokens_per_s"] > 0
    assert (tmp_path / "runs" / "registry.sqlite").is_file()
    assert json.loads((tmp_path / summary["path"] / "summary.json").read_text())["ppl"] == summary["ppl"]


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"), (b"\x00\x01\x02binary", "looks binary"), (b"caf\xe9\n", "is not UTF-8 text")])
def test_bad_data_files_exit_2_with_one_line(tmp_path, capsys, content, message):
    data = tmp_path / "d.txt"
    data.write_bytes(content)
    assert main(["eval", "ppl", "--model", "tiny-llama", "--data", str(data)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.slow
@torch.no_grad()
def test_builtin_model_wikitext_ppl_is_sane_and_matches_transformers(builtin_model):
    model, tok = builtin_model
    text = WIKITEXT.read_text(encoding="utf-8")[:40_000]
    result = perplexity(model, tok, text, seq_len=1024, max_windows=2, progress=False)
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids[0][:2048]
    assert result["ppl"] == pytest.approx(_plain_hf_ppl(model, ids, 1024), rel=1e-4)
    assert 8 < result["ppl"] < 40  # SmolLM2-135M scores ~17 on WikiText-2 at 2048 tokens
