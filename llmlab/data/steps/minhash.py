"""Near-duplicate documents with MinHash-LSH: shingles → signatures → bands → union-find clusters.

A. Z. Broder, "On the resemblance and containment of documents" (1997),
https://doi.org/10.1109/SEQUEN.1997.666900, and the banding of Leskovec, Rajaraman & Ullman,
"Mining of Massive Datasets", ch. 3 (http://www.mmds.org), as in datatrove and text-dedup.

A document is its set S of shingles (word n-grams; Chinese and Japanese characters count as
words, so their shingles are character n-grams). For a random permutation π of shingle space,

    P[min π(S₁) = min π(S₂)] = |S₁ ∩ S₂| / |S₁ ∪ S₂| = J(S₁, S₂),

so the share of equal entries in two k-permutation signatures estimates the Jaccard similarity.
Permutations are universal hashes π_i(h) = (a_i·h + b_i) mod p, p = 2⁶¹ − 1, a_i ∈ [1, p),
b_i ∈ [0, p), over 32-bit shingle hashes h. The product is computed exactly in uint64 by
splitting a into 32-bit halves and folding with 2⁶¹ ≡ 1 (mod p) (datasketch lets a·h wrap
mod 2⁶⁴ instead). Signatures are computed for many documents at once: one (shingles ×
permutations) block at a time and a segmented minimum (np.minimum.reduceat) per document.

LSH splits the signature into b bands of r rows; two documents become candidates when all r
rows of some band agree, which happens with probability 1 − (1 − J^r)^b. Bands are hashed to
64-bit keys and grouped with one argsort per band (no Python dict of buckets). (b, r) is chosen
for the threshold t by minimising the weighted areas where that S-curve is wrong,

    w_fp·∫₀ᵗ 1 − (1 − s^r)^b ds  +  w_fn·∫ₜ¹ (1 − s^r)^b ds      over b·r ≤ k,

the same criterion as datasketch's MinHashLSH (w_fp = w_fn = 0.5 gives its bands × rows, 9 × 13
for t = 0.8 and k = 128). Candidate pairs are verified — by default with the exact Jaccard of
the two shingle sets, a second pass over only the candidates' texts that removes every false
positive, or by the signature estimate — joined with union-find, and each cluster keeps its first
document. Because exact verification makes false candidates cost only time, its default weights
are w_fp = 0.1, w_fn = 0.9 (14 × 9 for 0.8 / 128): pairs at J = 0.8 become candidates with
probability 0.87 instead of 0.40 (benchmarks/bench_minhash.py: recall 0.99 instead of 0.91,
precision 1.0, same speed).
"""

import hashlib
from dataclasses import dataclass
from typing import Iterator, Literal

import numpy as np

from llmlab.config import field
from llmlab.data.steps.base import Step, StepLog
from llmlab.data.steps.exact_dedup import normalize, words
from llmlab.errors import LlmlabError

MERSENNE = np.uint64((1 << 61) - 1)
LOW32, LOW29 = np.uint64((1 << 32) - 1), np.uint64((1 << 29) - 1)
CHUNK_SHINGLES = 1024     # shingles per (permutations × shingles) uint64 block: 1 MiB at 128, cache-sized
MAX_BUCKET_PAIRS = 1000   # buckets larger than this are joined as a star around their first member
_MIX = np.uint64(0xBF58476D1CE4E5B9)  # splitmix64 multipliers: spread combined hashes over all 64 bits
_MIX2 = np.uint64(0x94D049BB133111EB)


