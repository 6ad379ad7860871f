"""RTN: round-to-nearest weight quantization, the data-free baseline every other method is measured against.

Each weight is rounded to the nearest point of its group's uniform grid (see `models/packed/quant.py`):

    x_q = clamp(round(x / S) + Z, 0, 2^b − 1),    x̂ = S·(x_q − Z)

with S, Z from the group's min/max (asymmetric) or absmax (symmetric), per tensor, per output
channel or per group of input columns. No calibration data: RTN minimises each weight's own
rounding error, not the layer's output error (which GPTQ and AWQ do). It works well at 8 bits
and loses quality fast below 4 — see Dettmers & Zettlemoyer 2022, "The case for 4-bit precision:
k-bit Inference Scaling Laws", https://arxiv.org/abs/2212.09720, which uses it as the baseline.

Every linear layer inside the decoder layers is quantized; the embeddings never are, and lm_head
only when asked (`lm_head=True`): at batch 1 a small model's output layer (49152×576 in
smollm2-135m) is a fifth of the multiply-adds per token, so it caps the speed-up of the rest.
"""

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from llmlab.compress.calibrate import check_skip, layers_prefix, linears_of, skipped
from llmlab.config import field
from llmlab.errors import LlmlabError
from llmlab.models.layers import decoder_layers
from llmlab.models.packed.qlinear import QuantizedLinear, QuantLinear, quantized_linears
from llmlab.models.packed.quant import QuantSpec
from llmlab.models.surgery import set_module


@dataclass
class RTNConfig:
    bits: int = field(4, help="bits per weight, 2 to 8")
    group_size: int = field(128, help="input columns per quantization group; 0 per output channel, -1 per tensor")
    symmetric: bool = field(False, help="symmetric grid (zero point in the middle) instead of min/max")
    skip: list[str] = field([], help="regexes of full module names to leave in float")
    lm_head: bool = field(False, help="also quantize the output layer, with the same grid (unties it from the "
                                      "input embedding, which stays float)")

    def __post_init__(self):
        self.spec  # validates bits and group_size
        check_skip(self.skip)

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.group_size, self.symmetric)


@torch.no_grad()
def quantize_rtn(model, calib=None, cfg: RTNConfig | None = None):
    """Quantize the decoder layers' linears of `model` in place by round-to-nearest; returns the model.

    `calib` is ignored (RTN needs no data); it is there so every method has one signature.
    """
    cfg = cfg or RTNConfig()
    targets = rtn_targets(model, cfg)  # checked before anything changes
    for index, layer in enumerate(tqdm(decoder_layers(model), desc=f"rtn w{cfg.bits}", unit="layer",
                                       disable=None, leave=False)):
        for name in targets[index]:
            # One layer at a time, so the float weight it replaces is freed at once.
            set_module(layer, name, QuantLinear.from_float(layer.get_submodule(name), cfg.spec))
    if cfg.lm_head:
        model.set_output_embeddings(QuantLinear.from_float(model.get_output_embeddings(), cfg.spec))
        for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
            config.tie_word_embeddings = False  # a saved model must not tie the packed head to the embedding
    model.llmlab_quant_method = "rtn"
    return model


def rtn_targets(model, cfg) -> list[list[str]]:
    """For each decoder layer, the relative names of the linears to quantize.

    LlmlabError (nothing changed yet) for a layer that is already quantized, or a group size that
    does not divide a layer's input width. `cfg` is any method's config with `spec` and `skip`.
    """
    prefix, targets = layers_prefix(model), []
    for index, layer in enumerate(decoder_layers(model)):
        done = {n: m for n, m in quantized_linears(layer).items() if not skipped(f"{prefix}.{index}.{n}", cfg.skip)}
        if done:
            name, module = next(iter(done.items()))
            raise LlmlabError(f"{prefix}.{index}.{name} is already quantized ({module.kind}, "
                              f"{module.config()}); quantize the float model instead")
        names = [n for n in linears_of(layer) if not skipped(f"{prefix}.{index}.{n}", cfg.skip)]
        for name in names:
            cfg.spec.n_groups(layer.get_submodule(name).in_features, name=f"{prefix}.{index}.{name}")
        targets.append(names)
    if getattr(cfg, "lm_head", False):  # other methods pass their own configs, with spec and skip
        _check_head(model.get_output_embeddings(), cfg)
    return targets


def _check_head(head, cfg):
    if isinstance(head, QuantizedLinear):
        raise LlmlabError(f"the output layer is already quantized ({head.kind}, {head.config()}); "
                          "quantize the float model instead")
    if not isinstance(head, nn.Linear):
        raise LlmlabError(f"lm_head=true needs an nn.Linear output layer; this model's is {type(head).__name__}")
    cfg.spec.n_groups(head.in_features, name="the output layer (lm_head)")
