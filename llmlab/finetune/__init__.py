"""Supervised fine-tuning: SFT data (formats, chat templates, response-only labels, packing), the
`finetune` verb over any `llmlab.peft` method or full fine-tuning, and `merge`."""

from llmlab.finetune.data import FORMATS, SFTData, collate, load_sft_data
from llmlab.finetune.packing import pack, packing_mode

__all__ = ["FORMATS", "SFTData", "collate", "load_sft_data", "pack", "packing_mode"]
