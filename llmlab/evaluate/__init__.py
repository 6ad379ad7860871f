"""Evaluation: perplexity now; benchmarks, reports and the arena as the stage grows."""
