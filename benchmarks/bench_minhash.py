"""MinHash-LSH near-duplicate detection: llmlab vs datasketch's MinHashLSH on the same corpus, in one run.

    .venv/bin/python benchmarks/bench_minhash.py [--docs 20000] [--planted 2000] [--lang en|zh] [--quick]

Corpus: alpaca outputs (../shared/data; alpaca_zh for --lang zh) of at least 20 tokens, plus
planted near-duplicates: copies of random documents with random token substitutions made
until their shingle-set Jaccard reaches a drawn target in [0.5, 1.0], appended after all
originals. Both methods see the same shingles (word 5-grams of llmlab's tokens; CJK characters
are tokens), the same threshold (0.8) and permutations (128), and derive the same bands × rows.

Ground truth is the exact Jaccard of shingle sets. A pair is a true duplicate when J ≥ threshold;
the positives are the planted pairs with J ≥ threshold plus every pair either method reports
whose J ≥ threshold (natural near-duplicates in alpaca), the usual pooled evaluation. Reported:
pair precision and recall, recall of planted pairs by Jaccard bucket, and documents per second
end to end (shingling + signatures + index + query; for llmlab also verification and clustering),
by wall clock and by CPU time of this process (the fairer figure on a machine shared with other jobs).
datasketch runs its fastest documented path: MinHash.bulk (permutations drawn once) and an
insertion session. Rows "none" report LSH candidate pairs as they are; "estimate" rows keep the
pairs whose signature estimate reaches the threshold (datasketch: MinHash.jaccard); "exact" rows
keep those whose exact shingle-set Jaccard does. "fp=0.5" rows use datasketch's bands × rows;
llmlab's default (exact verification) weights false positives 0.1 when choosing them, for more
candidates, which exact verification can afford. Figures are means over several permutation
seeds, because one seed's precision and recall vary by about ±1 %.
"""

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np

from llmlab.data.steps.exact_dedup import words
from llmlab.data.steps.minhash import MinhashDedupConfig, cluster_first, lsh_params, near_duplicate_pairs

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
NGRAM, NUM_PERM, THRESHOLD = 5, 128, 0.8
EDGES = [0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.01]  # buckets of planted pairs by true Jaccard


def shingles(tokens: list[str]) -> set[str]:
    return {" ".join(tokens[i:i + NGRAM]) for i in range(max(1, len(tokens) - NGRAM + 1))}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b)


def load_corpus(lang: str, n_docs: int) -> list[str]:
    if lang == "en":
        rows = json.loads((DATA / "alpaca" / "alpaca_data.json").read_text(encoding="utf-8"))
    else:
        rows = [r for p in sorted((DATA / "alpaca_zh").glob("*.json")) for r in json.loads(p.read_text(encoding="utf-8"))]
    texts = [r["output"] for r in rows if len(words(r["output"])) >= 20]
    return texts[:n_docs]


def plant(texts: list[str], n: int, sep: str = " ", seed: int = 0) -> tuple[list[str], list[tuple[int, int, float]]]:
    """Variants of n random documents, edited by random token substitutions down to a drawn Jaccard;
    (texts + variants, [(source, variant, true Jaccard of the texts as written)])."""
    rng = random.Random(seed)
    vocab = sorted({t for text in texts[:2000] for t in words(text)})
    out, truth = list(texts), []
    for src in rng.sample(range(len(texts)), n):
        tokens = words(texts[src])
        base, target, edited = shingles(tokens), rng.uniform(0.5, 1.0), list(tokens)
        while True:
            trial = list(edited)
            trial[rng.randrange(len(trial))] = rng.choice(vocab)
            if jaccard(base, shingles(trial)) < target:
                break
            edited = trial
        out.append(sep.join(edited))  # Chinese is written without spaces (sep ""), which can join Latin tokens:
        truth.append((src, len(out) - 1, jaccard(base, shingles(words(out[-1])))))  # so J is of the text as written
    return out, truth


def _clock() -> np.ndarray:
    """(wall, CPU) seconds: CPU time is the fairer measure on a machine shared with other jobs."""
    return np.array([time.perf_counter(), time.process_time()])


def run_llmlab(texts: list[str], verify: str, fp_weight: float | None, seed: int) -> tuple[set, np.ndarray]:
    start = _clock()
    cfg = MinhashDedupConfig(threshold=THRESHOLD, num_perm=NUM_PERM, ngram=NGRAM, verify=verify,
                             fp_weight=fp_weight, seed=seed)
    pairs = near_duplicate_pairs(texts, cfg)
    cluster_first(len(texts), pairs)  # the dedup decision, included in the time
    return set(map(tuple, pairs.tolist())), _clock() - start


def run_datasketch(texts: list[str], verify: str, seed: int) -> tuple[set, np.ndarray, tuple[int, int]]:
    from datasketch import MinHash, MinHashLSH

    start = _clock()
    sets = [[s.encode("utf-8") for s in shingles(words(t))] for t in texts]
    sketches = MinHash.bulk(sets, num_perm=NUM_PERM, seed=seed)
    lsh = MinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM)
    with lsh.insertion_session() as session:
        for i, m in enumerate(sketches):
            session.insert(i, m)
    pairs = set()
    for i, m in enumerate(sketches):
        for j in lsh.query(m):
            if j != i and (verify == "none" or m.jaccard(sketches[j]) >= THRESHOLD):
                pairs.add((min(i, j), max(i, j)))
    return pairs, _clock() - start, (lsh.b, lsh.r)