def _mix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, in place on a uint64 array: every input bit affects every output bit."""
    x ^= x >> np.uint64(30)
    x *= _MIX
    x ^= x >> np.uint64(27)
    x *= _MIX2
    x ^= x >> np.uint64(31)
    return x


def _mulmod(h: np.ndarray, a_hi: np.ndarray, a_lo: np.ndarray) -> np.ndarray:
    """A value ≡ a·h (mod p) below 2⁶² + 2³³, exactly, for h < 2³² and a = a_hi·2³² + a_lo < p.

    a·h = t·2³² + u with t = a_hi·h < 2⁶¹ and u = a_lo·h < 2⁶⁴, and since 2⁶¹ ≡ 1 (mod p):
    t·2³² ≡ (t >> 29) + (t mod 2²⁹)·2³², u ≡ (u >> 61) + (u & p). No product wraps in uint64.
    """
    t = h * a_hi
    u = h * a_lo
    x = t >> np.uint64(29)
    t &= LOW29
    t <<= np.uint64(32)
    x += t
    x += u >> np.uint64(61)
    u &= MERSENNE
    x += u
    return x


class Shingler:
    """32-bit hashes of a text's n-gram shingles, over word tokens or characters of the normalised text."""

    def __init__(self, ngram: int = 5, unit: str = "word"):
        self.ngram, self.unit = ngram, unit
        self.weights = _mix64(np.arange(1, ngram + 1, dtype=np.uint64) * _MIX2) | np.uint64(1)
        self._cache: dict[str, int] = {}  # token -> 64-bit hash; a corpus has far fewer tokens than shingles

    def tokens(self, text: str) -> list[str]:
        return words(text) if self.unit == "word" else list(normalize(text))

    def _hashes(self, tokens: list[str]) -> list[int]:
        hashes = list(map(self._cache.get, tokens))
        if None in hashes:
            if len(self._cache) > 2_000_000:
                self._cache.clear()
            for t in tokens:
                if t not in self._cache:
                    self._cache[t] = int.from_bytes(hashlib.blake2b(t.encode("utf-8"), digest_size=8).digest(), "little")
            hashes = list(map(self._cache.__getitem__, tokens))
        return hashes

    def batch(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(shingle hashes (S,) uint64 below 2³², shingles per text (N,)). A text shorter than n is one
        shingle (its tokens padded with zeros), so empty or short texts still get a signature."""
        n, flat, lengths = self.ngram, [], []
        if not texts:
            return np.empty(0, dtype=np.uint64), np.empty(0, dtype=np.int64)
        for text in texts:
            hashes = self._hashes(self.tokens(text))
            hashes += [0] * (n - len(hashes))  # no-op unless shorter than n
            flat += hashes
            lengths.append(len(hashes))
        tok = np.array(flat, dtype=np.uint64)                          # (T,)
        count = len(tok) - n + 1
        acc = tok[:count] * self.weights[0]
        for j in range(1, n):                                          # Σ_j w_j·hash(token_{i+j})
            acc += tok[j:j + count] * self.weights[j]
        lengths = np.array(lengths, dtype=np.int64)
        starts = np.cumsum(lengths) - lengths
        per_doc = lengths - n + 1
        # window i is a shingle of its own text when it starts no later than n tokens before the text's end
        owner = np.repeat(np.arange(len(texts)), lengths)[:count]
        valid = np.arange(count) - starts[owner] < per_doc[owner]
        return _mix64(acc[valid]) >> np.uint64(32), per_doc

    def jaccard(self, texts: list[str], pairs: np.ndarray) -> np.ndarray:
        """(E,) exact Jaccard of the pairs' shingle-hash sets: the second pass that verifies LSH candidates."""
        docs = np.unique(pairs)
        hashes, per_doc = self.batch([texts[i] for i in docs.tolist()])
        sets = {d: np.unique(h) for d, h in zip(docs.tolist(), np.split(hashes, np.cumsum(per_doc)[:-1]))}
        out = np.empty(len(pairs))
        for e, (i, j) in enumerate(pairs.tolist()):
            common = len(np.intersect1d(sets[i], sets[j], assume_unique=True))
            out[e] = common / (len(sets[i]) + len(sets[j]) - common)
        return out


class MinHasher:
    """k universal-hash permutations; `signatures` gives (N, k) uint32 MinHash signatures."""

    def __init__(self, num_perm: int = 128, seed: int = 1, ngram: int = 5, unit: str = "word"):
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, MERSENNE, size=num_perm, dtype=np.uint64)   # (k,) a ∈ [1, p)
        self.b = rng.integers(0, MERSENNE, size=num_perm, dtype=np.uint64)   # (k,) b ∈ [0, p)
        self.a_hi, self.a_lo = self.a >> np.uint64(32), self.a & LOW32   # a = a_hi·2³² + a_lo, a_hi < 2²⁹
        self.shingler = Shingler(ngram, unit)

    def from_hashes(self, hashes: np.ndarray, per_doc: np.ndarray) -> np.ndarray:
        """Signatures (N, k) uint32 of documents whose shingle hashes lie consecutively in `hashes`."""
        starts = np.cumsum(per_doc) - per_doc                               # (N,) first shingle of each
        owner = np.repeat(np.arange(len(per_doc)), per_doc)                 # (S,) document of each shingle
        out = np.full((len(self.a), len(per_doc)), np.iinfo(np.uint64).max, dtype=np.uint64)   # (k, N)
        a_hi, a_lo, b = self.a_hi[:, None], self.a_lo[:, None], self.b[:, None]
        for lo in range(0, len(hashes), CHUNK_SHINGLES):  # fixed-size blocks, so one long text cannot blow up
            hi = min(lo + CHUNK_SHINGLES, len(hashes))
            x = _mulmod(hashes[None, lo:hi], a_hi, a_lo) + b               # (k, s) < 2⁶³, shingles contiguous
            x = (x & MERSENNE) + (x >> np.uint64(61))                     # ≡ a·h + b (mod p), < p + 4
            docs = np.arange(owner[lo], owner[hi - 1] + 1)                  # every document has ≥ 1 shingle
            part = np.minimum.reduceat(x, np.maximum(starts[docs], lo) - lo, axis=1)
            out[:, docs] = np.minimum(out[:, docs], part)                 # documents cut by a block edge
        return out.T.astype(np.uint32)  # the low 32 bits of each minimum, as datasketch keeps them

    def signatures(self, texts: list[str], batch: int = 4096) -> np.ndarray:
        parts = [self.from_hashes(*self.shingler.batch(texts[i:i + batch])) for i in range(0, len(texts), batch)]
        return np.concatenate(parts) if parts else np.empty((0, len(self.a)), dtype=np.uint32)


