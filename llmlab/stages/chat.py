"""`llmlab chat`: an interactive conversation with streamed replies.

Every turn renders the whole history with the model's chat template and generates the reply
with llmlab's own loop (`llmlab.generation`), streaming it piece by piece. The loop reads and writes
the streams it is given, so tests and pipes drive it like a terminal.
"""

import sys
from dataclasses import dataclass

from llmlab.config import field
from llmlab.errors import LlmlabError
from llmlab.generation import SamplingConfig, encode, generate_batch, unescape
from llmlab.models.load import ModelOptions
from llmlab.peft.base import active_adapters, adapter_names, set_adapter
from llmlab.peft.io import load_adapters

HELP = """commands:
  /reset          forget the conversation so far
  /adapter NAME   answer with another loaded adapter (/adapter base: none); /adapter lists them
  /exit           leave (so does end of input, Ctrl-D)
  /help           this list"""


@dataclass
class ChatConfig(ModelOptions, SamplingConfig):
    max_new_tokens: int = field(256, help="the most tokens per reply")
    system: str | None = field(None, help="system message that opens the conversation")
    adapter: list[str] = field([], help="adapters to load, PATH or NAME=PATH, comma-separated; the first "
                                        "is active and /adapter NAME switches")


def chat_verb(cfg: ChatConfig, opts) -> dict:
    cfg.stop = unescape(cfg.stop)
    model, tokenizer = cfg.load_model()
    if cfg.adapter:
        load_adapters(model, cfg.adapter)
    return chat_loop(model, tokenizer, cfg, sys.stdin, sys.stdout)


def chat_loop(model, tokenizer, cfg: ChatConfig, stdin, stdout) -> dict:
    """Read a line, answer it in the context of the conversation, repeat; returns {"turns": n}."""
    def say(text: str = "", end: str = "\n"):
        stdout.write(text + end)
        stdout.flush()

    say(f"chatting with {cfg.model}; /help lists the commands")
    history, turns = [], 0
    while True:
        say(">>> ", end="")
        line = stdin.readline()
        if not line:  # end of input
            say()
            break
        text = line.strip()
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = []
            say("(conversation cleared)")
        elif text == "/help":
            say(HELP)
        elif text.split()[:1] == ["/adapter"]:
            say(_switch_adapter(model, text.split()[1:]))
        elif text.startswith("/"):
            say(f"unknown command {text.split()[0]}; /help lists the commands")
        elif text:
            history.append({"role": "user", "content": text})
            ids = encode(tokenizer, history, chat=True, system=cfg.system)
            reply = generate_batch(model, tokenizer, [ids], cfg, on_text=lambda piece: say(piece, end=""))[0].text
            say()
            history.append({"role": "assistant", "content": reply})
            turns += 1
    return {"turns": turns}



def _switch_adapter(model, words: list[str]) -> str:
    names = adapter_names(model)
    if not names:
        return "no adapters are loaded; start with --adapter PATH"
    if not words:
        return f"adapters: {', '.join(names)}; active: {', '.join(active_adapters(model)) or 'base'}"
    try:
        set_adapter(model, [] if words[0] == "base" else words[0])  # no active adapter = the base model
    except LlmlabError as e:
        return str(e)
    return f"(now answering with {words[0]})"
