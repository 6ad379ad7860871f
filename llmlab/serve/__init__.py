"""Serving: llmlab's own decoding loop (greedy, sampling, beam search), the `generate` and `chat` verbs."""

from llmlab.serve.generate import GenerateConfig, SamplingConfig, generate

__all__ = ["GenerateConfig", "SamplingConfig", "generate"]
