"""Save and load adapters in HF peft's on-disk format.

A folder with `adapter_config.json` and `adapter_model.safetensors`, tensor names as peft
writes them (`base_model.model.<module path>.lora_A.weight`, `prompt_embeddings`, …), so an
adapter trained here loads in peft and one trained with peft loads here. Methods peft lacks
(bottleneck adapters) use the same layout with an llmlab `peft_type`.
"""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from llmlab import methods
from llmlab.atomic import atomic_dir
from llmlab.config import build
from llmlab.errors import LlmlabError
from llmlab.peft.base import AdapterLayer, adapter_method, adapter_modules, mark_trainable, set_adapter

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."


def adapter_state(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Adapter `name`'s tensors, named as peft names them."""
    state = {}
    for path, module in adapter_modules(model):
        if name not in module.adapters:
            continue
        if isinstance(module, AdapterLayer):
            ours = module.adapters[name].state_dict()
            for key, theirs in module.peft_keys.items():
                state[f"{PREFIX}{peft_path(path)}.{theirs}"] = ours[key]
        else:
            state.update(module.peft_state(name))
    return state


def peft_method(name: str):
    """The save/load record (`base.Method`) of a fine-tuning method, from its file."""
    return methods.attribute("finetune", name, "method")


def peft_path(path: str) -> str:
    """The layer's name without the `base_layer` steps of adapters nested in one another (peft has one wrapper)."""
    return ".".join(part for part in path.split(".") if part != "base_layer")


def save_adapter(model: nn.Module, path: str | Path, name: str = "default"):
    """Write adapter `name` as a peft adapter folder (atomically: all of it or nothing)."""
    if not adapter_modules(model):
        raise LlmlabError("the model has no adapter to save (freeze and full fine-tuning train its own weights): "
                          "save the whole model with llmlab.models.save_model")
    method = peft_method(adapter_method(model, name))
    cfg = _adapter_config(model, name)
    fields = {"peft_type": method.peft_type or f"LLMLAB_{adapter_method(model, name).upper()}",
              "task_type": "CAUSAL_LM", "inference_mode": True,
              "base_model_name_or_path": getattr(model.config, "_name_or_path", None) or None,
              **(method.to_peft(cfg, model) if method.to_peft else {"llmlab_config": vars(cfg)})}
    tensors = {k: v.detach().contiguous().cpu() for k, v in adapter_state(model, name).items()}
    with atomic_dir(path) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(fields, indent=2, sort_keys=True) + "\n")
        save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt"})


def _adapter_config(model: nn.Module, name: str):
    for _, module in adapter_modules(model):
        if name in module.adapters:
            return module.adapters[name].cfg


def read_adapter_config(path: str | Path) -> dict:
    path = Path(path)
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise LlmlabError(f"{path} is not an adapter folder: {CONFIG_FILE} is missing")
    if not (path / WEIGHTS_FILE).is_file():
        raise LlmlabError(f"{path} has no {WEIGHTS_FILE}; only safetensors adapters are loaded "
                          f"(pickled adapter_model.bin files are refused for safety)")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise LlmlabError(f"{config_file} is not valid JSON: {e}") from None


def config_from_peft(fields: dict):
    """(method name, llmlab Config) for a peft adapter_config.json."""
    peft_type = fields.get("peft_type", "")
    for name, method in ((n, peft_method(n)) for n in methods.names("finetune")):
        if peft_type == f"LLMLAB_{name.upper()}":
            return name, build(method.config, fields.get("llmlab_config", {}), "llmlab_config")
        if method.peft_type == peft_type and method.from_peft:
            cfg = method.from_peft(fields)
            if cfg is not None:
                return name, cfg
    known = sorted({m.peft_type for m in map(peft_method, methods.names("finetune")) if m.peft_type})
    raise LlmlabError(f"adapter type '{peft_type}' is not supported; llmlab reads {', '.join(known)}")


def load_adapter(model: nn.Module, path: str | Path, name: str = "default",
                 trainable: bool = False) -> nn.Module:
    """Add the adapter at `path` to `model` under `name` and make it the active one."""
    fields = read_adapter_config(path)
    method_name, cfg = config_from_peft(fields)
    peft_method(method_name).apply(model, cfg, name)
    for _, module in adapter_modules(model):
        if name in module.adapters and hasattr(module, "bake"):
            module.bake(name)  # files hold the derived prompt (peft's inference form), not its encoder
    _fill(model, name, load_file(Path(path) / WEIGHTS_FILE), Path(path))
    set_adapter(model, name)
    if trainable:
        mark_trainable(model, name)
    else:
        for _, module in adapter_modules(model):
            if name in module.adapters:
                module.adapters[name].requires_grad_(False)
    return model


def load_adapters(model: nn.Module, specs: list[str]) -> list[str]:
    """Load several adapters onto one base: each spec is PATH or NAME=PATH; the first ends up active."""
    names = []
    for spec in specs:
        name, _, path = spec.rpartition("=")
        name = name or ("default" if not names else Path(path).name)
        if name in names or name == "base":
            raise LlmlabError(f"adapter name '{name}' is {'reserved' if name == 'base' else 'used twice'}; "
                              f"name them NAME=PATH")
        load_adapter(model, path, name)
        names.append(name)
    if names:
        set_adapter(model, names[0])
    return names


def _fill(model: nn.Module, name: str, tensors: dict[str, torch.Tensor], path: Path):
    """Copy the file's tensors into the freshly made adapter, checking names and shapes."""
    expected = adapter_state(model, name)
    missing = [k for k in expected if k not in tensors]
    extra = [k for k in tensors if k not in expected]
    if missing or extra:
        which = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        raise LlmlabError(f"adapter {path} does not fit this model ({which}; "
                          f"{len(missing)} missing, {len(extra)} unexpected tensors): "
                          f"it was made for a different base model or method")
    for key, target in expected.items():
        if tensors[key].shape != target.shape:
            raise LlmlabError(f"adapter {path} was made for a different base model: {key} has shape "
                              f"{tuple(tensors[key].shape)} in the file but {tuple(target.shape)} here")
        with torch.no_grad():
            target.copy_(tensors[key])  # state_dict tensors share storage with the parameters
