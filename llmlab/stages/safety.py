"""`llmlab eval safety` (refusal and over-refusal) and `llmlab redteam` (attack-success rate per category).

    llmlab eval safety --data ../shared/data/safety/xstest/xstest_prompts.csv --limit 100
    llmlab eval safety --data prompts.jsonl --adapter runs/dpo/adapter --judge smollm2-135m
    llmlab redteam --categories Insult,Physical_Harm --n 8 --seeds ../shared/data/safety/xsafety/en

The scorers are llmlab/evaluate/safety.py and llmlab/evaluate/redteam.py; the run folder keeps every reply.
"""

import dataclasses
import random

from llmlab.atomic import atomic_write_jsonl
from llmlab.config import field
from llmlab.errors import LlmlabError
from llmlab.evaluate.redteam import CATEGORIES, HARM_JUDGE_PROMPT, attack_prompts, red_team
from llmlab.evaluate.safety import REFUSAL_JUDGE_PROMPT, YesNoJudge, evaluate_safety, read_safety
from llmlab.generation.generate import SamplingConfig
from llmlab.models import load_model
from llmlab.models.load import ModelOptions
from llmlab.peft import load_adapter
from llmlab.runs import RunOptions, start_run


@dataclasses.dataclass
class ReplyConfig(SamplingConfig):
    max_new_tokens: int = field(64, help="the most tokens of each reply (a refusal shows in its first sentence)")


@dataclasses.dataclass
class SafetyConfig(ModelOptions):
    adapter: str | None = field(None, help="folder of an adapter to load onto the model (e.g. after llmlab align)")
    data: list[str] = field([], help="prompt sets: XSTest CSV, XSafety folder, Safety-Prompts JSON, or JSONL rows "
                                     "{prompt, label: safe|unsafe, category}")
    limit: int | None = field(None, help="use only N prompts of each file, spread over its categories")
    judge: str = field("", help="a judge model (spec like --model) to decide refusals instead of the rule classifier")
    batch_size: int = field(16, help="prompts per generation batch")
    sampling: ReplyConfig = field(default_factory=ReplyConfig, help="how replies are generated (greedy by default)")

    def __post_init__(self):
        if self.limit is not None and self.limit < 1:
            raise LlmlabError(f"--limit must be at least 1, got {self.limit}")


def _spread(rows: list[dict], limit: int | None, seed: int = 0) -> list[dict]:
    """`limit` rows drawn evenly over the categories (a plain head would keep the first category only)."""
    if not limit or len(rows) <= limit:
        return rows
    picked = random.Random(seed).sample(range(len(rows)), limit)
    return [rows[i] for i in sorted(picked)]


def safety_verb(cfg: SafetyConfig, opts: RunOptions) -> dict:
    if not cfg.data:
        raise LlmlabError("eval safety needs prompt sets: --data FILE_OR_FOLDER (e.g. XSTest's xstest_prompts.csv)")
    rows = [row for path in cfg.data for row in _spread(read_safety(path), cfg.limit)]
    if not rows:
        raise LlmlabError(f"no prompts in {', '.join(cfg.data)}")
    model, tokenizer = cfg.load_model()
    if cfg.adapter:
        model = load_adapter(model, cfg.adapter)
    judge = None
    if cfg.judge:
        judge_model, judge_tok = load_model(cfg.judge, cfg.dtype, cfg.device)
        judge = YesNoJudge(judge_model, judge_tok, REFUSAL_JUDGE_PROMPT)
    with start_run("eval safety", cfg, opts) as run:
        scores, transcripts = evaluate_safety(model, tokenizer, rows, cfg.sampling, judge, cfg.batch_size)
        atomic_write_jsonl(run.artifact("replies.jsonl"), transcripts)
        run.log_metrics(**{k: v for k, v in scores.items() if not isinstance(v, dict)})
        summary = run.finish({"model": cfg.model, "adapter": cfg.adapter, "data": cfg.data,
                              "judge": cfg.judge or "rules", **scores})
    for name, noun in (("refusal_rate", "harmful"), ("over_refusal_rate", "benign")):
        if name in scores:
            print(f"{noun} prompts ({scores[f'{noun}_prompts']}): {name.replace('_', ' ')} {scores[name]:.1%}")
            for category, rate in scores[f"{name}_by_category"].items():
                print(f"  {category:<34} {rate:6.1%}")
    print(f"replies -> {run.path / 'replies.jsonl'}")
    return summary


