"""Find the transformer blocks of any decoder-only transformers model."""

from torch import nn


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder blocks, in order.

    Rather than a table of attribute paths per architecture (`model.layers`, `transformer.h`,
    `decoder.layers`, `gpt_neox.layers`, …), look for the ModuleList whose length is the
    config's layer count and whose items share one class: that is the stack in every
    LLaMA/Qwen2/Mistral/GPT-2/OPT/GPT-NeoX-style model, and in new architectures too.
    """
    n_layers = _num_layers(model)
    for _, module in model.named_modules():
        if (isinstance(module, nn.ModuleList) and len(module) == n_layers and n_layers > 0
                and len({type(m) for m in module}) == 1):
            return module
    raise ValueError(f"could not find the {n_layers} decoder layers of {type(model).__name__}")


def _num_layers(model: nn.Module) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    raise ValueError(f"{type(model).__name__}'s config does not say how many layers it has")
