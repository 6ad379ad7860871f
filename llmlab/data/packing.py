"""Packing: several examples in one row of `max_len` tokens, none attending to another.

Padding short examples to the longest in a batch wastes compute; packing fills each row with
whole examples instead ("Efficient Sequence Packing without Cross-contamination", Krell et al.
2021, https://arxiv.org/abs/2107.02027). Each example keeps its own positions, restarting at 0,
and may only attend within itself:

    mask[i, j] = (j ≤ i) ∧ (segment(i) = segment(j)),   segment(i) = #{k ≤ i : position_k = 0}

transformers builds exactly this mask from position ids that restart at 0 when no attention mask
is given (`masking_utils.find_packed_sequence_indices`, used by LLaMA, Qwen2, Mistral, GPT-2,
GPT-NeoX; flash-attention reads the same position ids). Models whose mask code ignores position
ids (OPT) get the mask built here as a 4D tensor; `packing_mode(model)` probes which one works.
"""

import torch

from llmlab.errors import LlmlabError

IGNORE = -100  # the label of positions that are not targets (prompt, padding): cross-entropy skips them


def pack(examples: list[dict], max_len: int) -> list[dict]:
    """Greedily fill rows of up to `max_len` tokens with whole examples, in order."""
    rows, row = [], None
    for ex in examples:
        n = len(ex["input_ids"])
        if row is None or len(row["input_ids"]) + n > max_len:
            row = {"input_ids": [], "labels": [], "position_ids": []}
            rows.append(row)
        row["input_ids"] += ex["input_ids"]
        row["labels"] += ex["labels"]  # each example's first label is already −100: it must not predict across
        row["position_ids"] += range(n)
    return rows


def block_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) boolean mask, True where query i may attend to key j (see the module docstring)."""
    segment = (position_ids == 0).cumsum(dim=1)  # (B, T)
    same = segment[:, :, None] == segment[:, None, :]  # (B, T, T)
    causal = torch.ones_like(same[0]).tril()  # (T, T)
    return (same & causal)[:, None]


def model_inputs(model, batch: dict) -> dict:
    """The keyword arguments of the forward pass for a collated batch."""
    kwargs = {"input_ids": batch["input_ids"], "use_cache": False}
    if "position_ids" in batch:
        kwargs["position_ids"] = batch["position_ids"]
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 4 and getattr(model.config, "_attn_implementation", "") == "eager":
        # eager attention adds the mask to its scores, so it needs 0 / −inf rather than True / False
        dtype = next(model.parameters()).dtype
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    if mask is not None:
        kwargs["attention_mask"] = mask
    return kwargs


@torch.no_grad()
def packing_mode(model) -> str:
    """"position_ids" if the model separates packed examples by their positions alone, else "mask".

    Probes with two short examples: their logits packed in one row must equal their logits alone.
    """
    device = next(model.parameters()).device
    a, b = [5, 6, 7, 8, 9], [20, 21, 22, 23]
    was_training = model.training
    model.eval()
    try:
        alone = torch.cat([model(input_ids=torch.tensor([x], device=device), use_cache=False).logits[0]
                           for x in (a, b)]).float()  # (9, V)
        packed = pack([{"input_ids": a, "labels": a}, {"input_ids": b, "labels": b}], len(a) + len(b))
        tol = 1e-4 if next(model.parameters()).dtype == torch.float32 else 2e-2
        for mode in ("position_ids", "mask"):
            batch = to_device(collate(packed, 0, block_mask=mode == "mask"), device)
            try:
                logits = model(**model_inputs(model, batch)).logits[0].float()
            except (LlmlabError, RuntimeError, ValueError):  # e.g. prefix tuning refuses a 4D mask
                continue
            if logits.shape == alone.shape and torch.allclose(logits, alone, atol=tol, rtol=tol):
                return mode
    finally:
        model.train(was_training)
    raise LlmlabError("--packing: this model (or fine-tuning method) cannot keep packed examples apart; "
                      "turn packing off")


def collate(examples: list[dict], pad_id: int, block_mask: bool = False) -> dict:
    """Right-padded (B, T) tensors. Unpacked rows get an attention mask; packed rows get position ids
    (their padding forms one more segment of its own) and, with `block_mask`, a 4D mask."""
    lengths = [len(e["input_ids"]) for e in examples]
    B, T = len(examples), max(lengths)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    for i, (e, n) in enumerate(zip(examples, lengths)):
        input_ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
    batch = {"input_ids": input_ids, "labels": labels, "num_tokens": sum(lengths)}
    if "position_ids" in examples[0]:
        position_ids = torch.stack([torch.tensor(e["position_ids"] + list(range(T - n)))
                                    for e, n in zip(examples, lengths)])  # (B, T)
        batch["position_ids"] = position_ids
        if block_mask:
            batch["attention_mask"] = block_causal_mask(position_ids)
    else:
        batch["attention_mask"] = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).long()
    return batch


def to_device(batch, device):
    if isinstance(batch, dict):
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    return batch.to(device) if torch.is_tensor(batch) else batch
