"""Pretraining objectives: how a window of raw tokens becomes (input, targets), and the one loss over them.

Every objective here gives a decoder-only model a row `s` of seq_len + 1 tokens and a target mask;
the model reads s[:-1] and predicts s[1:] where the mask is on, with bidirectional attention over
`prefix_lengths[b]` leading tokens when the objective has an input part (the prefix LM view of
UL2, Tay et al. 2022, https://arxiv.org/abs/2205.05131, §3.1):

    causal   every next token is a target (GPT)
    prefix   a random split point k: tokens < k are the bidirectional prefix, the rest targets
    span     T5's span corruption (Raffel et al. 2020, https://arxiv.org/abs/1910.10683): about 15%
             of the tokens, in spans of mean length 3, are replaced by sentinels <extra_id_i> in the
             input; the targets are the sentinels each followed by its span, then EOS:
                 input  = x₁ x₂ <extra_id_0> x₆ <extra_id_1> x₉ …      (the prefix)
                 target = <extra_id_0> x₃ x₄ x₅ <extra_id_1> x₇ x₈ … EOS
    ul2      the mixture of denoisers: R (spans of mean 3 and 8 at 15%), X (mean 3 and 8 at 50%,
             mean 64 at 15% and 50%) and S (prefix LM), the row starting with its mode token
             [R], [X] or [S]; S is drawn with probability `s_share`, the six others share the rest

The corruption of a row is a function of (seed, its tokens), so a resumed run sees the same rows.
"""

import zlib

import numpy as np
import torch

from llmlab.data.packing import IGNORE
from llmlab.errors import LlmlabError
from llmlab.train.losses import summed_cross_entropy

OBJECTIVES = ("causal", "prefix", "span", "ul2")
N_SENTINELS = 100
SENTINELS = [f"<extra_id_{i}>" for i in range(N_SENTINELS)]
MODES = {"R": "[R]", "S": "[S]", "X": "[X]"}
R_DENOISERS = [(3, 0.15), (8, 0.15)]
X_DENOISERS = [(3, 0.5), (8, 0.5), (64, 0.15), (64, 0.5)]


def special_tokens(objective: str) -> list[str]:
    """The tokens an objective adds to the tokenizer (sentinels, mode tokens)."""
    if objective == "span":
        return SENTINELS
    if objective == "ul2":
        return SENTINELS + list(MODES.values())
    return []


def lm_loss(model, batch: dict):
    """Summed cross-entropy over the target tokens and their count (plus a MoE model's auxiliary losses per token)."""
    kwargs = {"input_ids": batch["input_ids"], "use_cache": False}
    for key in ("prefix_lengths", "segment_ids", "position_ids"):
        if key in batch:
            kwargs[key] = batch[key]
    out = model(**kwargs)
    loss, n = summed_cross_entropy(out.logits, batch["targets"])
    aux = getattr(out, "aux_loss", None)
    return (loss + aux * n if aux is not None else loss), n