def evaluate(found: dict[str, set], sets: list[set], truth: list[tuple[int, int, float]]) -> dict:
    """Pair precision/recall against planted pairs ∪ every reported pair with J ≥ threshold."""
    cache = {}

    def true_j(pair):
        if pair not in cache:
            cache[pair] = jaccard(sets[pair[0]], sets[pair[1]])
        return cache[pair]

    positives = {(s, v) for s, v, j in truth if j >= THRESHOLD}
    positives |= {p for pairs in found.values() for p in pairs if true_j(p) >= THRESHOLD}
    scores = {}
    for name, pairs in found.items():
        hits = sum(true_j(p) >= THRESHOLD for p in pairs)
        bucket = np.digitize([j for _, _, j in truth], EDGES) - 1
        buckets = {lo: np.mean([(s, v) in pairs for (s, v, _), b in zip(truth, bucket) if b == k] or [np.nan])
                   for k, lo in enumerate(EDGES[:-1])}
        scores[name] = {"pairs": len(pairs), "precision": hits / max(1, len(pairs)),
                        "recall": len(pairs & positives) / max(1, len(positives)), "buckets": buckets}
    return scores


# (method, verification, fp weight of the bands × rows choice: 0.5 is datasketch's, None llmlab's default)
RUNS = [("datasketch", "none", 0.5), ("llmlab", "none", 0.5), ("datasketch", "estimate", 0.5),
        ("llmlab", "estimate", 0.5), ("llmlab", "exact", 0.5), ("llmlab", "exact", None)]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=20000)
    parser.add_argument("--planted", type=int, default=2000)
    parser.add_argument("--lang", choices=["en", "zh"], default="en")
    parser.add_argument("--seeds", type=int, default=3, help="permutation seeds; figures are their means")
    parser.add_argument("--quick", action="store_true", help="3000 documents, 300 planted, one seed")
    args = parser.parse_args()
    if args.quick:
        args.docs, args.planted, args.seeds = 3000, 300, 1
    texts, truth = plant(load_corpus(args.lang, args.docs), args.planted, " " if args.lang == "en" else "")
    sets = [shingles(words(t)) for t in texts]
    names = {run: f"{run[0]} {run[1]}" + (" (default)" if run[2] is None else "")
             + (" fp=0.5" if run[0] == "llmlab" and run[2] else "") for run in RUNS}
    results = {name: [] for name in names.values()}
    for seed in range(1, args.seeds + 1):
        found, seconds = {}, {}
        for run in RUNS:
            (method, verify, fp), name = run, names[run]
            if method == "datasketch":
                found[name], seconds[name], (b, r) = run_datasketch(texts, verify, seed)
            else:
                found[name], seconds[name] = run_llmlab(texts, verify, fp, seed)
        for name, score in evaluate(found, sets, truth).items():
            results[name].append({**score, "seconds": seconds[name]})
    report(results, len(texts), args, (b, r))


def report(results: dict, n: int, args, bands_rows: tuple[int, int]):
    mean = {name: {k: np.mean([r[k] for r in runs], axis=0) for k in ("pairs", "precision", "recall", "seconds")}
            for name, runs in results.items()}
    print(f"\n{n} documents ({args.lang}: {n - args.planted} alpaca outputs + {args.planted} planted), word {NGRAM}-grams, "
          f"threshold {THRESHOLD}, {NUM_PERM} permutations, bands x rows = {bands_rows[0]} x {bands_rows[1]}, "
          f"means over {args.seeds} permutation seed(s)")
    print(f"{'':<26}{'pairs':>8}{'precision':>11}{'recall':>8}{'docs/s':>9}{'CPU docs/s':>12}{'seconds':>9}")
    for name, m in mean.items():
        wall, cpu = m["seconds"]
        print(f"{name:<26}{m['pairs']:>8.0f}{m['precision']:>11.4f}{m['recall']:>8.4f}"
              f"{n / wall:>9.0f}{n / cpu:>12.0f}{wall:>9.2f}")
    print("\nrecall of planted pairs by true Jaccard (bucket start):")
    print(f"{'':<26}" + "".join(f"{lo:>7.2f}" for lo in EDGES[:-1]))
    for name, runs in results.items():
        print(f"{name:<26}" + "".join(f"{np.nanmean([r['buckets'][lo] for r in runs]):>7.3f}" for lo in EDGES[:-1]))
    for verify in ("none", "estimate"):
        wall, cpu = mean[f"datasketch {verify}"]["seconds"] / mean[f"llmlab {verify} fp=0.5"]["seconds"]
        print(f"llmlab / datasketch docs/s (verify {verify}, same bands x rows): {wall:.2f}x wall, {cpu:.2f}x CPU")
    wall, cpu = mean["datasketch estimate"]["seconds"] / mean["llmlab exact (default)"]["seconds"]
    print(f"llmlab default / datasketch estimate docs/s: {wall:.2f}x wall, {cpu:.2f}x CPU")
    print("fp=0.5: bands x rows = %d x %d as datasketch's; llmlab default (exact verification, fp weight 0.1): "
          "%d x %d" % (*lsh_params(THRESHOLD, NUM_PERM), *lsh_params(THRESHOLD, NUM_PERM, 0.1, 0.9)))


if __name__ == "__main__":
    main()
