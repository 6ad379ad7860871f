"""Perplexity, by the protocol of the GPTQ paper and by sliding windows.

GPTQ protocol (Frantar et al. 2022, https://arxiv.org/abs/2210.17323, §4 "Evaluation"): join the
text, tokenize it once, cut it into non-overlapping windows of `seq_len` tokens (the remainder is
dropped), and score every token after the first of each window:

    ppl = exp( Σ_windows Σ_t −log p(x_t | x_<t in window) / N_scored )

Sliding window (`stride < seq_len`, as in the transformers perplexity guide): windows start every
`stride` tokens and score only the tokens not scored before, so each token sees up to
`seq_len − stride` tokens of earlier context. This gives lower, fairer numbers for long texts.
"""

import math
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from llmlab.errors import LlmlabError
from llmlab.models import context_length


def windows(n_tokens: int, seq_len: int, stride: int | None = None) -> list[tuple[int, int, int]]:
    """(begin, end, n_scored) of each window; the last `n_scored` tokens of a window are scored."""
    if stride is None or stride == seq_len:
        return [(b, b + seq_len, seq_len - 1) for b in range(0, n_tokens - seq_len + 1, seq_len)]
    spans, scored_to = [], 0
    for begin in range(0, n_tokens - 1, stride):
        end = min(begin + seq_len, n_tokens)
        n_new = end - max(scored_to, begin + 1)  # the first token of the text has no prediction
        spans.append((begin, end, n_new))
        scored_to = end
        if end == n_tokens:
            break
    return spans


@torch.inference_mode()
def perplexity(model, tokenizer, text: str, seq_len: int = 2048, stride: int | None = None,
               max_windows: int | None = None, batch_size: int = 1, progress: bool = True) -> dict:
    """Perplexity of `model` on `text`; see the module docstring for the two protocols."""
    limit = context_length(model)
    if limit is not None and seq_len > limit:
        raise LlmlabError(f"--seq-len {seq_len} is longer than the model's context of {limit} tokens; "
                          f"use --seq-len {limit} or less")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    spans = windows(len(ids), seq_len, stride)[:max_windows]
    if not spans:
        raise LlmlabError(f"the text has only {len(ids)} tokens, fewer than one window of {seq_len}; "
                          "lower --seq-len or give more text")
    device = next(model.parameters()).device
    total_nll, n_scored, start = 0.0, 0, time.perf_counter()
    bar = tqdm(total=sum(s[2] for s in spans), unit="tok", desc="perplexity", disable=not progress)
    for batch in _batches(spans, batch_size):
        inputs = torch.stack([ids[b:e] for b, e, _ in batch]).to(device)  # (B, T)
        logits = model(input_ids=inputs, use_cache=False).logits  # (B, T, V)
        for row, (_, _, n) in enumerate(batch):
            total_nll += _nll(logits[row, -n - 1:-1], inputs[row, -n:])
            n_scored += n
        bar.update(sum(s[2] for s in batch))
        bar.set_postfix(ppl=f"{math.exp(total_nll / n_scored):.3f}")
    bar.close()
    seconds = time.perf_counter() - start
    return {"ppl": math.exp(total_nll / n_scored), "nll": total_nll / n_scored, "tokens_scored": n_scored,
            "windows": len(spans), "text_tokens": len(ids), "seconds": round(seconds, 3),
            "tokens_per_s": round(sum(e - b for b, e, _ in spans) / seconds, 1)}


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Summed negative log-likelihood of `targets`.

    The log-softmax runs on the logits in the model's dtype (its kernels accumulate in fp32), and
    the per-token values are summed in fp64. Up-casting a bf16 (T, 49k) logit matrix to fp32
    first costs more than the bf16 forward's own lm_head, for a difference of ~1e-5 in the result.
    """
    return F.cross_entropy(logits, targets, reduction="none").sum(dtype=torch.float64).item()


def _batches(spans, batch_size: int):
    """Windows of equal length, `batch_size` at a time (only the last sliding window can be shorter)."""
    batch = []
    for span in spans:
        if batch and (len(batch) == batch_size or span[1] - span[0] != batch[0][1] - batch[0][0]):
            yield batch
            batch = []
        batch.append(span)
    if batch:
        yield batch
