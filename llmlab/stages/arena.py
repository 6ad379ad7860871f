"""`llmlab arena`: pairwise battles between models' answers, judged by a model or a person, as Elo ratings."""

from dataclasses import dataclass

from tqdm.auto import tqdm

from llmlab.atomic import atomic_write_jsonl
from llmlab.config import field
from llmlab.errors import LlmlabError
from llmlab.evaluate.arena import HumanJudge, ModelJudge, battle, bootstrap_elo, read_prompts, record
from llmlab.generation.generate import SamplingConfig, generate
from llmlab.models import load_model
from llmlab.runs import RunOptions, format_table, start_run


@dataclass
class ArenaConfig:
    models: list[str] = field([], help="two or more model specs, comma-separated (names must differ)")
    prompts: str = field("", help="prompts: .txt one per line, or .jsonl with a 'prompt' field")
    judge: str = field("smollm2-135m", help="judge model spec, or 'human' to judge in the terminal")
    limit: int | None = field(None, help="use only the first N prompts")
    max_new_tokens: int = field(128, help="the most tokens of each answer")
    batch_size: int = field(8, help="prompts per generation batch")
    rounds: int = field(1000, help="bootstrap rounds for the confidence intervals")
    k: float = field(4.0, help="Elo K-factor (Chatbot Arena uses 4)")
    seed: int = field(0, help="seed of the bootstrap and of the human judge's answer order")
    dtype: str = field("fp32", help="fp32, bf16 or fp16")

    def __post_init__(self):
        if len(self.models) < 2:
            raise LlmlabError(f"arena needs at least two models (--models A,B), got {len(self.models)}")
        if len(set(self.models)) != len(self.models):
            raise LlmlabError("--models lists the same model twice; each contestant must be different")
        for key in ("max_new_tokens", "batch_size", "rounds"):
            if getattr(self, key) < 1:
                raise LlmlabError(f"--{key.replace('_', '-')} must be at least 1, got {getattr(self, key)}")
        if self.k <= 0:
            raise LlmlabError(f"--k must be positive, got {self.k}")


def answer_all(specs: list[str], prompts: list[str], cfg: ArenaConfig) -> dict[str, list[str]]:
    """Each model's greedy answer to each prompt, one model in memory at a time."""
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens)
    answers = {}
    for spec in tqdm(specs, desc="answering", unit="model"):
        model, tokenizer = load_model(spec, dtype=cfg.dtype)
        answers[spec] = generate(model, tokenizer, prompts, sampling, chat=tokenizer.chat_template is not None,
                                 batch_size=cfg.batch_size)
        del model
    return answers


def arena_verb(cfg: ArenaConfig, opts: RunOptions, ask=input) -> dict:
    prompts = read_prompts(cfg.prompts, cfg.limit)
    with start_run("arena", cfg, opts, model=",".join(cfg.models)) as run:
        answers = answer_all(cfg.models, prompts, cfg)
        atomic_write_jsonl(run.artifact("answers.jsonl"),
                           [{"prompt": p, **{m: answers[m][i] for m in cfg.models}} for i, p in enumerate(prompts)])
        if cfg.judge == "human":
            judge = HumanJudge(cfg.seed, ask=ask)
        else:
            judge = ModelJudge(*load_model(cfg.judge, dtype=cfg.dtype))
        battles = battle(answers, prompts, judge)
        atomic_write_jsonl(run.artifact("battles.jsonl"), battles)
        triples = [(b["a"], b["b"], b["score_a"]) for b in battles]
        ratings = bootstrap_elo(triples, cfg.models, cfg.rounds, cfg.k, cfg.seed)
        tally = record(triples, cfg.models)
        ranked = sorted(cfg.models, key=lambda m: -ratings[m]["elo"])
        print(format_table(["model", "elo", "95% CI", "wins", "losses", "ties"],
                           [[m, f"{ratings[m]['elo']:.0f}",
                             f"{ratings[m]['ci_low']:.0f} – {ratings[m]['ci_high']:.0f}",
                             tally[m]["wins"], tally[m]["losses"], tally[m]["ties"]] for m in ranked]))
        return run.finish({"ratings": {m: {**ratings[m], **tally[m]} for m in ranked},
                           "battles": len(battles), "judge": cfg.judge, "prompts": len(prompts)})