def lsh_params(threshold: float, num_perm: int, fp_weight: float = 0.5, fn_weight: float = 0.5,
               grid: int = 2001) -> tuple[int, int]:
    """(bands, rows) minimising fp_weight·P(false positive area) + fn_weight·P(false negative area)."""
    s = np.linspace(0.0, 1.0, grid)
    below, above = s <= threshold, s >= threshold
    best, best_err = (1, 1), np.inf
    for b in range(1, num_perm + 1):
        r = np.arange(1, num_perm // b + 1)[:, None]                  # (R, 1)
        p_candidate = 1.0 - (1.0 - s[None, :] ** r) ** b              # (R, grid): the S-curve
        fp = np.trapezoid(np.where(below, p_candidate, 0.0), s, axis=1)
        fn = np.trapezoid(np.where(above, 1.0 - p_candidate, 0.0), s, axis=1)
        err = fp_weight * fp + fn_weight * fn
        i = int(np.argmin(err))
        if err[i] < best_err:
            best, best_err = (b, i + 1), err[i]
    return best


class UnionFind:
    """Disjoint sets over 0..n-1 with path halving and union by size."""

    def __init__(self, n: int):
        self.parent = list(range(n))
        self.size = [1] * n

    def find(self, x: int) -> int:
        parent = self.parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(self, x: int, y: int) -> int:
        x, y = self.find(x), self.find(y)
        if x == y:
            return x
        if self.size[x] < self.size[y]:
            x, y = y, x
        self.parent[y] = x
        self.size[x] += self.size[y]
        return x

    def roots(self) -> np.ndarray:
        return np.array([self.find(i) for i in range(len(self.parent))], dtype=np.int64)


def band_keys(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(N, bands) uint64: one hash of each band's `rows` signature values (equal bands, equal keys)."""
    n = len(sig)
    block = sig[:, :bands * rows].reshape(n, bands, rows)              # (N, b, r)
    weights = _mix64(np.arange(1, rows + 1, dtype=np.uint64)) | np.uint64(1)
    keys = np.zeros((n, bands), dtype=np.uint64)
    for j in range(rows):
        keys += block[:, :, j].astype(np.uint64) * weights[j]
    return _mix64(keys)


def candidate_pairs(keys: np.ndarray) -> np.ndarray:
    """(E, 2) int64 pairs i < j of documents that share a bucket in at least one band, without repeats."""
    n = len(keys)
    found = [np.empty((0, 2), dtype=np.int64)]
    for band in keys.T:
        order = np.argsort(band, kind="stable")                       # equal keys keep document order
        edge = np.flatnonzero(np.diff(band[order])) + 1
        starts = np.concatenate([[0], edge])
        sizes = np.diff(np.concatenate([starts, [n]]))
        for size in np.unique(sizes[sizes > 1]):
            members = order[starts[sizes == size][:, None] + np.arange(size)]   # (buckets, size)
            if size > MAX_BUCKET_PAIRS:  # all pairs would be quadratic: join the bucket as a star instead
                i, j = np.zeros(size - 1, dtype=np.int64), np.arange(1, size)
            else:
                i, j = np.triu_indices(size, 1)
            found.append(np.stack([members[:, i].ravel(), members[:, j].ravel()], axis=1))
    pairs = np.concatenate(found)
    codes = np.unique(pairs[:, 0] * n + pairs[:, 1])
    return np.stack([codes // n, codes % n], axis=1) if len(codes) else np.empty((0, 2), dtype=np.int64)


def estimated_jaccard(sig: np.ndarray, pairs: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """(E,) share of equal signature entries of each pair: the MinHash estimate of J."""
    out = np.empty(len(pairs))
    for lo in range(0, len(pairs), chunk):
        i, j = pairs[lo:lo + chunk, 0], pairs[lo:lo + chunk, 1]
        out[lo:lo + chunk] = (sig[i] == sig[j]).mean(axis=1)
    return out


def cluster_first(n: int, pairs: np.ndarray) -> np.ndarray:
    """(n,) for each document the first document of its cluster (itself when it is the first)."""
    uf = UnionFind(n)
    for i, j in pairs.tolist():
        uf.union(i, j)
    roots = uf.roots()
    first = np.full(n, n, dtype=np.int64)
    np.minimum.at(first, roots, np.arange(n))
    return first[roots]


@dataclass
class MinhashDedupConfig:
    threshold: float = field(0.8, help="Jaccard similarity of shingle sets above which documents are near-duplicates")
    num_perm: int = field(128, help="permutations: the signature length")
    ngram: int = field(5, help="tokens per shingle")
    unit: Literal["word", "char"] = field("word", help="shingle words (CJK characters count as words) or characters")
    bands: int | None = field(None, help="LSH bands; default: derived from threshold and num_perm")
    rows: int | None = field(None, help="rows per band; default: derived from threshold and num_perm")
    fp_weight: float | None = field(None, help="weight of false positives (false negatives: 1 − it) when deriving "
                                               "bands and rows; default 0.1 with exact verification, else 0.5")
    verify: Literal["exact", "estimate", "none"] = field(
        "exact", help="join candidate pairs whose Jaccard reaches the threshold: exact (shingle sets of the pair), "
                      "estimate (signature agreement), or none (every LSH candidate)")
    seed: int = field(1, help="seed of the permutations")

    def __post_init__(self):
        if not 0 < self.threshold <= 1:
            raise LlmlabError(f"minhash_dedup.threshold must be in (0, 1], got {self.threshold}")
        for key in ("num_perm", "ngram"):
            if getattr(self, key) < 1:
                raise LlmlabError(f"minhash_dedup.{key} must be at least 1, got {getattr(self, key)}")
        if (self.bands is None) != (self.rows is None):
            raise LlmlabError("minhash_dedup: give both bands and rows, or neither to derive them from the threshold")
        if self.bands is not None and (self.bands < 1 or self.rows < 1 or self.bands * self.rows > self.num_perm):
            raise LlmlabError(f"minhash_dedup: bands × rows must be between 1 and num_perm ({self.num_perm}), "
                              f"got {self.bands} × {self.rows}")
        if self.fp_weight is None:  # exact verification removes false candidates, so favour recall
            self.fp_weight = 0.1 if self.verify == "exact" else 0.5
        if not 0 <= self.fp_weight <= 1:
            raise LlmlabError(f"minhash_dedup.fp_weight must be in [0, 1], got {self.fp_weight}")
        if self.bands is None:
            self.bands, self.rows = lsh_params(self.threshold, self.num_perm, self.fp_weight, 1 - self.fp_weight)


def near_duplicate_pairs(texts: list[str], cfg: MinhashDedupConfig | None = None) -> np.ndarray:
    """(E, 2) pairs i < j of texts joined as near-duplicates: LSH candidates, verified as cfg.verify says."""
    cfg = cfg or MinhashDedupConfig()
    hasher = MinHasher(cfg.num_perm, cfg.seed, cfg.ngram, cfg.unit)
    sig = hasher.signatures(texts)
    pairs = candidate_pairs(band_keys(sig, cfg.bands, cfg.rows))
    if cfg.verify == "estimate" and len(pairs):
        pairs = pairs[estimated_jaccard(sig, pairs) >= cfg.threshold]
    elif cfg.verify == "exact" and len(pairs):
        pairs = pairs[hasher.shingler.jaccard(texts, pairs) >= cfg.threshold]
    return pairs


def minhash_duplicates(texts: list[str], cfg: MinhashDedupConfig | None = None) -> np.ndarray:
    """(n,) for each text the index of the first text of its near-duplicate cluster."""
    return cluster_first(len(texts), near_duplicate_pairs(texts, cfg))


class MinhashDedup(Step):
    """Keep the first document of each MinHash-LSH near-duplicate cluster."""
    name = "minhash_dedup"
    Config = MinhashDedupConfig
    global_ = True

    def process(self, docs: Iterator[dict], log: StepLog) -> Iterator[dict]:
        docs = list(docs)  # a global step: every signature is needed before the first decision
        first = minhash_duplicates([d["text"] for d in docs], self.cfg)
        for i, doc in enumerate(docs):
            if first[i] == i:
                yield doc
            else:
                log.drop({**doc, "duplicate_of": docs[first[i]].get("id")}, "near_duplicate")


__all__ = ["Shingler", "MinHasher", "lsh_params", "UnionFind", "band_keys", "candidate_pairs",
           "estimated_jaccard", "cluster_first", "MinhashDedupConfig", "near_duplicate_pairs",
           "minhash_duplicates", "MinhashDedup"]
