"""An lm-evaluation-harness model backed by any llmlab model, and lm-eval tasks over local files.

lm-evaluation-harness (EleutherAI), https://github.com/EleutherAI/lm-evaluation-harness. Importing
this module registers the model type "llmlab", so lm-eval's whole task zoo can score any llmlab
model spec (built-in, folder, .gguf, run folder, with adapters):

    import lm_eval, llmlab.evaluate.lm_eval_adapter
    lm_eval.simple_evaluate(model="llmlab", model_args="model=smollm2-135m,dtype=bf16", tasks=["arc_easy"])

The three request types map onto llmlab's own machinery:
    loglikelihood          llmlab's scorer: requests that share a context are one question, and
                           questions that share a prefix share its KV cache (multiple_choice.py)
    loglikelihood_rolling  lm-eval's own disjoint rolling windows, scored by the same engine
    generate_until         llmlab's decoding loop (generation/generate.py), greedy unless asked to sample

`local_tasks` writes lm-eval task YAMLs that include lm-eval's own definition of an exam (MMLU,
CMMLU, C-Eval subject, ARC, GSM8K CoT) and point it at local data, so that lm-eval's prompts and
metrics run on exactly the questions llmlab reads: the oracle of the parity tests and the benchmark.
"""

import json
from pathlib import Path

import yaml
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from llmlab.errors import LlmlabError
from llmlab.evaluate.arc import SUBSETS, load_subset
from llmlab.evaluate.mmlu import LETTERS, load_subject
from llmlab.evaluate.multiple_choice import Question, encode_pair, score_questions
from llmlab.generation.generate import SamplingConfig, generate
from llmlab.models import context_length, load_model
from llmlab.peft.io import load_adapters

DEFAULT_MAX_LENGTH = 2048  # lm-eval's, for a model that does not say


@register_model("llmlab")
class LlmlabLM(LM):
    """lm-eval's LM interface over an llmlab model; model_args: model, adapter (PATH;NAME=PATH), dtype, device,
    batch_size, strategy (packed | full), max_gen_toks."""

    def __init__(self, model: str = "smollm2-135m", adapter: str = "", dtype: str = "fp32", device: str = "cpu",
                 batch_size: int | str = 16, strategy: str = "packed", max_gen_toks: int = 256, **_ignored):
        super().__init__()
        self.model, self.tokenizer = load_model(model, dtype=dtype, device=device or "cpu")
        if adapter:
            load_adapters(self.model, [a for a in str(adapter).split(";") if a])
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16  # "auto" -> our default
        self.strategy, self.max_gen_toks, self.spec = strategy, int(max_gen_toks), model
        self.max_length = context_length(self.model) or DEFAULT_MAX_LENGTH

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.name_or_path or self.spec).replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [encode_pair(self.tokenizer, *req.args) for req in requests]
        return self.score_pairs(pairs, disable_tqdm)

    def score_pairs(self, pairs: list[tuple[list[int], list[int]]], disable_tqdm: bool = False):
        """(log-likelihood, is_greedy) of token pairs; pairs with the same context become one question."""
        questions, where = {}, []
        for ctx, cont in pairs:
            q = questions.setdefault(tuple(ctx), Question(list(ctx), []))
            where.append((tuple(ctx), len(q.continuations)))
            q.continuations.append(cont)
        keys = list(questions)
        scores = score_questions(self.model, [questions[k] for k in keys], batch_size=self.batch_size,
                                 strategy=self.strategy, progress=not disable_tqdm, desc="loglikelihood")
        by_key = dict(zip(keys, scores))
        return [by_key[k][j] for k, j in where]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        prefix = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.eos_token_id
        windows, owner = [], []
        for i, req in enumerate(requests):
            tokens = self.tokenizer(req.args[0]).input_ids
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=tokens, prefix_token=prefix, max_seq_len=self.max_length, context_len=1)):
                windows.append((ctx, cont))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (ll, _) in zip(owner, self.score_pairs(windows, disable_tqdm)):
            totals[i] += ll
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups = {}  # requests with the same generation settings share batches
        for i, req in enumerate(requests):
            context, kwargs = req.args
            groups.setdefault(json.dumps(kwargs, sort_keys=True, default=str), []).append((i, context))
        out = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm)
        for key, members in groups.items():
            cfg = self._sampling(json.loads(key))
            for start in range(0, len(members), self.batch_size):
                batch = members[start:start + self.batch_size]
                texts = generate(self.model, self.tokenizer, [c for _, c in batch], cfg, chat=False,
                                 batch_size=self.batch_size)
                for (i, _), text in zip(batch, texts):
                    out[i] = text
                bar.update(len(batch))
        bar.close()
        return out

    def _sampling(self, kwargs: dict) -> SamplingConfig:
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        sample = kwargs.get("do_sample", False) and float(kwargs.get("temperature", 1.0)) > 0
        return SamplingConfig(max_new_tokens=int(kwargs.get("max_gen_toks", self.max_gen_toks)),
                              temperature=float(kwargs.get("temperature", 1.0)) if sample else 0.0,
                              top_p=float(kwargs.get("top_p", 1.0) or 1.0), stop=[u for u in until if u])


