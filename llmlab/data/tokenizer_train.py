"""Train a tokenizer on a corpus: byte-level BPE, WordPiece, Unigram or characters, with HF `tokenizers`.

- Byte-level BPE — R. Sennrich, B. Haddow, A. Birch, "Neural Machine Translation of Rare Words
  with Subword Units", ACL 2016, https://arxiv.org/abs/1508.07909, over bytes as in GPT-2
  (Radford et al. 2019): start from the 256 bytes and repeatedly merge the most frequent
  adjacent pair, (a, b) = argmax count(a b), until the vocabulary is full. No unknown tokens.
- WordPiece — Y. Wu et al., "Google's Neural Machine Translation System", 2016,
  https://arxiv.org/abs/1609.08144 (as in BERT): merges chosen by count(ab) / (count(a)·count(b));
  continuation pieces carry a `##` prefix; CJK characters are split apart first, as BERT does
  (so decoding puts spaces between them), and the alphabet keeps the vocab_size/4 most frequent
  characters (the rest become <unk>). Unigram keeps every character: its vocab_size must exceed
  the corpus's number of distinct characters (thousands, for Chinese).
- Unigram — T. Kudo, "Subword Regularization", ACL 2018, https://arxiv.org/abs/1804.10959
  (SentencePiece): a unigram LM over pieces, P(x) = Π p(x_i), pruned from a large seed vocabulary
  by how much each piece's removal lowers the corpus likelihood.
- Characters — one token per character seen in the corpus (nanoGPT's shakespeare_char: 65 tokens
  for Tiny Shakespeare), for the small character-level models of pretraining recipes.

The result is saved as a transformers tokenizer folder (tokenizer.json, tokenizer_config.json),
loadable with `AutoTokenizer.from_pretrained(folder)` and so by `llmlab data pack` and the
model loaders. The first special token is the end-of-text token (EOS, padding, the packing
separator); `<|im_start|>`/`<|im_end|>` among the specials add llmlab's ChatML template.

Compression is reported as bytes per token, Σ|utf8(x)| / Σ|tokens(x)| over held-out text, per
language: a tokenizer trained on English alone spends about one token per byte on Chinese.
"""

import sys
from importlib import resources
from itertools import islice
from typing import Iterable, Iterator

from llmlab.data.readers import InputConfig, plan_shards, read_shard
from llmlab.errors import LlmlabError
from llmlab.runs import format_table

KINDS = ("bpe", "wordpiece", "unigram", "chars")
UNK = "<unk>"


def iter_texts(cfg: InputConfig, limit: int | None = None) -> Iterator[str]:
    """The texts of the documents the pipeline's readers find for `cfg` (files, globs, pipeline output)."""
    from collections import Counter

    stats = Counter()
    docs = (doc["text"] for shard in plan_shards(cfg) for doc in read_shard(shard, cfg, stats))
    yield from islice(docs, limit)


def _components(kind: str, vocab_size: int, specials: list[str], min_frequency: int):
    """(model, normalizer, pre-tokenizer, decoder, trainer) of one tokenizer kind."""
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

    bar = sys.stderr.isatty()  # the trainers' own progress bars, on a terminal only
    if kind == "bpe":
        return (models.BPE(), None, pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel(),
                trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=bar))
    if kind == "wordpiece":
        return (models.WordPiece(unk_token=UNK),
                normalizers.BertNormalizer(lowercase=False, strip_accents=False, handle_chinese_chars=True),
                pre_tokenizers.BertPreTokenizer(), decoders.WordPiece(),
                trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                          limit_alphabet=max(100, vocab_size // 4), show_progress=bar))
    return (models.Unigram(), normalizers.NFKC(), pre_tokenizers.Metaspace(), decoders.Metaspace(),
            trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials, unk_token=UNK,
                                    show_progress=bar))


def train_tokenizer(texts: Iterable[str], kind: str = "bpe", vocab_size: int = 8000,
                    special_tokens: list[str] | None = None, min_frequency: int = 2):
    """A transformers PreTrainedTokenizerFast of `kind`, trained on `texts`."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    if kind not in KINDS:
        raise LlmlabError(f"unknown tokenizer kind '{kind}'; choose from {', '.join(KINDS)}")
    specials = list(special_tokens or ["<|endoftext|>"])
    if kind != "bpe" and UNK not in specials:  # WordPiece and Unigram need a token for unseen characters
        specials.append(UNK)
    if kind == "chars":
        return _char_tokenizer(texts, specials)
    model, normalizer, pre_tokenizer, decoder, trainer = _components(kind, vocab_size, specials, min_frequency)
    tok = Tokenizer(model)
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer, tok.decoder = pre_tokenizer, decoder
    try:
        tok.train_from_iterator(texts, trainer=trainer)
    except Exception as e:  # the Rust trainer raises a bare Exception, e.g. Unigram with too small a vocabulary
        raise LlmlabError(f"training the {kind} tokenizer failed: {e}"
                          + ("; raise --vocab-size above the corpus's number of distinct characters"
                             if "not large enough" in str(e) else "")) from None
    chat = "<|im_start|>" in specials and "<|im_end|>" in specials
    template = resources.files("llmlab.models").joinpath("chatml.txt").read_text() if chat else None
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=specials[0], pad_token=specials[0],
                                   unk_token=UNK if kind != "bpe" else None, chat_template=template)


def _char_tokenizer(texts: Iterable[str], specials: list[str]):
    """Specials, then every distinct character in sorted order; characters never seen map to <unk>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = set()
    for text in texts:
        chars.update(text)
    vocab = {token: i for i, token in enumerate([*specials, *sorted(chars - set(specials))])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")  # every character its own piece
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=specials[0], pad_token=specials[0], unk_token=UNK)


def bytes_per_token(tokenizer, texts: list[str]) -> float:
    """Σ UTF-8 bytes / Σ tokens (no special tokens) over `texts`: higher is better compression."""
    texts = [t for t in texts if t]
    n_tokens = sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else 0
    if n_tokens == 0:
        raise LlmlabError("bytes_per_token: the held-out texts are empty")
    return sum(len(t.encode("utf-8")) for t in texts) / n_tokens


def compression_table(tokenizers: dict, heldout: dict[str, list[str]]) -> tuple[str, dict]:
    """A printed table of bytes per token (rows: held-out sets, columns: tokenizers) and its numbers."""
    numbers = {name: {label: bytes_per_token(tok, texts) for label, texts in heldout.items()}
               for name, tok in tokenizers.items()}
    rows = [[label, sum(len(t.encode("utf-8")) for t in texts)] + [f"{numbers[n][label]:.3f}" for n in tokenizers]
            for label, texts in heldout.items()]
    return format_table(["held-out", "bytes", *[f"{n} bytes/token" for n in tokenizers]], rows), numbers


# ---- the `llmlab data tokenizer` verb ----


__all__ = ["KINDS", "iter_texts", "train_tokenizer", "bytes_per_token", "compression_table"]
