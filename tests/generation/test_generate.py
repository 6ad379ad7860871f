"""llmlab's decoding loop against transformers' `generate` and logits processors, on tiny random models."""

import json

import pytest
import torch
from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from llmlab.cli import main
from llmlab.errors import LlmlabError
from llmlab.generation import sampling
from llmlab.generation.beam import beam_search
from llmlab.generation.generate import SamplingConfig, TextTracker, decode, encode, eos_ids, generate, pad_id, unescape
from llmlab.models import load_model
from llmlab.stages.generate import GenerateConfig, read_prompts

PROMPTS = ["The quick brown fox jumps over", "x", "Hello there, how are"]  # different lengths: left padding


@pytest.fixture(scope="module")
def models(tiny_llama):
    return {"tiny-llama": tiny_llama, "tiny-gpt2": load_model("tiny-gpt2")}


@pytest.fixture
def llama(tiny_llama):
    return tiny_llama


def greedy(model, tok, prompt_ids, n=20, eos=()):
    return decode(model, [prompt_ids], SamplingConfig(max_new_tokens=n), list(eos), pad_id(model, tok))[0]


def hf_new_tokens(model, prompt_ids, eos=None, **kw):
    """transformers' new tokens, cut at the first EOS (ours never include it)."""
    out = model.generate(torch.tensor([prompt_ids]), do_sample=False, **kw)[0, len(prompt_ids):].tolist()
    return out[:out.index(eos)] if eos is not None and eos in out else out


# ---- parity with transformers ----

@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_greedy_equals_hf_generate(models, name):
    model, tok = models[name]
    eos = eos_ids(model, tok)
    for prompt in PROMPTS:
        ids = tok(prompt).input_ids
        ours = greedy(model, tok, ids, 24, eos)
        assert ours == hf_new_tokens(model, ids, eos[0], max_new_tokens=24)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_left_padded_batch_equals_one_by_one(models, name):
    model, tok = models[name]
    ids = [tok(p).input_ids for p in PROMPTS]
    cfg = SamplingConfig(max_new_tokens=16)
    batched = decode(model, ids, cfg, eos_ids(model, tok), pad_id(model, tok))
    assert batched == [decode(model, [i], cfg, eos_ids(model, tok), pad_id(model, tok))[0] for i in ids]
    assert generate(model, tok, PROMPTS, cfg, chat=True, batch_size=2) == [
        generate(model, tok, p, cfg, chat=True) for p in PROMPTS]


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_beam_search_equals_hf(models, name, k):
    model, tok = models[name]
    for prompt in PROMPTS:
        ids = tok(prompt).input_ids
        cfg = SamplingConfig(max_new_tokens=10, num_beams=k)
        ours = beam_search(model, ids, cfg, eos_ids(model, tok))
        assert len(ours) == 10  # no EOS within the limit: the case that must match exactly
        assert ours == hf_new_tokens(model, ids, num_beams=k, max_new_tokens=10)


def test_beam_search_with_eos_and_length_penalty_equals_hf(llama):
    """Finished hypotheses: make the token that greedy repeats the EOS, so that beams end early."""
    model, tok = llama
    ids = tok(PROMPTS[2]).input_ids
    eos = greedy(model, tok, ids, 1)[0]
    for length_penalty in (1.0, 0.0, 2.0):
        cfg = SamplingConfig(max_new_tokens=12, num_beams=3, length_penalty=length_penalty)
        ours = beam_search(model, ids, cfg, [eos])
        theirs = hf_new_tokens(model, ids, eos, num_beams=3, max_new_tokens=12, eos_token_id=eos,
                               length_penalty=length_penalty)
        assert ours == [t for t in theirs if t != tok.pad_token_id]


def test_one_beam_is_greedy(llama):
    model, tok = llama
    ids = tok(PROMPTS[0]).input_ids
    assert beam_search(model, ids, SamplingConfig(max_new_tokens=12, num_beams=1), []) == greedy(model, tok, ids, 12)


def test_repetition_penalty_greedy_equals_hf(llama):
    model, tok = llama
    ids = tok(PROMPTS[0]).input_ids
    cfg = SamplingConfig(max_new_tokens=16, repetition_penalty=1.3)
    ours = decode(model, [ids], cfg, [], pad_id(model, tok))[0]
    assert ours == hf_new_tokens(model, ids, max_new_tokens=16, repetition_penalty=1.3, eos_token_id=None)


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_equals_hf_processor(penalty):
    g = torch.Generator().manual_seed(0)
    logits, seen = torch.randn(4, 50, generator=g) * 3, torch.randint(0, 50, (4, 12), generator=g)
    expected = RepetitionPenaltyLogitsProcessor(penalty)(seen, logits.clone())
    assert torch.equal(sampling.repetition_penalty(logits, seen, penalty), expected)


@pytest.mark.parametrize("k", [1, 5, 49])
def test_top_k_equals_hf_warper(k):
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(k))
    assert torch.equal(sampling.top_k(logits, k), TopKLogitsWarper(k)(None, logits))


