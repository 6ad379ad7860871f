"""Sequence-level knowledge distillation: the student learns the teacher's own outputs.

Kim & Rush 2016, "Sequence-Level Knowledge Distillation", https://arxiv.org/abs/1606.07947.
Word-level KD matches the teacher's distribution at each position of the *data*; sequence-level
KD approximates the teacher's distribution over whole sequences by its mode, ŷ ≈ argmax_y p(y | x)
(beam search, or greedy), and trains the student on it with plain cross-entropy:

    L(θ) = − Σ_t log q_θ(ŷ_t | ŷ_<t, x),    ŷ = teacher's generation for prompt x

The generations are made once, before training, with llmlab.generation's KV-cached decoder. Every
example's prompt is the part of it that carries no labels (a chat row's user turn); a plain-text
window, which is all targets, is prompted with its first `prompt_len` tokens. `complete` here is
also how GKD and MiniLLM draw on-policy samples from the student.
"""

import dataclasses

from tqdm.auto import tqdm

from llmlab.config import field
from llmlab.errors import LlmlabError
from llmlab.generation.generate import SamplingConfig, decode, eos_ids, pad_id
from llmlab.train.losses import IGNORE, sft_loss


@dataclasses.dataclass
class Rollout:
    """How prompts are cut from examples and completed: shared by seqKD, GKD and MiniLLM."""
    prompt_len: int = field(32, help="plain-text examples: the first N tokens are the prompt")
    max_new_tokens: int = field(64, help="the most tokens generated per prompt")
    temperature: float = field(1.0, help="sampling temperature (0 = greedy)")
    top_k: int = field(0, help="sample only from the k most likely tokens (0 = all)")
    top_p: float = field(1.0, help="nucleus sampling mass (1 = all)")
    gen_batch_size: int = field(16, help="prompts per generation batch (seqKD's up-front pass)")
    seed: int = field(0, help="seed of the sampling RNG")

    def __post_init__(self):
        for key in ("prompt_len", "max_new_tokens", "gen_batch_size"):
            if getattr(self, key) < 1:
                raise LlmlabError(f"--options.{key} must be at least 1, got {getattr(self, key)}")
        SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                       top_p=self.top_p)  # its checks, with its messages

    def sampling(self, seed: int) -> SamplingConfig:
        return SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                              top_p=self.top_p, seed=seed)


@dataclasses.dataclass
class SeqKDConfig(Rollout):
    temperature: float = field(0.0, help="teacher decoding temperature (0 = greedy: the paper's mode-seeking ŷ)")
    keep_data: bool = field(False, help="train on the original examples too, not only on the teacher's")


def prompt_of(ids: list[int], labels: list[int], prompt_len: int) -> list[int]:
    """The unlabelled head of an example; for plain text (labelled from its second token), its first `prompt_len`."""
    first = next((t for t, label in enumerate(labels) if label != IGNORE), len(ids))
    return ids[:first] if first > 1 else ids[:max(1, min(prompt_len, len(ids) - 1))]


def prompts_of(batch: dict, prompt_len: int) -> list[list[int]]:
    """Prompts of a collated, right-padded batch (B, T)."""
    lengths = batch["attention_mask"].sum(-1).tolist() if "attention_mask" in batch else None
    out = []
    for row, (ids, labels) in enumerate(zip(batch["input_ids"].tolist(), batch["labels"].tolist())):
        n = lengths[row] if lengths is not None else len(ids)
        out.append(prompt_of(ids[:n], labels[:n], prompt_len))
    return out


def complete(model, tokenizer, prompts: list[list[int]], sampling: SamplingConfig) -> list[dict]:
    """prompt + the model's completion per prompt, labels on the completion (and on EOS when it stopped)."""
    eos = eos_ids(model, tokenizer)
    was_training = model.training
    model.eval()
    try:
        new = decode(model, prompts, sampling, eos, pad_id(model, tokenizer))
    finally:
        model.train(was_training)
    examples = []
    for prompt, tokens in zip(prompts, new):
        if len(tokens) < sampling.max_new_tokens and eos:
            tokens = tokens + [eos[0]]  # it stopped: ending is part of what is learned
        tokens = tokens or [eos[0] if eos else pad_id(model, tokenizer)]
        examples.append({"input_ids": prompt + tokens, "labels": [IGNORE] * len(prompt) + tokens})
    return examples


def seqkd_data(teacher, tokenizer, examples: list[dict], cfg: SeqKDConfig) -> list[dict]:
    """The teacher's completion of each example's prompt, as new training examples."""
    prompts = [prompt_of(e["input_ids"], e["labels"], cfg.prompt_len) for e in examples]
    out = []
    for start in tqdm(range(0, len(prompts), cfg.gen_batch_size), desc="teacher outputs", unit="batch",
                      disable=None, leave=False):
        chunk = prompts[start:start + cfg.gen_batch_size]
        out += complete(teacher, tokenizer, chunk, cfg.sampling(cfg.seed + start))
    return out + (list(examples) if cfg.keep_data else [])


def make_seqkd_loss(teacher, tokenizer, cfg: SeqKDConfig):
    """Cross-entropy on the teacher's completions, which `seqkd_data` put in the examples beforehand."""
    return sft_loss
