"""Pretraining objectives and data: span corruption against T5's layout, prefix rows, UL2's modes, document
positions, and the corpus/windows readers with their errors."""

import json

import numpy as np
import pytest
import torch

from llmlab.data.corpus import Corpus, Windows
from llmlab.data.packing import IGNORE
from llmlab.data.shards import pack_ids
from llmlab.errors import LlmlabError
from llmlab.models.tiny import byte_tokenizer
from llmlab.train.objectives import (SENTINELS, Collate, Seq2SeqCollate, document_positions, span_corrupt,
                                     special_tokens)

SENT = list(range(1000, 1100))


def undo(inp, tgt):
    """Put each sentinel's span back into the input: T5's corruption must be lossless."""
    spans, current = {}, None
    for t in tgt:
        if t in SENT:
            current = t
            spans[t] = []
        elif current is not None:
            spans[current].append(t)
    return [x for t in inp for x in (spans[t] if t in SENT else [t])]


def test_span_corruption_is_lossless_with_t5s_rate_and_span_length():
    rng = np.random.default_rng(0)
    noise, spans, n = 0, 0, 0
    for _ in range(200):
        window = rng.integers(0, 500, 128)
        inp, tgt = span_corrupt(window, rng, 3, 0.15, SENT, eos_id=None)
        assert undo(inp.tolist(), tgt.tolist()) == window.tolist()
        k = int(np.isin(inp, SENT).sum())
        assert np.isin(tgt, SENT).sum() == k and inp[-1] == SENT[k - 1]  # sentinels in order, one per span
        noise, spans, n = noise + len(tgt) - k, spans + k, n + 128
    assert noise / n == pytest.approx(0.15, abs=0.01)
    assert noise / spans == pytest.approx(3, abs=0.3)


def test_prefix_and_span_rows_mask_the_input_and_give_its_length():
    tok = byte_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": special_tokens("ul2")})
    window = np.arange(10, 75)
    prefix = Collate("prefix", tok, seed=1)([window, window + 1])
    k = int(prefix["prefix_lengths"][0])
    targets = prefix["targets"][0]
    assert 1 <= k < 64 and (targets[:k - 1] == IGNORE).all() and (targets[k - 1:] != IGNORE).all()
    assert torch.equal(prefix["input_ids"][0], torch.from_numpy(window[:-1]))
    span = Collate("span", tok, seed=1)([window])
    k = int(span["prefix_lengths"][0])
    ids = torch.cat([span["input_ids"][0], span["targets"][0, -1:]])
    sentinels = set(tok.convert_tokens_to_ids(SENTINELS))
    assert ids[k - 1].item() in sentinels and ids[k].item() == tok.convert_tokens_to_ids(SENTINELS[0])
    ul2 = Collate("ul2", tok, seed=3)([window + i for i in range(40)])
    modes = {tok.convert_tokens_to_ids(m) for m in ("[R]", "[S]", "[X]")}
    firsts = set(ul2["input_ids"][:, 0].tolist())
    assert firsts <= modes and len(firsts) == 3  # all three denoisers drawn over 40 rows
    again = Collate("ul2", tok, seed=3)([window + i for i in range(40)])
    assert torch.equal(ul2["input_ids"], again["input_ids"])  # the corruption is a function of (seed, tokens)


def test_the_encoder_decoder_batch_is_corrupted_input_and_span_targets():
    tok = byte_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": special_tokens("span")})
    sentinels = tok.convert_tokens_to_ids(SENTINELS)
    windows = [np.arange(10, 75), np.arange(100, 140)]
    batch = Seq2SeqCollate(tok, seed=2)(windows)
    for i, w in enumerate(windows):
        inp = batch["input_ids"][i][batch["attention_mask"][i]].tolist()
        tgt = [t for t in batch["labels"][i].tolist() if t != IGNORE]
        assert tgt[-1] == tok.eos_token_id
        spans, current = {}, None
        for t in tgt[:-1]:
            current = t if t in sentinels else current
            spans.setdefault(current, []) if t in sentinels else spans[current].append(t)
        assert [x for t in inp for x in (spans[t] if t in sentinels else [t])] == w.tolist()


def test_objectives_that_need_sentinels_refuse_a_tokenizer_without_them():
    with pytest.raises(LlmlabError, match="extra_id"):
        Collate("span", byte_tokenizer())


def test_document_positions_restart_after_each_eos():
    ids = torch.tensor([[5, 6, 0, 7, 8, 9, 0, 4]])
    out = document_positions(ids, eos_id=0)
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 0]]
    assert out["segment_ids"].tolist() == [[0, 0, 0, 1, 1, 1, 1, 2]]


def test_sequential_windows_tile_the_stream_and_random_ones_are_reproducible(tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("abcdefghij" * 20)
    corpus = Corpus.open(text, byte_tokenizer())
    assert len(corpus) == 201  # 200 bytes + EOS
    seq = Windows(corpus, 10)
    assert len(seq) == 20 and seq[1][0] == seq[0][-1]
    rand = Windows(corpus, 10, "random", seed=4, count=50)
    assert all(np.array_equal(rand[i], Windows(corpus, 10, "random", seed=4, count=50)[i]) for i in range(50))
    train, held = corpus.split(0.1)
    assert len(train) + len(held) == 201 and len(held) == 20


def test_shards_are_read_in_place_and_bad_ones_are_refused(tmp_path):
    pack_ids([[1, 2, 3] * 40, [4, 5] * 30], tmp_path / "ok", eos_id=0, vocab_size=300, shard_tokens=100)
    corpus = Corpus.open(tmp_path / "ok", byte_tokenizer())
    assert len(corpus) == 182 and isinstance(corpus.parts[0], np.memmap)
    pack_ids([[1, 299]], tmp_path / "big", eos_id=0, vocab_size=300)
    with pytest.raises(LlmlabError, match="outside the model's vocabulary of 200"):
        Corpus.open(tmp_path / "big", byte_tokenizer(), vocab_size=200)
    manifest = json.loads((tmp_path / "ok" / "manifest.json").read_text())
    (tmp_path / "ok" / "manifest.json").write_text(json.dumps({**manifest, "dtype": "uint32"}))
    with pytest.raises(LlmlabError, match="damaged or of another dtype"):
        Corpus.open(tmp_path / "ok", byte_tokenizer())
    (tmp_path / "short.txt").write_text("tiny")
    with pytest.raises(LlmlabError, match="one window"):
        Windows(Corpus.open(tmp_path / "short.txt", byte_tokenizer()), 64)