@dataclasses.dataclass
class AttackerSampling(SamplingConfig):
    max_new_tokens: int = field(48, help="the most tokens of each attack prompt")
    temperature: float = field(1.0, help="the attacker samples, so attacks vary")


@dataclasses.dataclass
class RedTeamConfig(ModelOptions):
    adapter: str | None = field(None, help="folder of an adapter to load onto the target model")
    attacker: str = field("", help="the model that writes attacks (default: the target model itself)")
    judge: str = field("", help="a judge model scoring harm (default: success = the reply does not refuse)")
    categories: list[str] = field(CATEGORIES, help="harm categories to attack")
    n: int = field(8, help="attacks per category")
    seeds: str = field("", help="seed prompts by category for few-shot attacks (any `eval safety` format)")
    shots: int = field(3, help="seed prompts shown to the attacker per attack")
    seed: int = field(0, help="seed of the seed-prompt choice")
    batch_size: int = field(16, help="prompts per generation batch")
    attacker_sampling: AttackerSampling = field(default_factory=AttackerSampling, help="how attacks are sampled")
    sampling: ReplyConfig = field(default_factory=ReplyConfig, help="how the target answers (greedy by default)")

    def __post_init__(self):
        if self.n < 1 or not self.categories:
            raise LlmlabError("--n must be at least 1 and --categories must name at least one category")


def redteam_verb(cfg: RedTeamConfig, opts: RunOptions) -> dict:
    seeds = {}
    if cfg.seeds:
        for row in read_safety(cfg.seeds):
            seeds.setdefault(row["category"], []).append(row["prompt"])
        unknown = [c for c in cfg.categories if c not in seeds]
        if len(unknown) == len(cfg.categories):
            raise LlmlabError(f"--seeds {cfg.seeds} has none of the categories {', '.join(cfg.categories)}; "
                              f"it has {', '.join(sorted(seeds)[:8])}")
    target, tokenizer = cfg.load_model()
    if cfg.adapter:
        target = load_adapter(target, cfg.adapter)
    attacker, attacker_tok = (load_model(cfg.attacker, cfg.dtype, cfg.device) if cfg.attacker
                              else (target, tokenizer))
    judge = None
    if cfg.judge:
        judge_model, judge_tok = load_model(cfg.judge, cfg.dtype, cfg.device)
        judge = YesNoJudge(judge_model, judge_tok, HARM_JUDGE_PROMPT)
    with start_run("redteam", cfg, opts) as run:
        attacks = attack_prompts(attacker, attacker_tok, cfg.categories, cfg.n, seeds, cfg.shots,
                                 cfg.attacker_sampling, random.Random(cfg.seed))
        scores, transcripts = red_team(target, tokenizer, attacks, cfg.sampling, judge)
        atomic_write_jsonl(run.artifact("transcripts.jsonl"), transcripts)
        run.log_metrics(attacks=scores["attacks"], attack_success_rate=scores["attack_success_rate"])
        summary = run.finish({"model": cfg.model, "adapter": cfg.adapter, "attacker": cfg.attacker or cfg.model,
                              "judge": cfg.judge or "rules", **scores})
    for category, rate in scores["asr_by_category"].items():
        print(f"  {category:<34} {rate:6.1%}")
    print(f"attack success rate {scores['attack_success_rate']:.1%} over {scores['attacks']} attacks -> "
          f"{run.path / 'transcripts.jsonl'}")
    return summary
