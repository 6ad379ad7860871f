"""`llmlab demo`: the main job on the built-in model, end to end, in about a minute.

Answers a few chat questions (streamed), continues a plain-text prompt, and reports perplexity
on a text (a bundled sample by default, or `--data FILE`). It grows as stages land.
"""

import dataclasses
import sys
import time
from importlib import resources

from llmlab.atomic import atomic_write_jsonl
from llmlab.config import field
from llmlab.data.text import lines, read_text
from llmlab.evaluate.perplexity import perplexity
from llmlab.generation.generate import SamplingConfig, encode, generate_batch
from llmlab.models.load import ModelOptions
from llmlab.runs import RunOptions, start_run


@dataclasses.dataclass
class DemoConfig(ModelOptions):
    prompts: str | None = field(None, help="file of chat questions, one per line (default: a bundled set)")
    data: str | None = field(None, help="text file for the perplexity report (default: a bundled sample)")
    max_new_tokens: int = field(64, help="tokens per answer")
    seq_len: int = field(256, help="perplexity window")


def demo(cfg: DemoConfig, opts: RunOptions) -> dict:
    assets = resources.files("llmlab.assets")
    questions = _lines(read_text(cfg.prompts) if cfg.prompts else (assets / "demo_prompts.txt").read_text())
    text = read_text(cfg.data) if cfg.data else (assets / "sample.txt").read_text()
    model, tokenizer = cfg.load_model()
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens)
    with start_run("demo", cfg, opts) as run:
        answers, new_tokens, start = [], 0, time.perf_counter()
        for question in questions:
            print(f"\n>>> {question}\n", end="", flush=True)
            reply = generate_batch(model, tokenizer, [encode(tokenizer, question, chat=True)], sampling, _echo)[0]
            print()
            answers.append({"prompt": question, "output": reply.text})
            new_tokens += reply.new_tokens
        gen_seconds = time.perf_counter() - start
        atomic_write_jsonl(run.artifact("answers.jsonl"), answers)
        print(f"\nperplexity on {'the bundled sample' if not cfg.data else cfg.data} ({cfg.seq_len}-token windows):")
        ppl = perplexity(model, tokenizer, text, seq_len=cfg.seq_len, stride=cfg.seq_len // 2, batch_size=4)
        summary = run.finish({"model": cfg.model, "dtype": cfg.dtype, "answers": len(answers),
                              "generation_tokens_per_s": round(new_tokens / gen_seconds, 1),
                              "ppl": ppl["ppl"], "ppl_tokens": ppl["tokens_scored"],
                              "ppl_tokens_per_s": ppl["tokens_per_s"]})
    print(f"perplexity {ppl['ppl']:.3f} over {ppl['tokens_scored']} tokens; "
          f"generation {summary['generation_tokens_per_s']} tokens/s\nrun folder: {summary['path']}")
    return summary


def _echo(piece: str):
    sys.stdout.write(piece)
    sys.stdout.flush()


def _lines(text: str) -> list[str]:
    return [line.strip() for line in lines(text) if line.strip()]
