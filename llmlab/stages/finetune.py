"""`llmlab finetune`: supervised fine-tuning on instruction or chat data, full or parameter-efficient.

The method is a config choice (`--method lora|…|full`), not a second script: `llmlab.peft` swaps
the model's modules and marks what trains, and `llmlab.train.fit` trains whatever requires grad
against the SFT loss, the mean negative log-likelihood of the reply tokens:

    L(θ) = − Σ_i Σ_{t ∈ reply_i} log p_θ(x_{i,t} | x_{i,<t}) / Σ_i |reply_i|

The run folder gets the adapter in HF PEFT's format (`<run>/adapter/`), or for full and freeze
fine-tuning the whole model (`<run>/model/`, which `load_model(<run>)` finds), next to
config.yaml, metrics.jsonl, summary.json and the checkpoints that `--resume` continues from.

`--quantize nf4` quantizes the frozen base before the adapters go on: QLoRA (Dettmers et al. 2023,
https://arxiv.org/abs/2305.14314), LoRA trained through an NF4 base computing in bf16. Any
calibration-free method of `llmlab quantize` works the same way (`--quantize rtn --quant.bits 4`);
for a GPTQ/AWQ base, quantize first and pass the quantized folder as --model.
"""

import dataclasses
import functools
import logging
from typing import Any

from llmlab import methods
from llmlab.compress import quantize_model
from llmlab.compress.quantize import get_method
from llmlab.config import build, field
from llmlab.data.packing import collate, packing_mode
from llmlab.data.sft import FORMATS, TEMPLATES, load_sft_data
from llmlab.errors import LlmlabError
from llmlab.models import save_model
from llmlab.models.load import ModelOptions
from llmlab.peft import apply_method, print_trainable_parameters, save_adapter, trainable_parameters
from llmlab.runs import RunOptions, start_run
from llmlab.train import TrainConfig, fit, resume_source, seed_everything
from llmlab.train.losses import sft_loss  # the module docstring's loss
from llmlab.train.loop import frozen_linears_to_bf16

log = logging.getLogger("llmlab")

# methods that change the base weights: the run saves the model, not an adapter
WHOLE_MODEL = tuple(n for n in methods.names("finetune") if methods.entry("finetune", n).extra.get("whole_model"))


@dataclasses.dataclass
class FinetuneConfig(ModelOptions):
    data: str = field("", help="training rows: .jsonl, .json, .csv or .parquet file, or a hub dataset id")
    eval_data: str | None = field(None, help="held-out rows in a file of the same format")
    eval_fraction: float = field(0.0, help="hold out this fraction of --data for evaluation instead")
    format: str = field("auto", help="auto (from the first row's fields), alpaca, messages, sharegpt or text")
    template: str = field("auto", help="auto (the tokenizer's chat template) or alpaca (built-in prompt)")
    max_len: int = field(1024, help="tokens per example; longer ones are truncated (and counted)")
    packing: bool = field(False, help="pack several examples into each row of max_len tokens")
    method: str = field("lora", help=", ".join(methods.names("finetune")))
    adapter: dict[str, Any] = field({}, help="the method's options, e.g. --adapter.r 16 --adapter.alpha 32")
    quantize: str | None = field(None, help="quantize the frozen base before adding adapters: nf4 (QLoRA), or rtn "
                                            "with --quant.bits/--quant.group-size")
    quant: dict[str, Any] = field({}, help="the quantization method's options, e.g. --quant.bits 4 "
                                           "--quant.group-size 32")
    train: TrainConfig = field(default_factory=TrainConfig, help="the training loop")
    resume: bool = field(False, help="continue the run in --out from its last checkpoint")
    resume_from: str | None = field(None, help="continue from this checkpoint (or folder of checkpoints)")

    @staticmethod
    def more_help() -> str:
        """Each method's --adapter.* options, for `llmlab finetune --help`."""
        return "\n\n--adapter.* options of each --method:\n" + methods.options_help("finetune", "adapter.")

    def __post_init__(self):
        if self.format not in ("auto", *FORMATS):
            raise LlmlabError(f"unknown --format '{self.format}'; use auto, {', '.join(FORMATS)}")
        if self.template not in ("auto", *TEMPLATES):
            raise LlmlabError(f"unknown --template '{self.template}'; use auto or {', '.join(TEMPLATES)}")
        methods.check("finetune", self.method)
        cfg_cls, _, _ = methods.load("finetune", self.method)
        build(cfg_cls, self.adapter, "adapter")  # fail before loading anything
        if self.quantize is not None:
            _quant_config(self)
        if self.max_len < 2:
            raise LlmlabError(f"--max-len must be at least 2, got {self.max_len}")
        if not 0 <= self.eval_fraction < 1:
            raise LlmlabError(f"--eval-fraction must be in [0, 1), got {self.eval_fraction}")
        if self.eval_fraction and self.eval_data:
            raise LlmlabError("give --eval-data or --eval-fraction, not both")


