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
