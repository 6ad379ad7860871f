"""The classes an llmlab-only packed folder's `auto_map` names, so that transformers' own loader
(`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`) gets the model llmlab
builds, instead of a model of the base architecture with random weights where the packed ones are.
"""

from pathlib import Path

from transformers import PretrainedConfig, PreTrainedModel

from llmlab.models.packed.ecosystem import PACKED_TYPE
from llmlab.models.packed.io import load_quantized


class LlmlabPackedConfig(PretrainedConfig):
    """The folder's config as written: the real model type is in `llmlab_model_type`."""
    model_type = PACKED_TYPE


class LlmlabPackedForCausalLM(PreTrainedModel):
    config_class = LlmlabPackedConfig

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, dtype=None, torch_dtype=None, **kwargs):
        """The model llmlab loads from the folder: the base architecture with its packed layers swapped in."""
        dtype = dtype or torch_dtype
        model, _ = load_quantized(Path(pretrained_model_name_or_path), "fp32" if dtype in (None, "auto") else dtype)
        return model
