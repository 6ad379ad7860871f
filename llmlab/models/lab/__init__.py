"""llmlab's configurable decoder (the architecture lab), registered with transformers' Auto classes."""

from llmlab.models.lab.config import LabConfig
from llmlab.models.lab.modeling import LabForCausalLM, LabModel

__all__ = ["LabConfig", "LabForCausalLM", "LabModel"]
