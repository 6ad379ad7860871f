"""Suffix array + LCP for substring de-duplication: pydivsufsort (the default) vs llmlab's numpy prefix
doubling (the reference), on the same byte corpus, in one run.

    .venv/bin/python benchmarks/bench_substring.py [--mb 2.9] [--repeats 3]

Corpus: public-domain books from ../shared/data/long_docs, as UTF-8 bytes, cut to --mb megabytes,
split into documents of 20 kB and concatenated with a separator per document exactly as the
`substring_dedup` step does. Both backends must return identical SA and LCP (checked); reported:
best wall-clock seconds of --repeats runs, and the peak of memory numpy and the C library allocate
(tracemalloc sees numpy's buffers; pydivsufsort allocates its arrays through numpy too).
"""

import argparse
import time
import tracemalloc
from pathlib import Path

import numpy as np

from llmlab.data.steps.substring import concatenate, suffix_array

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "long_docs"


def corpus(mb: float) -> np.ndarray:
    raw = b"".join(p.read_bytes() for p in sorted(DATA.glob("*.txt")))[: int(mb * 2 ** 20)]
    docs = [np.frombuffer(raw[i:i + 20_000], dtype=np.uint8) for i in range(0, len(raw), 20_000)]
    return concatenate(docs)[0]


def measure(seq: np.ndarray, backend: str, repeats: int) -> tuple[float, float, tuple]:
    best, peak, out = float("inf"), 0.0, None
    for _ in range(repeats):
        tracemalloc.start()
        start = time.perf_counter()
        out = suffix_array(seq, backend=backend)
        best = min(best, time.perf_counter() - start)
        peak = max(peak, tracemalloc.get_traced_memory()[1] / 2 ** 20)
        tracemalloc.stop()
    return best, peak, out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=2.9)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    seq = corpus(args.mb)
    print(f"corpus: {len(seq):,} symbols ({args.mb} MB of text)")
    rows = {backend: measure(seq, backend, args.repeats) for backend in ("numpy", "divsufsort")}
    (sa0, lcp0), (sa1, lcp1) = rows["numpy"][2], rows["divsufsort"][2]
    assert np.array_equal(sa0, sa1) and np.array_equal(lcp0, lcp1), "the backends disagree"
    print("| backend | seconds | peak MiB | vs numpy |\n|---|---|---|---|")
    for backend, (seconds, peak, _) in rows.items():
        print(f"| {backend} | {seconds:.2f} | {peak:.0f} | {rows['numpy'][0] / seconds:.1f}x |")
    print("SA and LCP identical: yes")


if __name__ == "__main__":
    main()
