"""Reward models: a scalar head on a causal LM, trained on preference pairs with the Bradley–Terry loss.

Ouyang et al. 2022 (InstructGPT), §3.5: the reward model r_θ(x, y) reads the prompt and a reply and gives one
number, at the reply's last token; a pair is scored as P(y_w ≻ y_l) = σ(r_θ(x, y_w) − r_θ(x, y_l)), so

    L = −log σ(r_w − r_l − m) + c · (r_w + r_l)²

with an optional margin m (Llama 2's, for pairs rated far apart) and reward centering c (Eisenstein et al.
2023, https://arxiv.org/abs/2312.09244: keeps rewards near zero, so their scale means something across
prompts). The model is transformers' `…ForSequenceClassification` with one label over the causal LM's
weights, so the saved folder loads back with `AutoModelForSequenceClassification`.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from llmlab.config import field
from llmlab.data.packing import to_device
from llmlab.errors import LlmlabError


@dataclass
class RewardConfig:
    margin: float = field(0.0, help="m: the reward gap a pair must reach before its loss vanishes")
    center: float = field(0.0, help="c: weight of (r_w + r_l)², which keeps rewards centred on 0 (paper: 0.01)")

    def __post_init__(self):
        if self.margin < 0 or self.center < 0:
            raise LlmlabError(f"--options.margin and --options.center must be 0 or more, got {self.margin}, "
                              f"{self.center}")


def reward_model(causal_lm):
    """A one-label sequence classifier with `causal_lm`'s weights (the new `score` head initialised small)."""
    fields = {k: v for k, v in causal_lm.config.to_dict().items() if k not in ("id2label", "label2id", "num_labels")}
    config = AutoConfig.for_model(**{**fields, "num_labels": 1})
    if config.pad_token_id is None:
        config.pad_token_id = config.eos_token_id
    model = AutoModelForSequenceClassification.from_config(config, dtype=next(causal_lm.parameters()).dtype)
    missing, _ = model.load_state_dict(causal_lm.state_dict(), strict=False)  # lm_head is left behind
    head = model.get_submodule(missing[0].rsplit(".", 1)[0]) if missing else None
    if head is None or not all(name.startswith(missing[0].rsplit(".", 1)[0]) for name in missing):
        raise LlmlabError(f"{type(causal_lm).__name__} does not map onto a sequence classifier (missing: {missing})")
    torch.nn.init.normal_(head.weight, std=1 / (causal_lm.config.hidden_size + 1) ** 0.5)
    model.llmlab_head_name = missing[0].rsplit(".", 1)[0]  # "score" for the LLaMA family
    return model.to(causal_lm.device)


def rewards(model, batch: dict) -> torch.Tensor:
    """r(x, y) of each row: the head at the row's last real token (by the attention mask, so an EOS that is
    also the padding token still counts)."""
    hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    last = batch["attention_mask"].sum(1) - 1  # (R,)
    head = model.get_submodule(getattr(model, "llmlab_head_name", "score"))
    return head(hidden[torch.arange(len(last), device=last.device), last]).squeeze(-1).float()


class BradleyTerryLoss:
    """`loss_fn(model, batch)` for `fit` on `collate_pairs` batches: the summed pair loss and the number of pairs."""

    def __init__(self, cfg: RewardConfig):
        self.cfg = cfg

    def __call__(self, model, batch: dict):
        r = rewards(model, batch)
        half = len(r) // 2
        r_w, r_l = r[:half], r[half:]
        loss = -F.logsigmoid(r_w - r_l - self.cfg.margin) + self.cfg.center * (r_w + r_l) ** 2
        return loss.sum(), half


def reward_loss(cfg: RewardConfig, reference=None, method: str = "reward") -> BradleyTerryLoss:
    return BradleyTerryLoss(cfg)


@torch.no_grad()
def pairwise_scores(model, pairs: list[dict], collate, batch_size: int = 8) -> dict:
    """Pairwise accuracy (r_w > r_l) and the distribution of the margin r_w − r_l."""
    model.eval()
    margins = []
    for start in range(0, len(pairs), batch_size):
        batch = to_device(collate(pairs[start:start + batch_size]), model.device)
        r = rewards(model, batch)
        half = len(r) // 2
        margins += (r[:half] - r[half:]).tolist()
    m = torch.tensor(margins)
    return {"pairwise_accuracy": float((m > 0).float().mean()), "margin_mean": float(m.mean()),
            "margin_quartiles": [round(float(q), 4) for q in torch.quantile(m, torch.tensor([0.25, 0.5, 0.75]))],
            "pairs": len(margins)}


def load_reward_model(folder: str | Path):
    """(model, tokenizer) of a saved reward model: a run folder (its model/) or the folder itself."""
    folder = Path(folder)
    if (folder / "model" / "config.json").is_file():
        folder = folder / "model"
    if not (folder / "config.json").is_file():
        raise LlmlabError(f"{folder} is not a reward model folder (no config.json); train one with "
                          "`llmlab align --method reward`")
    config = AutoConfig.from_pretrained(folder)
    if not any(a.endswith("ForSequenceClassification") for a in config.architectures or []) or config.num_labels != 1:
        raise LlmlabError(f"{folder} holds a {', '.join(config.architectures or ['model'])}, not a reward model "
                          "(a one-label sequence classifier); train one with `llmlab align --method reward`")
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    return model.eval(), AutoTokenizer.from_pretrained(folder)
