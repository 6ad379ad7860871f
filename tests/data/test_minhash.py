import random

import numpy as np
import pytest

from llmlab.data.pipeline import make_step
from llmlab.data.steps import minhash
from llmlab.data.steps.base import StepLog
from llmlab.data.steps.minhash import (MinhashDedupConfig, MinHasher, Shingler, UnionFind, cluster_first, lsh_params,
                                       minhash_duplicates, near_duplicate_pairs)
from llmlab.errors import LlmlabError

VOCAB = [f"w{i}" for i in range(3000)]


def _doc(rng, n=120):
    return [rng.choice(VOCAB) for _ in range(n)]


def _edit(rng, words, p):
    return [rng.choice(VOCAB) if rng.random() < p else w for w in words]


def _jaccard(a, b):
    return len(a & b) / len(a | b)


def test_signature_agreement_estimates_jaccard():
    rng, hasher = random.Random(0), MinHasher(num_perm=256, seed=3)
    errors = []
    for p in [0.0, 0.02, 0.05, 0.1, 0.2, 0.4]:
        for _ in range(4):
            a = _doc(rng)
            b = _edit(rng, a, p)
            hashes, per_doc = hasher.shingler.batch([" ".join(a), " ".join(b)])
            true = _jaccard(set(hashes[:per_doc[0]].tolist()), set(hashes[per_doc[0]:].tolist()))
            sig = hasher.from_hashes(hashes, per_doc)
            est = (sig[0] == sig[1]).mean()
            sd = np.sqrt(true * (1 - true) / 256)
            assert abs(est - true) <= 4 * sd + 1e-9, (p, true, est)
            errors.append(est - true)
    assert abs(np.mean(errors)) < 0.015  # unbiased
    assert np.mean(np.abs(errors)) < 0.03


def test_shingle_hashes_are_those_of_the_word_ngrams():
    shingler = Shingler(ngram=3)
    a, b = "one two three four five", "zero one two three four"
    ha, _ = shingler.batch([a])
    hb, _ = shingler.batch([b])
    assert len(set(ha.tolist()) & set(hb.tolist())) == 2           # "one two three", "two three four"
    hashes, per_doc = shingler.batch([a, "", "tiny", b])            # batched = one at a time
    assert per_doc.tolist() == [3, 1, 1, 3]
    assert hashes[:3].tolist() == ha.tolist() and hashes[-3:].tolist() == hb.tolist()
    assert hashes.max() < 2**32
    zh, per = shingler.batch(["我们今天去公园"])                      # CJK characters are tokens
    assert per.tolist() == [5]
    chars, per = Shingler(ngram=3, unit="char").batch(["Ab  c!"])    # normalised "ab c!": 3 char trigrams
    assert per.tolist() == [3] and len(set(chars.tolist())) == 3


def test_blocks_cut_inside_documents_give_the_same_signatures(monkeypatch):
    rng = random.Random(1)
    texts = [" ".join(_doc(rng, rng.randint(1, 60))) for _ in range(30)]
    whole = MinHasher(64).signatures(texts)
    monkeypatch.setattr(minhash, "CHUNK_SHINGLES", 7)
    assert (MinHasher(64).signatures(texts) == whole).all()


def test_bands_and_rows_match_datasketch():
    from datasketch.lsh import _optimal_param

    assert lsh_params(0.8, 128) == _optimal_param(0.8, 128, 0.5, 0.5) == (9, 13)
    for threshold, num_perm, fp in [(0.5, 64, 0.5), (0.9, 32, 0.5), (0.7, 64, 0.9)]:
        assert lsh_params(threshold, num_perm, fp, 1 - fp) == _optimal_param(threshold, num_perm, fp, 1 - fp)


def test_near_duplicates_are_found_and_distinct_documents_kept():
    rng = random.Random(2)
    originals = [_doc(rng, 250) for _ in range(60)]
    texts = [" ".join(d) for d in originals]
    near = {}
    for k in range(0, 60, 3):                       # one edited word in 250: J ≈ 0.96, P(candidate) > 0.999
        words = list(originals[k])
        words[rng.randrange(len(words))] = "EDITED"
        near[len(texts)] = k
        texts.append(" ".join(words))
    for k in range(1, 60, 6):                       # 40 % of words replaced: J ≈ 0.03
        texts.append(" ".join(_edit(rng, originals[k], 0.4)))
    first = minhash_duplicates(texts, MinhashDedupConfig(threshold=0.8))
    assert {i: int(first[i]) for i in near} == near
    assert all(first[i] == i for i in range(len(texts)) if i not in near)