def finetune(cfg: FinetuneConfig, opts: RunOptions) -> dict:
    if not cfg.data:
        raise LlmlabError("finetune needs training data: --data FILE (.jsonl, .json, .csv, .parquet) or a hub id")
    resume = resume_source(opts.out, cfg.resume, cfg.resume_from)
    model, tokenizer = cfg.load_model()
    data = load_sft_data(cfg.data, tokenizer, eval_data=cfg.eval_data, eval_fraction=cfg.eval_fraction,
                         fmt=cfg.format, template=cfg.template, max_len=cfg.max_len, packing=cfg.packing,
                         seed=cfg.train.seed)
    if cfg.quantize is not None:
        model = _quantize_base(model, cfg)
    seed_everything(cfg.train.seed)  # adapters start from random weights: the same seed, the same run
    model = apply_method(model, cfg.method, cfg.adapter, tokenizer=tokenizer)
    block_mask = cfg.packing and packing_mode(model) == "mask"  # probed in fp32, before any weight turns bf16
    if cfg.train.bf16 and cfg.method not in WHOLE_MODEL:
        frozen_linears_to_bf16(model)  # the same numbers under autocast; the run saves only the adapter
    print_trainable_parameters(model)
    trainable, total = trainable_parameters(model)
    batches = functools.partial(collate, pad_id=tokenizer.pad_token_id, block_mask=block_mask)
    with start_run("finetune", cfg, opts) as run:
        result = fit(model, sft_loss, data.train, cfg.train, collate=batches, eval_data=data.eval or None,
                     run=run, checkpoint_dir=run.path / "checkpoints", resume=resume)
        if cfg.method in WHOLE_MODEL:
            saved = save_model(model, tokenizer, run.path / "model")
        else:
            save_adapter(model, run.path / "adapter")
            saved = run.path / "adapter"
        summary = run.finish({
            "model": cfg.model, "method": cfg.method, "saved": str(saved), **result,
            "trainable_params": trainable, "total_params": total,
            "examples": data.stats["examples"], "eval_examples": data.stats["eval_examples"],
            "truncated_rows": data.stats["truncated"], "dropped_rows": data.stats["dropped"],
            "format": data.stats["format"]})
    losses = "".join(f", {key.replace('_', ' ')} {result[key]:.4f}" for key in ("train_loss", "eval_loss")
                     if result[key] is not None)
    print(f"fine-tuned {cfg.model} ({cfg.method}) for {result['steps']} steps{losses}, "
          f"{result['tokens_per_s']:,.0f} tokens/s -> {saved}")
    return summary


def _quant_config(cfg: FinetuneConfig):
    """The --quantize method's Config from --quant.*; LlmlabError for methods that cannot give a QLoRA base."""
    if cfg.method in WHOLE_MODEL:
        raise LlmlabError(f"--quantize freezes the base in low-bit form; --method {cfg.method} trains the base "
                          f"weights themselves: use an adapter method (lora, dora, ...)")
    config, _, needs_calib = get_method(cfg.quantize)
    if needs_calib:
        raise LlmlabError(f"--quantize {cfg.quantize} needs calibration data: run `llmlab quantize --method "
                          f"{cfg.quantize} ... --out DIR` first and fine-tune with --model DIR")
    return build(config, cfg.quant, "quant")


def _quantize_base(model, cfg: FinetuneConfig):
    """QLoRA's frozen base: the model's linears swapped for quantized ones before the adapters wrap them."""
    return quantize_model(model, cfg.quantize, None, **cfg.quant)


