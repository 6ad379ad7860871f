"""llmlab's decoding loop: greedy, sampling, beam search, stop strings, streaming, over a KV cache."""

from llmlab.generation.generate import (Generation, SamplingConfig, cut_at_stop, decode, encode, eos_ids, generate,
                                        generate_batch, pad_id, unescape)

__all__ = ["Generation", "SamplingConfig", "cut_at_stop", "decode", "encode", "eos_ids", "generate", "generate_batch",
           "pad_id", "unescape"]