def test_verification_modes():
    rng = random.Random(5)
    base = _doc(rng, 100)
    texts = [" ".join(base)] + [" ".join(_edit(rng, base, p)) for p in (0.005, 0.01, 0.02, 0.03, 0.04, 0.06)]
    shingler = Shingler()
    sets = [{tuple(t.split()[i:i + 5]) for i in range(len(t.split()) - 4)} for t in texts]   # word 5-grams
    loose = dict(threshold=0.8, bands=16, rows=4)                   # many candidates, on purpose
    none = near_duplicate_pairs(texts, MinhashDedupConfig(verify="none", **loose))
    exact = near_duplicate_pairs(texts, MinhashDedupConfig(verify="exact", **loose))
    estimate = near_duplicate_pairs(texts, MinhashDedupConfig(verify="estimate", **loose))
    true = {(i, j): _jaccard(sets[i], sets[j]) for i, j in none.tolist()}
    assert min(true.values()) < 0.8 <= max(true.values())           # candidates on both sides of t
    assert set(map(tuple, exact.tolist())) == {p for p, j in true.items() if j >= 0.8}
    assert set(map(tuple, estimate.tolist())) <= set(true)
    assert np.allclose(shingler.jaccard(texts, none), list(true.values()))


def test_chinese_near_duplicates():
    a = "今天天气很好，我们一起去公园散步，看到了很多美丽的花，还有一些小朋友在草地上放风筝，大家都很开心。"
    b = a.replace("美丽", "漂亮")
    c = "机器学习是人工智能的一个分支，它使计算机能够从数据中学习规律，而不需要明确的编程指令。"
    assert minhash_duplicates([a, c, b], MinhashDedupConfig(threshold=0.5, ngram=3)).tolist() == [0, 1, 0]


def test_union_find_is_transitive():
    uf = UnionFind(6)
    uf.union(0, 1)
    uf.union(2, 1)
    uf.union(4, 5)
    assert uf.find(0) == uf.find(2) != uf.find(3)
    assert cluster_first(7, np.array([[1, 2], [3, 2], [5, 6]])).tolist() == [0, 1, 1, 1, 4, 5, 5]
    # a chain A ~ B ~ C is one cluster even where A and C are below the threshold
    rng = random.Random(3)
    a = _doc(rng, 200)
    b, c = list(a), list(a)
    b[20:30] = ["X"] * 10
    c[20:30], c[120:130] = ["X"] * 10, ["Y"] * 10
    first = minhash_duplicates([" ".join(a), " ".join(b), " ".join(c)], MinhashDedupConfig(threshold=0.75))
    assert first.tolist() == [0, 0, 0]


def test_step_drops_near_duplicates_with_the_kept_id():
    rng = random.Random(4)
    words = _doc(rng)
    docs = [{"id": "a", "text": " ".join(words)}, {"id": "b", "text": " ".join(_doc(rng))},
            {"id": "c", "text": " ".join(words) + " extra"}]
    step, log = make_step("minhash_dedup", {"threshold": 0.8}), StepLog("minhash_dedup")
    assert step.global_ and (step.cfg.bands, step.cfg.rows) == (14, 9)     # fp weight 0.1: exact verification
    assert (MinhashDedupConfig(verify="estimate").bands, MinhashDedupConfig(verify="estimate").rows) == (9, 13)
    assert [d["id"] for d in step.process(iter(docs), log)] == ["a", "b"]
    assert log.drops == {"near_duplicate": 1}
    assert log.samples["near_duplicate"][0]["duplicate_of"] == "a"


def test_bad_config():
    with pytest.raises(LlmlabError, match="both bands and rows"):
        MinhashDedupConfig(bands=8)
    with pytest.raises(LlmlabError, match="bands × rows"):
        MinhashDedupConfig(num_perm=64, bands=8, rows=9)
    with pytest.raises(LlmlabError, match="threshold"):
        make_step("minhash_dedup", {"threshold": 1.5})
    with pytest.raises(LlmlabError, match="fp_weight"):
        MinhashDedupConfig(fp_weight=1.5)
    with pytest.raises(LlmlabError, match="did you mean 'num_perm'"):
        make_step("minhash_dedup", {"num_perms": 64})