# ---- lm-eval's own task definitions over local files ----

def _lm_eval_tasks() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def local_tasks(out: str | Path, kind: str, data: dict[str, list[dict]], task_yaml: str, name: str,
                eval_split: str, fewshot_split: str | None = None) -> str:
    """Write `out/<name>.yaml` + its data: lm-eval's `task_yaml` (relative to lm_eval/tasks) with the dataset
    replaced by local JSON-lines files, one per split in `data` (rows in the hub's field names).

    `kind` only labels the task group (a tag), so several local tasks can be run together.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, rows in data.items():
        files[split] = str((out / f"{name}.{split}.jsonl").resolve())
        Path(files[split]).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    base = _lm_eval_tasks() / task_yaml
    if not base.is_file():
        raise LlmlabError(f"lm-eval has no task file {base}; is lm-eval 0.4 installed?")
    cfg = {"include": str(base), "task": name, "tag": [f"llmlab_{kind}"], "dataset_path": "json",
           "dataset_name": None, "dataset_kwargs": {"data_files": files}, "test_split": eval_split,
           "validation_split": None, "training_split": None}
    if fewshot_split:
        cfg["fewshot_split"] = fewshot_split
    (out / f"{name}.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return name


def exam_task(out: str | Path, exam: str, data: str, subject: str, split: str) -> str:
    """A local copy of lm-eval's task for one MMLU, CMMLU or C-Eval subject; returns the task name."""
    def row(r):
        if exam == "mmlu":
            return {"question": r.question, "subject": subject, "choices": r.options, "answer": LETTERS.index(r.answer)}
        question, answer = ("Question", "Answer") if exam == "cmmlu" else ("question", "answer")
        return {question: r.question, **dict(zip(LETTERS, r.options)), answer: r.answer}

    rows = {s: [row(r) for r in load_subject(exam, data, subject, s)] for s in dict.fromkeys([split, "dev"])}
    base = {"mmlu": f"mmlu/default/mmlu_{subject}.yaml", "cmmlu": f"cmmlu/cmmlu_{subject}.yaml",
            "ceval": f"ceval/ceval-valid_{subject}.yaml"}[exam]
    return local_tasks(out, exam, rows, base, f"local_{exam}_{subject}", split, "dev")


def arc_task(out: str | Path, data: str, subset: str, split: str) -> str:
    """A local copy of lm-eval's arc_easy / arc_challenge; examples (if asked for) come from train."""
    def row(i, q):
        labels = [chr(ord("A") + j) for j in range(len(q.choices))]
        return {"id": str(i), "question": q.question, "choices": {"text": q.choices, "label": labels},
                "answerKey": labels[q.gold]}

    rows = {s: [row(i, q) for i, q in enumerate(load_subset(data, subset, s))] for s in dict.fromkeys([split, "train"])}
    name = f"local_{SUBSETS[subset].lower().replace('-', '_')}"
    return local_tasks(out, "arc", rows, f"arc/{SUBSETS[subset].lower().replace('-', '_')}.yaml", name, split, "train")


def gsm8k_task(out: str | Path, rows: list[dict]) -> str:
    """A local copy of lm-eval's gsm8k_cot (its eight exemplars, regexes and metric) over `rows`."""
    return local_tasks(out, "gsm8k", {"test": rows}, "gsm8k/gsm8k-cot.yaml", "local_gsm8k_cot", "test")
