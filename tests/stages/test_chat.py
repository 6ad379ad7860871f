"""The chat REPL, driven through its stream parameters and through the CLI, on a tiny random model."""

import io
import json

import pytest

from llmlab.cli import main
from llmlab.generation.generate import encode
from llmlab.stages import chat


@pytest.fixture
def llama(tiny_llama):
    return tiny_llama


def run_chat(model, tok, text: str, monkeypatch, **cfg):
    """Drive the loop; returns (summary, stdout text, [(prompt ids, reply)] of each turn)."""
    turns, real = [], chat.generate_batch

    def recording(model, tokenizer, prompt_ids, cfg, on_text=None):
        result = real(model, tokenizer, prompt_ids, cfg, on_text)
        turns.append((prompt_ids[0], result[0].text))
        return result

    monkeypatch.setattr(chat, "generate_batch", recording)
    out = io.StringIO()
    summary = chat.chat_loop(model, tok, chat.ChatConfig(model="tiny-llama", max_new_tokens=6, **cfg),
                             io.StringIO(text), out)
    return summary, out.getvalue(), turns


def test_turns_carry_the_history_and_reset_clears_it(llama, monkeypatch):
    model, tok = llama
    summary, out, turns = run_chat(model, tok, "hello\nhow are you?\n/reset\nagain\n/exit\nnever read\n",
                                   monkeypatch, system="be brief")
    assert summary == {"turns": 3}
    assert out.count(">>> ") == 5 and "conversation cleared" in out
    (first_ids, first_reply), (second_ids, _), (third_ids, _) = turns
    history = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": first_reply},
               {"role": "user", "content": "how are you?"}]
    assert second_ids == encode(tok, history, chat=True, system="be brief")
    assert second_ids[:len(first_ids)] == first_ids  # the second prompt extends the first
    assert third_ids == encode(tok, "again", chat=True, system="be brief")
    assert first_reply in out


def test_help_unknown_command_and_end_of_input(llama, monkeypatch):
    model, tok = llama
    summary, out, turns = run_chat(model, tok, "/help\n/nope\n\n", monkeypatch)
    assert summary == {"turns": 0} and turns == []
    assert "/reset" in out and "/exit" in out and "unknown command /nope" in out


def test_cli_chat_reads_stdin(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    assert main(["chat", "--model", "tiny-llama", "--max-new-tokens", "4", "--registry", str(tmp_path / "r.sqlite"),
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"turns": 1}


def test_chat_switches_adapters(tmp_path):
    import io

    import torch

    from llmlab.models import load_model
    from llmlab.peft import LoraConfig, apply_lora, save_adapter
    from llmlab.peft.io import load_adapters
    from llmlab.stages.chat import ChatConfig, chat_loop

    torch.manual_seed(0)
    model, tok = load_model("tiny-llama")
    adapted = apply_lora(model, LoraConfig(r=2))
    for p in adapted.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=2.0)
    save_adapter(adapted, tmp_path / "a")
    torch.manual_seed(0)
    model, tok = load_model("tiny-llama")
    load_adapters(model, [f"x={tmp_path / 'a'}", f"y={tmp_path / 'a'}"])
    out = io.StringIO()
    cfg = ChatConfig(model="tiny-llama", max_new_tokens=4)
    chat_loop(model, tok, cfg, io.StringIO("/adapter\n/adapter y\n/adapter zz\n/adapter base\nhi\n"), out)
    text = out.getvalue()
    assert "adapters: x, y; active: x" in text
    assert "(now answering with y)" in text
    assert "no adapter named 'zz'" in text
    assert "(now answering with base)" in text
    assert all(not m.active for m in model.modules() if hasattr(m, "active"))
