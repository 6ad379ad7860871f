"""`llmlab merge`: fold a trained adapter into its base model and save a plain model.

For LoRA the merged weight is W' = W + (α / r) · B A (Hu et al. 2021, https://arxiv.org/abs/2106.09685,
§4.1): the merged model runs at the base model's speed and loads anywhere transformers does.
"""

import dataclasses
from pathlib import Path

import yaml

from llmlab.config import field
from llmlab.errors import LlmlabError
from llmlab.models import load_model, save_model
from llmlab.peft import load_adapter, merge_and_unload
from llmlab.runs import RunOptions, start_run


@dataclasses.dataclass
class MergeConfig:
    adapter: str = field("", help="adapter folder (HF PEFT format) or the finetune run folder holding adapter/")
    model: str = field("", help="base model the adapter was trained on (default: that finetune run's --model)")
    dtype: str = field("fp32", help="fp32, bf16 or fp16")
    device: str = field("cpu", help="cpu, cuda or auto")


def adapter_folder(spec: str) -> Path:
    path = Path(spec)
    for folder in (path, path / "adapter"):
        if (folder / "adapter_config.json").is_file():
            return folder
    if not path.exists():
        raise LlmlabError(f"adapter not found: {spec}")
    raise LlmlabError(f"{spec} holds no adapter (no adapter_config.json in it or in {path / 'adapter'})")


def base_model_of(adapter: Path) -> str:
    """The --model of the finetune run that wrote `adapter`, read from the run's config.yaml."""
    config = adapter.parent / "config.yaml"
    model = yaml.safe_load(config.read_text(encoding="utf-8")).get("model") if config.is_file() else None
    if not model:
        raise LlmlabError(f"merge needs the base model: --model NAME (none recorded beside {adapter})")
    return model


def merge_verb(cfg: MergeConfig, opts: RunOptions) -> dict:
    if not cfg.adapter:
        raise LlmlabError("merge needs an adapter: --adapter FOLDER (or a finetune run folder)")
    folder = adapter_folder(cfg.adapter)
    base = cfg.model or base_model_of(folder)
    model, tokenizer = load_model(base, dtype=cfg.dtype, device=cfg.device)
    model = merge_and_unload(load_adapter(model, folder))
    with start_run("merge", dataclasses.replace(cfg, model=base), opts) as run:
        out = save_model(model, tokenizer, run.path / "model")
        summary = run.finish({"model": base, "adapter": str(folder), "saved": str(out)})
    print(f"merged {folder} into {base} -> {out}")
    return summary
