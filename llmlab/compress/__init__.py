"""Model compression: one file per method, each a `<Method>Config` dataclass + `quantize_<method>`.

    model = quantize_rtn(model, None, RTNConfig(bits=4, group_size=128))
    model = quantize_model(model, "gptq", calib, bits=4, group_size=128)   # by name, options checked
    save_quantized(model, tokenizer, "out/w4g128")                         # load_model("out/w4g128") reads it

Quantized, low-rank and LoRC layers are modules of the packed-layer format (`llmlab.models.packed`)
swapped in for `nn.Linear`, so the other stages (generate, chat, eval ppl, finetune with LoRA) take
a compressed model as it is; this package holds only the methods' math. Methods are imported only
when asked for: `llmlab.methods` names where each one lives.
"""

from llmlab.compress.quantize import quantize_model
from llmlab.models.packed.io import load_quantized, save_quantized

__all__ = ["quantize_model", "save_quantized", "load_quantized"]
