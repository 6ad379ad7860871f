"""Multiple-choice scoring by log-likelihood, exactly as lm-evaluation-harness defines it.

Gao et al., "The Language Model Evaluation Harness" (EleutherAI), https://github.com/EleutherAI/lm-evaluation-harness
(the `multiple_choice` output type of lm-eval 0.4). A question is a context c and choices a_1 … a_k; each
choice is scored as the continuation `delimiter + a_j` (the delimiter is " "):

    ll_j     = Σ_t log p(x_j,t | c, x_j,<t)           x_j = the continuation's tokens
    acc      = [ argmax_j ll_j == gold ]
    acc_norm = [ argmax_j ll_j / len(a_j) == gold ]  len = characters of the choice text, no delimiter
    acc_bytes= [ argmax_j ll_j / bytes(a_j) == gold ]  UTF-8 bytes (lm-eval's `acc_bytes`)

Tokens follow lm-eval's HFLM: spaces that end the context move to the continuation, the context is
encoded alone and the continuation's tokens are those of `encode(c + x)` after the context's.

Speed, without changing a number: the k continuations share their context, and few-shot questions
of one subject share a long prefix (description + k solved examples). So
  1. contexts are sorted and grouped by a common token prefix P; P runs once and its KV cache is
     reused by every question of the group (a question joins while the tokens it saves outweigh
     the shared tokens it costs the group: (|P| − |P'|)·n < |P'|);
  2. each question is one segment  [ rest of context | x_1[:-1] | x_2[:-1] | … ]  under a block mask:
     the context part is causal, each continuation sees the context and its own earlier tokens, and
     position ids restart after the context for every continuation. A continuation's last token is only
     a target, so MMLU's one-token " A"…" D" cost nothing beyond the context. Segments of several
     questions share a row (first fit, longest first), so rows carry little padding.
The `full` strategy scores one plain row per (context, continuation) as HFLM does: the reference in
the tests, and the path for models whose forward hooks rewrite inputs (prompt and prefix adapters).
"""

import functools
import inspect
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from llmlab.errors import LlmlabError
from llmlab.generation.forward import cache_kwargs
from llmlab.models import context_length

STRATEGIES = ("packed", "full")
MIN_PREFIX, MIN_SAVED = 16, 128  # a cached prefix costs a forward call: worth it only if it saves enough tokens


@dataclass
class Question:
    """A context and its continuations, as token ids (what is scored)."""
    context: list[int]
    continuations: list[list[int]]


@dataclass
class Item:
    """A multiple-choice question as text, with its answer and the subject it is averaged under."""
    context: str
    choices: list[str]
    gold: int
    subject: str = ""
    delimiter: str = " "


# ---- from text to tokens, as lm-eval's HFLM does it ----

def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) by lm-eval's rules; an empty context becomes the BOS (or EOS) token."""
    if not context:
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        cont = tokenizer(continuation, add_special_tokens=False).input_ids
        return ([prefix], cont) if cont[:1] != [prefix] else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = _encode(tokenizer, context + continuation)
    ctx = _encode(tokenizer, context)
    return ctx, whole[len(ctx):]


def _encode(tokenizer, text: str) -> list[int]:
    bos = tokenizer.bos_token
    special = {"add_special_tokens": False} if bos and text.startswith(bos) else {}
    return tokenizer(text, **special).input_ids


def encode_items(tokenizer, items: list[Item]) -> list[Question]:
    questions = []
    for item in items:
        pairs = [encode_pair(tokenizer, item.context, item.delimiter + c) for c in item.choices]
        # the context's ids do not depend on the continuation, except for moved trailing spaces
        if any(p[0] != pairs[0][0] for p in pairs):
            raise LlmlabError("the choices of one question tokenise the context differently; score them "
                              "as separate questions")
        questions.append(Question(pairs[0][0], [p[1] for p in pairs]))
    return questions


# ---- metrics ----

def choice_metrics(lls: list[float], choices: list[str], gold: int) -> dict:
    """acc, acc_norm and acc_bytes of one question (ties go to the first choice, as numpy's argmax)."""
    def argmax(values):
        return max(range(len(values)), key=lambda j: (values[j], -j))

    pred = argmax(lls)
    pred_norm = argmax([ll / len(c) for ll, c in zip(lls, choices)])
    pred_bytes = argmax([ll / len(c.encode("utf-8")) for ll, c in zip(lls, choices)])
    return {"pred": pred, "pred_norm": pred_norm, "acc": float(pred == gold),
            "acc_norm": float(pred_norm == gold), "acc_bytes": float(pred_bytes == gold)}


