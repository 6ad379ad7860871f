"""Chain-of-thought distillation: the teacher's rationales and the answers as two tasks for the student.

Hsieh et al. 2023, "Distilling Step-by-Step! Outperforming Larger Language Models with Less
Training Data and Smaller Model Sizes", https://arxiv.org/abs/2305.02301. The teacher is prompted
to reason ("Let's think step by step") for each training question; the student learns, as two
tasks told apart by a prefix of the input, to give the answer and to give the rationale:

    L = L_label + λ L_rationale,    L_label = CE(f("[label] " + x), y),    L_rationale = CE(f("[rationale] " + x), r̂)

At test time the student is asked with "[label]" only, so the rationale costs nothing at inference:
it shapes the representation during training. Teacher rationales whose final answer disagrees with
the gold one are dropped (`filter`; their rows keep the label task), which is the usual guard
against distilling wrong reasoning. Rows: GSM8K's {question, answer "… #### 72"} (whose text
before "####" is a human rationale, usable with `source: data`) or alpaca rows
({instruction, input, output}, e.g. `llmlab data tasks`), whose output is the answer.
"""

import dataclasses
import re

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from llmlab.config import field
from llmlab.data.packing import collate, model_inputs
from llmlab.data.sft import chat_template, encode_chat
from llmlab.distill.seqkd import complete
from llmlab.errors import LlmlabError
from llmlab.generation.generate import SamplingConfig, encode
from llmlab.train.losses import shifted

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


@dataclasses.dataclass
class CoTConfig:
    source: str = field("teacher", help="teacher (generate rationales) or data (GSM8K's own, before '####')")
    rationale_weight: float = field(1.0, help="λ: weight of the rationale task against the label task")
    cot_prompt: str = field("Let's think step by step.", help="appended to each question to make the teacher reason")
    max_new_tokens: int = field(192, help="the longest teacher rationale, in tokens")
    filter: bool = field(True, help="drop teacher rationales whose final answer is not the gold answer")
    gen_batch_size: int = field(16, help="questions per teacher generation batch")
    max_len: int = field(512, help="tokens per training example; longer ones are cut")

    def __post_init__(self):
        if self.source not in ("teacher", "data"):
            raise LlmlabError(f"--options.source must be teacher or data, got '{self.source}'")
        if self.rationale_weight < 0:
            raise LlmlabError(f"--options.rationale_weight must be 0 or more, got {self.rationale_weight}")
        if self.max_new_tokens < 1 or self.gen_batch_size < 1 or self.max_len < 2:
            raise LlmlabError("--options.max_new_tokens and gen_batch_size must be at least 1, max_len at least 2")


def parse_row(row: dict, where: str) -> tuple[str, str, str | None]:
    """(question, gold answer, the data's own rationale or None) of a GSM8K or alpaca row."""
    if "question" in row and "answer" in row:
        rationale, sep, answer = str(row["answer"]).rpartition("####")
        rationale = re.sub(r"<<[^>]*>>", "", rationale).strip()  # GSM8K's calculator annotations
        return str(row["question"]), answer.strip(), (rationale or None) if sep else None
    if "instruction" in row and "output" in row:
        question = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        return question, str(row["output"]).strip(), None
    raise LlmlabError(f"{where}: CoT distillation needs question/answer (GSM8K) or instruction/output "
                      f"(alpaca) fields, got {', '.join(sorted(row))}")


def agrees(rationale: str, gold: str) -> bool:
    """The rationale's final answer is the gold one: its last number for numeric answers, else its last line."""
    plain = gold.replace(",", "")
    if NUMBER.fullmatch(plain):
        numbers = NUMBER.findall(rationale)
        return bool(numbers) and numbers[-1].replace(",", "").rstrip(".") == plain
    lines = [line for line in rationale.strip().splitlines() if line.strip()]
    return bool(lines) and gold.lower() in lines[-1].lower()


def teacher_rationales(teacher, tokenizer, questions: list[str], cfg: CoTConfig) -> list[str]:
    chat = bool(getattr(tokenizer, "chat_template", None))
    prompts = [encode(tokenizer, f"{q}\n{cfg.cot_prompt}" if chat else f"Q: {q}\nA: {cfg.cot_prompt}", chat=chat)
               for q in questions]
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=0.0)
    texts = []
    for start in tqdm(range(0, len(prompts), cfg.gen_batch_size), desc="teacher rationales", unit="batch",
                      disable=None, leave=False):
        for example in complete(teacher, tokenizer, prompts[start:start + cfg.gen_batch_size], sampling):
            new = [t for t, label in zip(example["input_ids"], example["labels"]) if label != -100]
            texts.append(tokenizer.decode(new, skip_special_tokens=True).strip())
    return texts


def cot_data(teacher, tokenizer, rows: list[dict], cfg: CoTConfig) -> tuple[list[dict], dict]:
    """Label-task and rationale-task examples (each with its loss `weight`), and counts of what was kept."""
    parsed = [parse_row(row, f"row {i}") for i, row in enumerate(rows, 1)]
    if cfg.source == "data":
        rationales = [r for _, _, r in parsed]
        if not any(rationales):
            raise LlmlabError("--options.source data needs rows with their own rationale (GSM8K's 'answer' "
                              "with '####'); use --options.source teacher")
    else:
        rationales = teacher_rationales(teacher, tokenizer, [q for q, _, _ in parsed], cfg)
        if cfg.filter:
            rationales = [r if agrees(r, gold) else None for r, (_, gold, _) in zip(rationales, parsed)]
    template = chat_template(tokenizer, "auto")
    examples = []
    for (question, answer, _), rationale in zip(parsed, rationales):
        tasks = [("[label] ", answer, 1.0)] + ([("[rationale] ", rationale, cfg.rationale_weight)] if rationale else [])
        for prefix, target, weight in tasks:
            messages = [{"role": "user", "content": prefix + question}, {"role": "assistant", "content": target}]
            ids, labels = encode_chat(messages, tokenizer, template)
            examples.append({"input_ids": ids[:cfg.max_len], "labels": labels[:cfg.max_len], "weight": weight})
    kept = sum(bool(r) for r in rationales)
    return examples, {"rows": len(rows), "rationales": kept, "rationales_dropped": len(rows) - kept}


def cot_collate(examples: list[dict], pad_id: int) -> dict:
    batch = collate(examples, pad_id)
    batch["weight"] = torch.tensor([e.get("weight", 1.0) for e in examples])  # (B,)
    return batch


def cot_loss(model, batch: dict):
    """Σ weight_i · CE over example i's target tokens; the count is the number of target tokens."""
    logits, targets, mask = shifted(model(**model_inputs(model, batch)).logits, batch["labels"])  # (B, T-1, V)
    ce = F.cross_entropy(logits.transpose(1, 2).float(), targets, ignore_index=-100, reduction="none")  # (B, T-1)
    return (ce * batch["weight"][:, None].to(ce.dtype)).sum(), int(mask.sum())


def cot_prompt(question: str) -> str:
    """How the trained student is asked at test time: the label task only."""
    return "[label] " + question


def make_cot_loss(teacher, tokenizer, cfg: CoTConfig):
    """The multi-task loss on the rationales and labels that `cot_data` made beforehand."""
    return cot_loss
