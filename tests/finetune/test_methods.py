"""Every fine-tuning method in llmlab.methods trains through `llmlab finetune`, and what the run saves carries the learning.

The saved artifact (an adapter folder, or the whole model for freeze/full) is loaded afresh onto
the base model; its SFT loss on the training rows must be below the untrained model's.
"""

import json

import pytest
import torch

from llmlab import methods
from llmlab.config import build
from llmlab.data.packing import collate
from llmlab.data.sft import load_sft_data
from llmlab.models import load_model
from llmlab.peft import load_adapter
from llmlab.runs import RunOptions
from llmlab.stages.finetune import FinetuneConfig, finetune
from llmlab.train.losses import sft_loss

ROWS = [{"instruction": f"Spell {w} backwards", "input": "", "output": w[::-1]}
        for w in ["apple", "river", "stone", "cloud", "green", "table", "music", "light"]]
LR = {"full": 3e-3, "freeze": 3e-3, "prompt": 0.3, "ia3": 0.1, "ptuning2": 0.1}


@torch.no_grad()
def _loss(model, tokenizer, path) -> float:
    data = load_sft_data(str(path), tokenizer, max_len=128)
    loss, n = sft_loss(model.eval(), collate(data.train, tokenizer.pad_token_id))
    return loss.item() / n


@pytest.mark.parametrize("method", methods.names("finetune"))
def test_every_method_learns_and_its_saved_result_reloads(tmp_path, method):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    cfg = build(FinetuneConfig, {"model": "tiny-llama", "data": str(data), "method": method,
                                 "adapter": {"virtual_tokens": 4} if method in ("prefix", "ptuning2", "prompt", "ptuning") else {},
                                 "train": {"max_steps": 6, "batch_size": 8, "lr": LR.get(method, 3e-2),
                                           "warmup_steps": 0, "save_every": 0}})
    summary = finetune(cfg, RunOptions(out=str(tmp_path / "run"), registry=str(tmp_path / "r.sqlite")))
    base, tokenizer = load_model("tiny-llama")
    before = _loss(base, tokenizer, data)
    if method in ("full", "freeze"):
        trained, _ = load_model(summary["saved"])
    else:
        trained = load_adapter(base, summary["saved"])
    after = _loss(trained, tokenizer, data)
    assert after < before - 0.05, (method, before, after)