def evaluate_items(model, tokenizer, items: list[Item], *, batch_size: int = 16, strategy: str = "packed",
                   progress: bool = True) -> list[dict]:
    """One record per item: the choices' log-likelihoods and the item's metrics."""
    for item in items:
        if not item.choices or any(not c for c in item.choices):
            raise LlmlabError(f"a question of '{item.subject}' has an empty choice; every choice needs text")
    scores = score_questions(model, encode_items(tokenizer, items), batch_size=batch_size,
                             strategy=strategy, progress=progress)
    records = []
    for item, score in zip(items, scores):
        lls = [ll for ll, _ in score]
        records.append({"subject": item.subject, "gold": item.gold, "lls": lls,
                        **choice_metrics(lls, item.choices, item.gold)})
    return records


def accuracy(records: list[dict]) -> dict:
    """Mean acc and acc_norm over questions, and how many there were."""
    n = len(records)
    return {"acc": sum(r["acc"] for r in records) / n if n else 0.0,
            "acc_norm": sum(r["acc_norm"] for r in records) / n if n else 0.0, "n": n}


# ---- the engine ----

@torch.inference_mode()
def score_questions(model, questions: list[Question], *, batch_size: int = 16, strategy: str = "packed",
                    progress: bool = True, desc: str = "scoring") -> list[list[tuple[float, bool]]]:
    """(log-likelihood, is_greedy) of every continuation of every question, in the given order."""
    if strategy not in STRATEGIES:
        raise LlmlabError(f"unknown scoring strategy '{strategy}'; use {' or '.join(STRATEGIES)}")
    if batch_size < 1:
        raise LlmlabError(f"batch_size must be at least 1, got {batch_size}")
    questions = [_truncate(q, context_length(model)) for q in questions]
    if _hooked(model) or _beyond_window(model, questions):
        strategy = "full"  # see _hooked and _beyond_window: plain rows are right for them
    results: list = [None] * len(questions)
    bar = tqdm(total=len(questions), unit="q", desc=desc, disable=not progress)
    for prefix_len, group in _groups(questions, strategy):
        cache = _prefix_cache(model, questions[group[0]].context[:prefix_len]) if prefix_len else None
        group.sort(key=lambda i: -_row_len(questions[i], prefix_len))  # long first: less padding, honest ETA
        for start in range(0, len(group), batch_size):
            batch = group[start:start + batch_size]
            run = _full_batch if strategy == "full" else _packed_batch
            for i, score in zip(batch, run(model, [questions[i] for i in batch], prefix_len, cache)):
                results[i] = score
            bar.update(len(batch))
    bar.close()
    return results


def _truncate(q: Question, limit: int | None) -> Question:
    """Drop context tokens from the left so the longest row fits the model (HFLM truncates the same way)."""
    if not q.continuations or any(not c for c in q.continuations):
        raise LlmlabError("every continuation must have at least one token")
    longest = max(len(c) for c in q.continuations)
    if limit is None or len(q.context) + longest - 1 <= limit:
        return q
    if longest > limit:
        raise LlmlabError(f"a continuation of {longest} tokens is longer than the model's context of {limit}")
    return Question(q.context[-(limit + 1 - longest):], q.continuations)


def _groups(questions: list[Question], strategy: str) -> list[tuple[int, list[int]]]:
    """(prefix length, indices) of questions that share a cached prefix; (0, rest) for all others."""
    order = sorted(range(len(questions)), key=lambda i: questions[i].context)
    if strategy == "full":
        return [(0, order)]
    groups, alone, group, shared = [], [], [], 0
    for i in order:
        common = _common_prefix(questions[group[0]].context, questions[i].context, shared) if group else 0
        if group and (shared - common) * len(group) < common:  # joining saves more than it costs
            group.append(i)
            shared = common
            continue
        _close(group, shared, questions, groups, alone)
        group, shared = [i], len(questions[i].context)
    _close(group, shared, questions, groups, alone)
    return groups + ([(0, alone)] if alone else [])


