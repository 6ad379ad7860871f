"""`llmlab generate`: text for a prompt or a file of prompts, each prompt with the adapter it names."""

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from llmlab.atomic import atomic_write_jsonl
from llmlab.config import field
from llmlab.data.text import lines, read_jsonl, read_text
from llmlab.errors import LlmlabError
from llmlab.generation.generate import Generation, SamplingConfig, encode, generate_batch, unescape
from llmlab.models.load import ModelOptions
from llmlab.peft.base import using_adapter
from llmlab.peft.io import load_adapters
from llmlab.runs import start_run


@dataclass
class GenerateConfig(ModelOptions, SamplingConfig):
    prompt: str | None = field(None, help="one prompt")
    prompts: str | None = field(None, help="a file of prompts: .txt one per line, or .jsonl with a 'prompt' field")
    chat: bool = field(True, help="wrap each prompt as a user message with the chat template; false = raw text")
    system: str | None = field(None, help="system message for chat prompts")
    batch_size: int = field(8, help="prompts per forward pass")
    adapter: list[str] = field([], help="adapters to load onto the model, PATH or NAME=PATH, comma-separated; "
                                        "the first is active, a .jsonl prompt's 'adapter' field picks another "
                                        "(or 'base' for none)")

    def __post_init__(self):
        super().__post_init__()
        if self.batch_size < 1:
            raise LlmlabError(f"batch_size must be at least 1, got {self.batch_size}")


def generate_verb(cfg: GenerateConfig, opts) -> dict:
    prompts, wanted = read_prompts(cfg)
    cfg.stop = unescape(cfg.stop)
    model, tokenizer = cfg.load_model()
    names = _load_adapters(model, cfg.adapter, wanted, cfg.prompts)
    ids = [encode(tokenizer, p, chat=cfg.chat, system=cfg.system) for p in prompts]
    with start_run("generate", cfg, opts) as run:
        start = time.perf_counter()
        results = _per_adapter(model, tokenizer, ids, [w or (names[0] if names else None) for w in wanted], cfg)
        seconds = time.perf_counter() - start
        if len(prompts) > 1:
            for i, (p, g) in enumerate(zip(prompts, results), 1):
                print(f"--- {i}: {_short(p)}\n{g.text}", flush=True)
        rows = [{"prompt": p, "output": g.text, "new_tokens": g.new_tokens} for p, g in zip(prompts, results)]
        atomic_write_jsonl(run.artifact("generations.jsonl"), rows)
        new_tokens = sum(g.new_tokens for g in results)
        summary = {"prompts": len(prompts), "new_tokens": new_tokens, "seconds": round(seconds, 3),
                   "tokens_per_s": round(new_tokens / max(seconds, 1e-9), 2)}
        if len(prompts) == 1:
            summary["output"] = results[0].text
        return run.finish(summary)


def _load_adapters(model, specs: list[str], wanted: list[str | None], source) -> list[str]:
    names = []
    if specs:
        names = load_adapters(model, specs)
    for number, name in enumerate(wanted, 1):
        if name is not None and name != "base" and name not in names:
            raise LlmlabError(f"{source}:{number}: adapter '{name}' is not loaded; load it with "
                              f"--adapter {name}=PATH (loaded: {', '.join(names) or 'none'})")
    return names


def _per_adapter(model, tokenizer, ids, adapters: list[str | None], cfg) -> list[Generation]:
    """Generate each adapter's prompts with that adapter switched on: one base model serves them all."""
    if set(adapters) == {None}:
        return _generate_all(model, tokenizer, ids, cfg)
    results = [None] * len(ids)
    for name in dict.fromkeys(adapters):
        rows = [i for i, a in enumerate(adapters) if a == name]
        with using_adapter(model, name):
            for i, g in zip(rows, _generate_all(model, tokenizer, [ids[i] for i in rows], cfg)):
                results[i] = g
    return results


def _generate_all(model, tokenizer, ids: list[list[int]], cfg: GenerateConfig) -> list[Generation]:
    """One prompt streams to stdout as it is generated; several go in batches under a progress bar."""
    if len(ids) == 1:
        stream = (lambda piece: print(piece, end="", flush=True))
        results = generate_batch(model, tokenizer, ids, cfg, on_text=stream)
        print(flush=True)
        return results
    from tqdm import tqdm

    batches = [ids[i:i + cfg.batch_size] for i in range(0, len(ids), cfg.batch_size)]
    results = []
    for batch in tqdm(batches, desc="generate", unit="batch", file=sys.stderr, disable=len(batches) == 1):
        results += generate_batch(model, tokenizer, batch, cfg)
    return results


def read_prompts(cfg: GenerateConfig) -> tuple[list[str], list[str | None]]:
    """The prompts of `--prompt` or `--prompts FILE` (exactly one of the two), and the adapter
    each .jsonl row asks for (None: the default)."""
    if (cfg.prompt is None) == (cfg.prompts is None):
        raise LlmlabError("give exactly one of --prompt TEXT or --prompts FILE")
    if cfg.prompt is not None:
        return [cfg.prompt], [None]
    path = Path(cfg.prompts)
    if path.suffix == ".jsonl":
        rows = _jsonl_prompts(path)
    else:
        rows = [(ln, None) for ln in lines(read_text(path)) if ln.strip()]
    if not rows:
        raise LlmlabError(f"{path} holds no prompts")
    return [p for p, _ in rows], [a for _, a in rows]


def _jsonl_prompts(path: Path) -> list[tuple[str, str | None]]:
    prompts = []
    for number, row in read_jsonl(path):
        if not isinstance(row.get("prompt"), str):
            raise LlmlabError(f"{path}:{number}: each row must be an object with a string 'prompt' field")
        if not isinstance(row.get("adapter", ""), str):
            raise LlmlabError(f"{path}:{number}: 'adapter' must be the name of a loaded adapter")
        prompts.append((row["prompt"], row.get("adapter")))
    return prompts


def _short(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 1] + "…"
