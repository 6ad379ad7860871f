import random
import string

import numpy as np
import pytest

from llmlab.data.pipeline import make_step
from llmlab.data.steps.base import StepLog
from llmlab.data.steps.substring import (SubstringDedupConfig, concatenate, dedup_substrings, duplicate_spans,
                                         repeated_mask, suffix_array)
from llmlab.errors import LlmlabError


def _naive_sa(s):
    s = list(s)
    return sorted(range(len(s)), key=lambda i: s[i:])


def _kasai(s, sa):
    """Kasai et al. 2001: LCP in O(n) from the suffix array and its inverse (the textbook oracle)."""
    n, rank, lcp, h = len(s), [0] * len(s), [0] * len(s), 0
    for i, p in enumerate(sa):
        rank[p] = i
    for i in range(n):
        if rank[i] == 0:
            h = 0
            continue
        j = sa[rank[i] - 1]
        while i + h < n and j + h < n and s[i + h] == s[j + h]:
            h += 1
        lcp[rank[i]] = h
        h = max(h - 1, 0)
    return lcp


@pytest.mark.parametrize("backend", ["numpy", "divsufsort"])
def test_suffix_array_and_lcp_equal_naive_sort_and_kasai(backend):
    rng = np.random.default_rng(0)
    for _ in range(300):
        s = rng.integers(0, rng.integers(1, 5), size=rng.integers(1, 80))
        sa, lcp = suffix_array(s, backend=backend)
        assert sa.tolist() == _naive_sa(s)
        assert lcp.tolist() == _kasai(s.tolist(), sa.tolist())
        _, capped = suffix_array(s, lcp_cap=4, backend=backend)
        assert (np.minimum(capped, 4) == np.minimum(lcp, 4)).all()
    text = np.frombuffer(b"mississippi banana bandana", dtype=np.uint8)
    sa, lcp = suffix_array(text, backend=backend)
    assert sa.tolist() == _naive_sa(text.tolist()) and lcp.tolist() == _kasai(text.tolist(), sa.tolist())


def test_divsufsort_gives_the_reference_arrays_on_a_corpus_with_separators_and_a_large_alphabet():
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, 50_000, size=rng.integers(50, 400)) for _ in range(40)]
    docs[7][10:90] = docs[3][:80]  # a planted repeat across documents
    s, _ = concatenate(docs)
    reference, fast = suffix_array(s, backend="numpy"), suffix_array(s, backend="divsufsort")
    assert (reference[0] == fast[0]).all() and (reference[1] == fast[1]).all()


def _random_text(rng, n):
    return "".join(rng.choice(string.ascii_lowercase + " ") for _ in range(n))


def test_planted_60_token_repeat_is_removed_and_40_token_repeat_kept():
    rng = random.Random(0)
    long, short = _random_text(rng, 60), _random_text(rng, 40)
    docs = [_random_text(rng, 100) + short + _random_text(rng, 100),
            _random_text(rng, 80) + long + _random_text(rng, 80),
            _random_text(rng, 70) + short + _random_text(rng, 70),
            _random_text(rng, 90) + long + _random_text(rng, 90)]
    masks = duplicate_spans([np.frombuffer(d.encode(), np.uint8) for d in docs], min_len=50)
    assert [int(m.sum()) for m in masks] == [0, 60, 0, 60]
    assert masks[1][80:140].all() and masks[3][90:150].all()       # exactly the planted span
    out = dedup_substrings(docs, SubstringDedupConfig(min_len=50))
    assert out[0] == docs[0] and out[2] == docs[2]
    assert out[1] == docs[1].replace(long, "") and out[3] == docs[3].replace(long, "")
    kept = dedup_substrings(docs, SubstringDedupConfig(min_len=50, keep_first=True))
    assert kept[:3] == docs[:3] and kept[3] == docs[3].replace(long, "")


def test_no_match_runs_across_documents():
    rng = random.Random(1)
    span = _random_text(rng, 60)
    docs = [_random_text(rng, 50) + span[:30], span[30:] + _random_text(rng, 50), _random_text(rng, 20) + span]
    s, starts = concatenate([np.frombuffer(d.encode(), np.uint8) for d in docs])
    assert starts.tolist() == [0, 81, 162] and s[80] == 0 and s[161] == 1   # distinct separators
    assert not repeated_mask(s, 50).any()
    assert repeated_mask(s, 30).sum() == 4 * 30                            # the halves do match


def test_step_strikes_spans_and_drops_documents_left_too_short():
    rng = random.Random(2)
    boiler = "Subscribe to our newsletter for the latest news and exclusive offers today!"
    docs = [{"id": "a", "text": _random_text(rng, 200) + boiler},
            {"id": "b", "text": boiler + " ok"},
            {"id": "c", "text": _random_text(rng, 150)}, {"id": "d", "text": "tiny"}]
    step, log = make_step("substring_dedup", {"min_len": 50, "min_chars": 10}), StepLog("substring_dedup")
    out = list(step.process(iter(docs), log))
    assert [d["id"] for d in out] == ["a", "c", "d"]                  # d was short already: not this step's call
    assert out[0]["text"] == docs[0]["text"][:200] and docs[0]["text"].endswith(boiler)  # input untouched
    assert log.drops == {"too_short_after_substring_dedup": 1}
    assert log.changes["chars_removed"] == 2 * len(boiler)


def test_tokenizer_tokens_and_offsets():
    rng = random.Random(3)
    span = " ".join(_random_text(rng, 8) for _ in range(12))
    docs = [_random_text(rng, 40) + span, "x" + span + " tail"]
    out = dedup_substrings(docs, SubstringDedupConfig(min_len=50, tokenizer="tiny-llama"))
    assert out == [docs[0][:40], "x tail"]


def test_bad_config():
    with pytest.raises(LlmlabError, match="min_len"):
        SubstringDedupConfig(min_len=1)
    with pytest.raises(LlmlabError, match="did you mean 'keep_first'"):
        make_step("substring_dedup", {"keep_frist": True})