@pytest.mark.parametrize("p", [0.01, 0.3, 0.9, 0.999])
def test_top_p_equals_hf_warper(p):
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1)) * 2
    logits[0] = 0.0  # a flat row: ties everywhere
    assert torch.equal(sampling.top_p(logits, p), TopPLogitsWarper(p)(None, logits))


def test_temperature_equals_hf_warper():
    logits = torch.randn(3, 20)
    assert torch.equal(sampling.temperature(logits, 0.7), TemperatureLogitsWarper(0.7)(None, logits))


# ---- sampling ----

def test_top_k_one_is_greedy(llama):
    model, tok = llama
    cfg = SamplingConfig(max_new_tokens=16, temperature=0.9, top_k=1, seed=5)
    assert generate(model, tok, PROMPTS[0], cfg) == generate(model, tok, PROMPTS[0], SamplingConfig(max_new_tokens=16))


def test_sampling_is_reproducible_per_seed(llama):
    model, tok = llama
    run = lambda seed: generate(model, tok, PROMPTS, SamplingConfig(max_new_tokens=12, temperature=1.0,
                                                                    top_p=0.95, seed=seed, ignore_eos=True))
    first = run(0)
    assert run(0) == first
    assert run(1) != first


# ---- stopping and streaming ----

def test_max_new_tokens_is_respected(llama):
    model, tok = llama
    ids = tok(PROMPTS[1]).input_ids
    out = decode(model, [ids], SamplingConfig(max_new_tokens=7, ignore_eos=True), [], pad_id(model, tok))[0]
    assert len(out) == 7


def test_eos_stops_and_is_excluded(llama):
    model, tok = llama
    ids = tok(PROMPTS[2]).input_ids
    full = greedy(model, tok, ids, 20)
    eos = full[5]
    assert greedy(model, tok, ids, 20, [eos]) == full[:full.index(eos)]
    assert greedy(model, tok, ids, 20, [eos]) == hf_new_tokens(model, ids, eos, max_new_tokens=20, eos_token_id=eos)


def test_eos_from_generation_config_list(llama, monkeypatch):
    model, tok = llama
    full = greedy(model, tok, tok(PROMPTS[2]).input_ids, 20)
    monkeypatch.setattr(model.generation_config, "eos_token_id", [tok.eos_token_id, full[5]])
    assert eos_ids(model, tok) == sorted({tok.eos_token_id, full[5]})
    text = generate(model, tok, PROMPTS[2], SamplingConfig(max_new_tokens=20))
    assert text == tok.decode(full[:full.index(full[5])], skip_special_tokens=True)


def test_stop_string_cuts_the_output(llama):
    model, tok = llama
    ascii_prompt = "abc abc abc"
    text = generate(model, tok, ascii_prompt, SamplingConfig(max_new_tokens=30, ignore_eos=True))
    stop = next(text[i:i + 2] for i in range(3, len(text) - 2) if text[i:i + 2].isascii() and text[i:i + 2].isprintable())
    cfg = SamplingConfig(max_new_tokens=30, ignore_eos=True, stop=[stop, "never-there"])
    pieces = []
    out = generate(model, tok, ascii_prompt, cfg, on_text=pieces.append)
    assert out == text[:text.index(stop)]
    assert "".join(pieces) == out
    assert generate(model, tok, [ascii_prompt, "x"], cfg)[0] == out


def test_streamed_pieces_make_the_final_text(llama):
    model, tok = llama
    cfg = SamplingConfig(max_new_tokens=40, temperature=1.0, seed=3, ignore_eos=True)
    pieces = []
    out = generate(model, tok, "hi", cfg, chat=True, on_text=pieces.append)
    assert len(pieces) > 1 and "".join(pieces) == out
    assert out == generate(model, tok, "hi", cfg, chat=True)


def test_tracker_never_splits_a_character_nor_leaks_a_stop_string(llama):
    _, tok = llama
    pieces = []
    tracker = TextTracker(tok, ["STOP"], pieces.append)
    stopped = [tracker.push(t) for t in tok("café ☕ STOX STOP after").input_ids]  # one token per byte
    assert tracker.finish() == "café ☕ STOX "
    assert "".join(pieces) == "café ☕ STOX " and not any("\ufffd" in p for p in pieces)
    assert stopped.index(True) == len("café ☕ STOX STOP".encode()) - 1


# ---- configs, prompts, CLI ----

