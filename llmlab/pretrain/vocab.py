"""Vocabulary extension: add a new language's pieces to a model's tokenizer, then continue pretraining.

The Chinese-LLaMA-Alpaca recipe (Cui et al. 2023, https://arxiv.org/abs/2304.08177): LLaMA's
tokenizer spends one to three byte tokens per Chinese character, so the authors trained a Chinese
tokenizer, merged its new pieces into LLaMA's, resized the embeddings and continued pretraining.

    new = pieces of the language tokenizer (whole characters, not in the base vocabulary)
    E[v] = mean_{u ∈ base_tokenize(v)} E[u]        for each new token v
           (the same for an untied output head)

Each new piece starts where the model already "thought" of its text, as the mean of the pieces the
old tokenizer would have used, so the extended model begins near the old one's predictions
instead of at random. The pieces are added to the fast tokenizer as tokens matched before its model
runs (leftmost-longest), which keeps every old id unchanged.
"""

import torch

from llmlab.errors import LlmlabError


def new_pieces(base, language, min_chars: int = 1, keep=None) -> list[str]:
    """The language tokenizer's pieces, as text, that the base tokenizer does not have as one token.

    Byte-level pieces that decode to part of a character (U+FFFD) are skipped; `keep(text)` filters further
    (e.g. only pieces with a Chinese character).
    """
    pieces = []
    for piece, _ in sorted(language.get_vocab().items(), key=lambda item: item[1]):
        if piece in language.all_special_tokens:
            continue
        text = language.convert_tokens_to_string([piece]).strip()
        if (len(text) < min_chars or "\ufffd" in text or (keep is not None and not keep(text))
                or len(base(text, add_special_tokens=False)["input_ids"]) == 1):
            continue
        pieces.append(text)
    return list(dict.fromkeys(pieces))  # unique, in the language tokenizer's order (frequent merges first)


def extend_vocabulary(model, tokenizer, pieces: list[str]) -> int:
    """Add `pieces` to `tokenizer`, grow the model's embeddings (and untied head) and initialise each new row as
    the mean of the rows of the pieces the old tokenizer splits it into. Returns how many tokens were added."""
    if not pieces:
        raise LlmlabError("no new pieces to add: the language tokenizer has nothing the base tokenizer lacks")
    old_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in pieces]
    before = len(tokenizer)
    if tokenizer.add_tokens(pieces) == 0:
        return 0
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings()
    untied = head is not None and head.weight is not embedding
    with torch.no_grad():
        for piece, ids in zip(pieces, old_ids):
            new = tokenizer.convert_tokens_to_ids(piece)
            if new >= before:  # a piece the tokenizer already had as an added token keeps its row
                embedding[new] = embedding[ids].mean(0)
                if untied:
                    head.weight[new] = head.weight[ids].mean(0)
    return len(tokenizer) - before


# CJK ideographs (and extension A), CJK punctuation, full-width forms
CJK = [("\u4e00", "\u9fff"), ("\u3400", "\u4dbf"), ("\u3000", "\u303f"), ("\uff00", "\uffef")]


def is_chinese(text: str) -> bool:
    """At least one CJK unified ideograph, and nothing but CJK characters and punctuation."""
    return any("\u4e00" <= c <= "\u9fff" for c in text) and all(any(a <= c <= b for a, b in CJK) for c in text)


def tokens_per_char(tokenizer, texts: list[str]) -> float:
    """Σ tokens / Σ characters over `texts` (no special tokens)."""
    chars = sum(len(t) for t in texts)
    tokens = sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
    return tokens / max(chars, 1)
