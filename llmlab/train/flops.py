"""Model FLOPs utilisation: the training FLOPs a model needs per token, over what the hardware can do.

Per token, a decoder's forward and backward take (PaLM, Chowdhery et al. 2022, appendix B)

    6·N + 12·L·H·Q·T      N non-embedding parameters active per token (for MoE: the router and k
                          experts, not all N), L layers, H heads of width Q, T the context

and MFU = tokens/s × that ÷ peak FLOP/s. The peak is measured, not taken from a data sheet: the
best of a few large square matmuls in the training dtype on this device, so a CPU's AVX2/AVX-512
/AMX path and a GPU's tensor cores are each judged against what they really reach.
"""

import time

import torch


def active_parameters(model) -> int:
    """Parameters a token passes through, without the embedding tables (lookups, not matmuls)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    total = sum(p.numel() for p in model.parameters() if id(p) not in embeddings)
    config = model.config
    experts = getattr(config, "num_experts", 0)
    if experts:  # only k of the N experts work on each token
        expert = sum(p.numel() for n, p in model.named_parameters() if ".experts.0." in n)
        total -= expert * (experts - config.num_experts_per_tok)
    head = model.get_output_embeddings()
    if head is not None and id(head.weight) in embeddings:  # a tied head is a matmul all the same
        total += head.weight.numel()
    return total


def flops_per_token(model, seq_len: int) -> float:
    c = model.config
    layers, heads = c.num_hidden_layers, c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    return 6 * active_parameters(model) + 12 * layers * heads * head_dim * seq_len


def matmul_peak(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", size: int = 2048,
                repeats: int = 5) -> float:
    """The best FLOP/s of `repeats` size×size matmuls in `dtype` on `device`."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    best = float("inf")
    for _ in range(repeats + 1):  # the first warms the kernels up
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