@pytest.mark.parametrize("kw, message", [
    ({"top_p": 2.0}, "top_p"), ({"top_p": 0.0}, "top_p"), ({"temperature": -1.0}, "temperature"),
    ({"num_beams": 2, "temperature": 0.7}, "deterministic"), ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"), ({"stop": [""]}, "stop")])
def test_bad_sampling_values_are_user_errors(kw, message):
    with pytest.raises(LlmlabError, match=message):
        SamplingConfig(**kw)


def test_read_prompts(tmp_path):
    (tmp_path / "p.txt").write_text("one\n\ntwo\n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n\n{"prompt": "b", "id": 2}\n')
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{"text": "b"}\n')
    assert read_prompts(GenerateConfig(prompts=str(tmp_path / "p.txt"))) == (["one", "two"], [None, None])
    assert read_prompts(GenerateConfig(prompts=str(tmp_path / "p.jsonl"))) == (["a", "b"], [None, None])
    with pytest.raises(LlmlabError, match=r"bad\.jsonl:2"):
        read_prompts(GenerateConfig(prompts=str(tmp_path / "bad.jsonl")))
    with pytest.raises(LlmlabError, match="exactly one"):
        read_prompts(GenerateConfig())
    with pytest.raises(LlmlabError, match="exactly one"):
        read_prompts(GenerateConfig(prompt="a", prompts=str(tmp_path / "p.txt")))


def test_chat_prompt_uses_the_template(llama):
    _, tok = llama
    ids = encode(tok, "hi", chat=True, system="be brief")
    assert tok.decode(ids) == "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def _common(tmp_path, name="run"):
    return ["--out", str(tmp_path / name), "--registry", str(tmp_path / "reg.sqlite"), "--json"]


def test_cli_generate_one_prompt(tmp_path, capsys):
    code = main(["generate", "--model", "tiny-llama", "--prompt", "hi", "--max-new-tokens", "5", *_common(tmp_path)])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["new_tokens"] <= 5 and summary["tokens_per_s"] > 0
    assert (tmp_path / "run" / "summary.json").is_file()
    rows = [json.loads(line) for line in (tmp_path / "run" / "generations.jsonl").read_text().splitlines()]
    assert rows[0]["prompt"] == "hi" and rows[0]["output"] == summary["output"]


def test_cli_generate_prompts_file_in_batches(tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("one\ntwo two\nthree three three\n")
    code = main(["generate", "--model", "tiny-gpt2", "--prompts", str(tmp_path / "prompts.txt"), "--chat=false",
                 "--batch-size", "2", "--max-new-tokens", "4", "--ignore-eos", *_common(tmp_path)])
    assert code == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "generations.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["one", "two two", "three three three"]
    assert all(r["new_tokens"] == 4 for r in rows)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["prompts"] == 3


@pytest.mark.parametrize("option, message", [(["--top-p", "2"], "top_p"),
                                             (["--num-beams", "2", "--temperature", "0.5"], "deterministic"),
                                             ([], "exactly one of --prompt")])
def test_cli_bad_options_exit_2(tmp_path, capsys, option, message):
    args = ["generate", "--model", "tiny-llama", *(["--prompt", "hi"] if option else []), *option]
    assert main([*args, *_common(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_cli_stop_strings_read_backslash_escapes():
    assert unescape(["\\n\\n", "a\\\\nb", "x\\ty", "plain"]) == ["\n\n", "a\\nb", "x\ty", "plain"]


# ---- the real model ----

@pytest.mark.slow
def test_builtin_model_knows_the_capital_of_france(builtin_model):
    model, tok = builtin_model
    out = generate(model, tok, "What is the capital of France?", SamplingConfig(max_new_tokens=20), chat=True)
    assert "Paris" in out



def _random_lora(path, seed):
    from llmlab.peft import LoraConfig, apply_lora, save_adapter

    torch.manual_seed(0)
    model, _ = load_model("tiny-llama")
    apply_lora(model, LoraConfig(r=2, targets=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=1.0)
    save_adapter(model, path)


def test_generate_switches_adapter_per_prompt(tmp_path, capsys):
    from llmlab.peft import using_adapter
    from llmlab.peft.io import load_adapters

    _random_lora(tmp_path / "a", 1)
    _random_lora(tmp_path / "b", 2)
    rows = [{"prompt": "hello", "adapter": "b"}, {"prompt": "hello"}, {"prompt": "hello", "adapter": "base"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["generate", "--model", "tiny-llama", "--prompts", str(tmp_path / "p.jsonl"), "--max-new-tokens", "6",
                 "--adapter", f"a={tmp_path / 'a'},b={tmp_path / 'b'}", "--out", str(tmp_path / "run")]) == 0
    outputs = [json.loads(line)["output"] for line in (tmp_path / "run" / "generations.jsonl").read_text().splitlines()]

    torch.manual_seed(0)
    model, tok = load_model("tiny-llama")
    load_adapters(model, [f"a={tmp_path / 'a'}", f"b={tmp_path / 'b'}"])
    cfg = SamplingConfig(max_new_tokens=6)
    expected = []
    for name in ("b", "a", "base"):
        with using_adapter(model, name):
            expected.append(generate(model, tok, "hello", cfg, chat=True))
    assert outputs == expected
    assert len(set(expected)) == 3  # the three really differ, so the switch is what is being tested

    (tmp_path / "q.jsonl").write_text('{"prompt": "hi", "adapter": "c"}\n')
    assert main(["generate", "--model", "tiny-llama", "--prompts", str(tmp_path / "q.jsonl"),
                 "--adapter", str(tmp_path / "a")]) == 2
    assert "q.jsonl:1: adapter 'c' is not loaded" in capsys.readouterr().err