def _close(group: list[int], shared: int, questions: list[Question], groups: list, alone: list[int]):
    """Keep a group's prefix if it saves enough tokens to pay for its own forward call."""
    if not group:
        return
    prefix_len = min(shared, min(len(questions[i].context) for i in group) - 1)  # keep a token to predict from
    if prefix_len >= MIN_PREFIX and prefix_len * (len(group) - 1) >= MIN_SAVED:
        groups.append((prefix_len, group))
    else:
        alone += group


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n = min(limit, len(a), len(b))
    for k in range(n):
        if a[k] != b[k]:
            return k
    return n


def _row_len(q: Question, prefix_len: int) -> int:
    return len(q.context) - prefix_len + sum(len(c) - 1 for c in q.continuations)


def _prefix_cache(model, prefix: list[int]):
    ids = torch.tensor([prefix], device=model.device)
    out = model(input_ids=ids, use_cache=True, **_keep(type(model), 1))
    return [(k, v) for k, v, *_ in out.past_key_values]  # per layer (1, kv_heads, P, head_dim)


def _packed_batch(model, qs: list[Question], prefix_len: int, cache) -> list[list[tuple[float, bool]]]:
    """Questions packed into rows, each as its context's rest and every continuation but its last token."""
    ids, question, part, pos, targets = _layout(qs, prefix_len)  # (R, T) each; targets: (row, position, token, owner)
    device, dtype = model.device, next(model.parameters()).dtype
    ids, question, part, pos = (torch.tensor(x, device=device) for x in (ids, question, part, pos))
    R = ids.shape[0]
    past = None
    if cache is not None:  # expand() shares the prefix's memory; the forward concatenates into new tensors
        past = DynamicCache([(k.expand(R, -1, -1, -1), v.expand(R, -1, -1, -1)) for k, v in cache])
    keep, cols = _kept_positions(model, targets, device)
    logits = model(input_ids=ids, attention_mask=_block_mask(question, part, prefix_len, dtype), position_ids=pos,
                   use_cache=past is not None, **cache_kwargs(model, past), **keep).logits  # (R, T or kept, V)
    return _collect(logits, targets, cols, [len(q.continuations) for q in qs])


def _layout(qs: list[Question], prefix_len: int):
    """Rows as wide as the longest question, filled first-fit (longest first), left-padded.

    Returns token ids, question index, part (0 = context, j + 1 = continuation j, -1 = padding) and
    position of every column, and the targets: (row, position predicting it, token, continuation number).
    """
    lengths = [_row_len(q, prefix_len) for q in qs]
    width = max(lengths)
    rows: list[list[int]] = []
    used: list[int] = []
    for b in sorted(range(len(qs)), key=lambda b: -lengths[b]):
        r = next((r for r in range(len(rows)) if used[r] + lengths[b] <= width), None)
        if r is None:
            rows.append([])
            used.append(0)
            r = len(rows) - 1
        rows[r].append(b)
        used[r] += lengths[b]
    owner = [0]
    for q in qs:
        owner.append(owner[-1] + len(q.continuations))
    columns, targets = ([], [], [], []), []
    for r, members in enumerate(rows):
        ids, question, part, pos = [], [], [], []
        pad = width - used[r]
        for b in members:
            rest, base = qs[b].context[prefix_len:], pad + len(ids)
            ids += rest
            part += [0] * len(rest)
            pos += range(prefix_len, prefix_len + len(rest))
            for j, cont in enumerate(qs[b].continuations):
                start = pad + len(ids)
                targets += [(r, base + len(rest) - 1 if t == 0 else start + t - 1, tok, owner[b] + j)
                            for t, tok in enumerate(cont)]
                ids += cont[:-1]
                part += [j + 1] * (len(cont) - 1)
                pos += range(prefix_len + len(rest), prefix_len + len(rest) + len(cont) - 1)
            question += [b] * (len(ids) - len(question))
        for column, values, fill in zip(columns, (ids, question, part, pos), (0, -1, -1, 0)):
            column.append([fill] * pad + values)
    return (*columns, targets)


