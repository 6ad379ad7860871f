"""CUDA paths: the same numbers on the GPU as on the CPU. Skipped on machines without one."""

import pytest
import torch

from llmlab.evaluate.perplexity import perplexity
from llmlab.generation.generate import SamplingConfig, generate
from llmlab.models import load_model

pytestmark = pytest.mark.gpu
TEXT = "The cat sat on the mat and looked at the dog. " * 20


def test_perplexity_on_cuda_equals_cpu():
    (cpu, tok), (gpu, _) = load_model("tiny-llama"), load_model("tiny-llama", device="cuda")
    a = perplexity(cpu, tok, TEXT, seq_len=64, progress=False)["ppl"]
    b = perplexity(gpu, tok, TEXT, seq_len=64, progress=False)["ppl"]
    assert b == pytest.approx(a, rel=1e-3)


def test_greedy_generation_on_cuda_equals_cpu():
    (cpu, tok), (gpu, _) = load_model("tiny-llama"), load_model("tiny-llama", device="cuda")
    cfg = SamplingConfig(max_new_tokens=16)
    assert generate(gpu, tok, ["hello", "a longer prompt"], cfg) == generate(cpu, tok, ["hello", "a longer prompt"], cfg)
    assert next(gpu.parameters()).device.type == "cuda" and torch.cuda.is_available()