class Collate:
    """Turns windows (seq_len + 1 tokens each) into a batch for `lm_loss` under one objective."""

    def __init__(self, objective: str, tokenizer=None, seed: int = 0, doc_mask: bool = False, eos_id: int | None = None,
                 s_share: float = 0.25):
        if objective not in OBJECTIVES:
            raise LlmlabError(f"unknown objective '{objective}'; use one of {', '.join(OBJECTIVES)}")
        self.objective, self.seed, self.doc_mask, self.s_share = objective, seed, doc_mask, s_share
        self.eos_id = eos_id if eos_id is not None else getattr(tokenizer, "eos_token_id", None)
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in special_tokens(objective)} if tokenizer else {}
        missing = [t for t, i in ids.items() if i is None or i == tokenizer.unk_token_id]
        if missing:
            raise LlmlabError(f"objective {objective} needs the tokens {missing[0]}… in the tokenizer; "
                              f"llmlab pretrain adds them when it builds a model")
        self.sentinels = [ids[t] for t in SENTINELS] if ids else []
        self.modes = {k: ids[v] for k, v in MODES.items() if v in ids}

    def __call__(self, windows) -> dict:
        rows = [self.row(np.asarray(w, dtype=np.int64)) for w in windows]
        seq = torch.from_numpy(np.stack([r[0] for r in rows]))
        mask = torch.from_numpy(np.stack([r[1] for r in rows]))
        batch = {"input_ids": seq[:, :-1], "targets": seq[:, 1:].masked_fill(~mask[:, 1:], IGNORE)}
        if self.objective != "causal":
            batch["prefix_lengths"] = torch.tensor([r[2] for r in rows])
        if self.doc_mask and self.eos_id is not None:
            batch.update(document_positions(batch["input_ids"], self.eos_id))
        return batch

    def row(self, window: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """(sequence, target mask, prefix length), all of the window's length."""
        n = len(window)
        if self.objective == "causal":
            return window, np.ones(n, dtype=bool), 0
        rng = self.rng(window)
        if self.objective == "prefix":
            return prefix_row(window, rng)
        if self.objective == "span":
            return self.fit_to(span_corrupt(window, rng, 3, 0.15, self.sentinels, self.eos_id), n)
        if rng.random() < self.s_share:
            seq, mask, k = prefix_row(window[:-1], rng)
            return np.concatenate([[self.modes["S"]], seq]), np.concatenate([[False], mask]), k + 1
        denoisers = [("R", *d) for d in R_DENOISERS] + [("X", *d) for d in X_DENOISERS]
        mode, mean_span, rate = denoisers[rng.integers(len(denoisers))]
        inp, tgt = span_corrupt(window, rng, mean_span, rate, self.sentinels, self.eos_id)
        return self.fit_to((np.concatenate([[self.modes[mode]], inp]), tgt), n)

    def rng(self, window: np.ndarray) -> np.random.Generator:
        """The row's own generator: a function of (seed, its tokens), so a resumed run corrupts it the same way."""
        return np.random.default_rng([self.seed, zlib.crc32(window.tobytes())])

    @staticmethod
    def fit_to(parts, n: int) -> tuple[np.ndarray, np.ndarray, int]:
        """Input then targets, cut or padded (with masked EOS-free zeros) to n tokens; the input is the prefix."""
        inp, tgt = parts
        seq = np.concatenate([inp, tgt])[:n]
        mask = np.zeros(len(seq), dtype=bool)
        mask[len(inp):] = True
        pad = n - len(seq)
        return np.pad(seq, (0, pad)), np.pad(mask, (0, pad)), len(inp)


class Seq2SeqCollate:
    """Span corruption for an encoder-decoder: the corrupted window goes to the encoder, the sentinels and their
    spans are the decoder's targets (T5's own layout), padded per batch."""

    def __init__(self, tokenizer, seed: int = 0):
        self.inner = Collate("span", tokenizer, seed)
        self.pad = tokenizer.pad_token_id

    def __call__(self, windows) -> dict:
        pairs = [span_corrupt(w, self.inner.rng(w), 3, 0.15, self.inner.sentinels, self.inner.eos_id)
                 for w in (np.asarray(w, dtype=np.int64) for w in windows)]
        inputs = _pad([p[0] for p in pairs], self.pad)
        lengths = torch.tensor([len(p[0]) for p in pairs])  # the mask by length: a real token may be the pad id
        return {"input_ids": inputs, "attention_mask": torch.arange(inputs.shape[1])[None] < lengths[:, None],
                "labels": _pad([p[1] for p in pairs], IGNORE)}


def _pad(rows, value) -> torch.Tensor:
    out = torch.full((len(rows), max(len(r) for r in rows)), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.from_numpy(r)
    return out


def seq2seq_loss(model, batch: dict):
    """Summed cross-entropy of an encoder-decoder's targets (teacher forcing) and their count."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                   use_cache=False).logits
    return summed_cross_entropy(logits, batch["labels"])


def prefix_row(window: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray, int]:
    """A split point k drawn uniformly in [1, n−1): the first k tokens are the prefix, the rest targets."""
    k = int(rng.integers(1, len(window) - 1))
    mask = np.zeros(len(window), dtype=bool)
    mask[k:] = True
    return window, mask, k


def span_corrupt(tokens: np.ndarray, rng, mean_span: float, rate: float, sentinels: list[int],
                 eos_id: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(input, targets) of T5's span corruption, as t5.data.preprocessors.random_spans_noise_mask lays spans out:
    round(n·rate) noise tokens in round(noise / mean_span) spans, noise and kept segments alternating."""
    n = len(tokens)
    noise = min(max(int(round(n * rate)), 1), n - 1)
    spans = min(max(int(round(noise / mean_span)), 1), len(sentinels), n - noise)
    noise_lengths, kept_lengths = _segments(noise, spans, rng), _segments(n - noise, spans, rng)
    inp, tgt, at = [], [], 0
    for i, (kept, span) in enumerate(zip(kept_lengths, noise_lengths)):
        inp.extend(tokens[at:at + kept])
        inp.append(sentinels[i])
        tgt.append(sentinels[i])
        tgt.extend(tokens[at + kept:at + kept + span])
        at += kept + span
    if eos_id is not None:
        tgt.append(eos_id)
    return np.asarray(inp, dtype=np.int64), np.asarray(tgt, dtype=np.int64)


def _segments(total: int, pieces: int, rng) -> list[int]:
    """`total` items cut at random into `pieces` non-empty segments."""
    cuts = np.sort(rng.choice(np.arange(1, total), size=pieces - 1, replace=False)) if pieces > 1 else []
    return np.diff(np.concatenate([[0], cuts, [total]])).astype(int).tolist()


def document_positions(input_ids: torch.Tensor, eos_id: int) -> dict:
    """Position ids that restart after each EOS, and segment ids that number the documents.

    transformers' LLaMA-style models build the document mask from restarting position ids; the lab
    decoder reads the segment ids. The EOS belongs to the document it ends.
    """
    ends = (input_ids == eos_id).long()
    segment = torch.cumsum(ends, dim=1) - ends  # the EOS closes its own document
    start = torch.zeros_like(segment)
    start[:, 1:] = segment[:, 1:] != segment[:, :-1]
    index = torch.arange(input_ids.shape[1]).expand_as(input_ids)
    first = torch.cummax(torch.where(start.bool() | (index == 0), index, torch.zeros_like(index)), dim=1).values
    return {"position_ids": index - first, "segment_ids": segment}

