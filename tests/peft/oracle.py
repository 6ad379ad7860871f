"""Round trips through HF peft, the oracle for adapter parity tests."""

import torch

from llmlab.models import load_model

IDS = torch.tensor([[5, 17, 99, 3, 250, 64, 7, 31], [8, 8, 120, 42, 19, 200, 11, 2]])


def fresh(spec: str = "tiny-llama"):
    torch.manual_seed(0)  # tiny models are random: the same seed gives the same base model
    model, _ = load_model(spec)
    return model.eval()


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def randomize(model, names=("A", "B", "magnitude", "scale", "ia3_l")):
    """Give every adapter parameter random values, so parity is not checked at an identity init."""
    from llmlab.peft.base import adapter_modules

    torch.manual_seed(1)
    for _, module in adapter_modules(model):
        for _, p in module.adapters.named_parameters():
            with torch.no_grad():
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if p.ndim == 1 else 0.0))


def peft_logits(adapter_dir, spec: str = "tiny-llama", ids=IDS) -> torch.Tensor:
    from peft import PeftModel

    model = PeftModel.from_pretrained(fresh(spec), str(adapter_dir))
    return logits(model.eval(), ids)


def peft_save(peft_config, out_dir, spec: str = "tiny-llama"):
    """Make an adapter with peft (random, not identity, weights) and save it; returns peft's logits."""
    from peft import get_peft_model

    torch.manual_seed(2)
    model = get_peft_model(fresh(spec), peft_config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if p.ndim == 1 else 0.0))
    model.save_pretrained(str(out_dir))
    return logits(model.eval())


def lively(model):
    """Larger random weights: tiny models at their 0.02-std init repeat the last token, so greedy
    generation would agree whatever the adapter did."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 2 / p.shape[1] ** 0.5)
    return model


def hf_generate(model, prompts: list[list[int]], n: int) -> list[list[int]]:
    """transformers' greedy `generate` (on a PeftModel: peft's) for a left-padded batch; new ids up to EOS."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False)
    eos = model.generation_config.eos_token_id
    return [row[:row.index(eos)] if eos in row else row for row in out[:, width:].tolist()]


def stepwise_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding of one prompt by a whole forward pass per token, no KV cache: the model's own
    logits decide, whatever a generate loop does with caches. New ids up to EOS."""
    ids, eos = list(prompt), model.generation_config.eos_token_id
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
            if ids[-1] == eos:
                return ids[len(prompt):-1]
    return ids[len(prompt):]


def llmlab_generate(model, prompts: list[list[int]], n: int) -> list[list[int]]:
    """llmlab's greedy decoding loop over a left-padded batch; new ids up to EOS."""
    from llmlab.generation.generate import SamplingConfig, decode

    return decode(model, prompts, SamplingConfig(max_new_tokens=n), [model.generation_config.eos_token_id], 0)