def _full_batch(model, qs: list[Question], prefix_len: int, cache) -> list[list[tuple[float, bool]]]:
    """HFLM's way: one right-padded row per (context, continuation)."""
    rows, targets, owner = [], [], 0
    for q in qs:
        for cont in q.continuations:
            targets += [(len(rows), len(q.context) - 1 + t, tok, owner) for t, tok in enumerate(cont)]
            rows.append(q.context + cont[:-1])
            owner += 1
    keep, cols = _kept_positions(model, targets, model.device)
    mask = _pad([[1] * len(r) for r in rows], 0, model.device)  # causal rows never see their right padding anyway
    logits = model(input_ids=_pad(rows, 0, model.device), attention_mask=mask, use_cache=False, **keep).logits
    return _collect(logits, targets, cols, [len(q.continuations) for q in qs])


def _block_mask(question: torch.Tensor, part: torch.Tensor, prefix_len: int, dtype) -> torch.Tensor:
    """(R, 1, T, prefix + T) additive mask from (R, T) question index and part (-1 on padding).

    A token sees the cached prefix, and earlier tokens of its own question's context or of its own
    continuation. Padding sees the prefix and earlier padding; every query sees itself, so no softmax
    row is empty.
    """
    R, T = part.shape
    idx = torch.arange(T, device=part.device)
    causal = idx[None, :] <= idx[:, None]  # (T, T): key <= query
    same_question = question[:, None, :] == question[:, :, None]  # (R, T, T)
    visible = causal & same_question & ((part[:, None, :] == 0) | (part[:, None, :] == part[:, :, None]))
    visible = torch.cat([visible.new_ones(R, T, prefix_len), visible], dim=-1)
    mask = torch.zeros(visible.shape, dtype=dtype, device=part.device)
    return mask.masked_fill_(~visible, torch.finfo(dtype).min)[:, None]


def _hooked(model) -> bool:
    """Forward hooks (llmlab's prompt and prefix adapters) rewrite the inputs: they need plain rows with a
    2-D mask, and they add virtual positions, so asking for logits by position would miss."""
    return bool(model._forward_pre_hooks or model._forward_hooks)


def _beyond_window(model, questions: list[Question]) -> bool:
    """Our block mask knows no sliding window; rows longer than the model's window go the plain way."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    window = getattr(config, "sliding_window", None)
    return isinstance(window, int) and any(len(q.context) + sum(map(len, q.continuations)) > window
                                           for q in questions)


def _kept_positions(model, targets, device):
    """Ask the model for the logits of predicting positions only, where it can (lm_head is ~20% of a small model)."""
    positions = torch.tensor([t[1] for t in targets], device=device)
    if _hooked(model) or not _keep(type(model), 1):
        return {}, positions
    kept, cols = torch.unique(positions, return_inverse=True)
    return {"logits_to_keep": kept}, cols


def _collect(logits, targets, cols, n_conts: list[int]) -> list[list[tuple[float, bool]]]:
    """Sum each continuation's token log-probabilities; greedy = every token is the argmax."""
    rows = torch.tensor([t[0] for t in targets], device=logits.device)
    tokens = torch.tensor([t[2] for t in targets], device=logits.device)
    owners = torch.tensor([t[3] for t in targets], device=logits.device)
    flat = rows * logits.shape[1] + cols
    unique, inverse = torch.unique(flat, return_inverse=True)  # MMLU's 4 choices share one position
    logp = torch.log_softmax(logits.flatten(0, 1)[unique].float(), dim=-1)  # (U, V)
    token_logp = logp[inverse, tokens].double()
    missed = (logp.argmax(-1)[inverse] != tokens).int()
    total = torch.zeros(sum(n_conts), dtype=torch.float64, device=logits.device).index_add_(0, owners, token_logp)
    misses = torch.zeros(sum(n_conts), dtype=torch.int32, device=logits.device).index_add_(0, owners, missed)
    flat_scores = list(zip(total.tolist(), (misses == 0).tolist()))
    out, start = [], 0
    for n in n_conts:
        out.append(flat_scores[start:start + n])
        start += n
    return out


def _pad(rows: list[list[int]], fill: int, device) -> torch.Tensor:
    out = torch.full((len(rows), max(len(r) for r in rows)), fill, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return out.to(device)


@functools.cache
def _keep(model_class, n) -> dict:
    accepts = "logits_to_keep" in inspect.signature(model_class.forward).parameters
    return {"logits_to_keep": n} if accepts else {}
