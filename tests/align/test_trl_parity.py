"""llmlab's preference losses against TRL's trainers on the same batch: TRL builds the batch and computes its
loss with its own forward passes; llmlab computes its loss from the same token ids. Equal to 1e-6 means the
log-probabilities (response-only, summed), the reference handling and the formula all agree.

TRL 1.16 still has DPO's sigmoid, hinge, IPO and robust losses in DPOTrainer and KTO in KTOTrainer; SimPO
and ORPO live in its experimental CPO and ORPO trainers, whose loss methods are checked on log-probs."""

import copy
import types

import pytest
import torch
from datasets import Dataset

from llmlab.models import load_model
from llmlab.train.losses import KTOLoss, PreferenceLoss, preference_loss, sequence_logps

trl = pytest.importorskip("trl")
WORDS = ["apple", "river", "stone", "cloud"]


def _models():
    policy, tok = load_model("tiny-llama")
    ref = copy.deepcopy(policy).requires_grad_(False)
    with torch.no_grad():  # the policy must differ from the reference, or every loss sits at its starting value
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return policy, ref, tok


def _ours(batch: dict, completion_mask: torch.Tensor) -> dict:
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            "labels": batch["input_ids"].masked_fill(completion_mask == 0, -100)}


@pytest.fixture(scope="module")
def dpo(tmp_path_factory):
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    policy, ref, tok = _models()
    rows = [{"prompt": [{"role": "user", "content": f"Say {w}."}], "chosen": [{"role": "assistant", "content": w}],
             "rejected": [{"role": "assistant", "content": w[::-1] + "?"}]} for w in WORDS]
    args = DPOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), per_device_train_batch_size=4, report_to=[],
                     beta=0.1, use_cpu=True)
    trainer = DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    return trainer, policy, ref, batch


@pytest.mark.parametrize("kind, smoothing", [("sigmoid", 0.0), ("hinge", 0.0), ("ipo", 0.0), ("robust", 0.2)])
def test_dpo_losses_equal_trls(dpo, kind, smoothing):
    trainer, policy, ref, batch = dpo
    trainer.loss_types, trainer.loss_weights, trainer.label_smoothing = [kind], [1.0], smoothing
    with torch.no_grad():
        theirs = trainer._compute_loss(policy, batch, False)
        loss_fn = PreferenceLoss(kind, 0.1, smoothing, reference=lambda m, b: sequence_logps(ref, b)[0])
        total, pairs = loss_fn(policy, _ours(batch, batch["completion_mask"]))
    assert pairs == 4
    assert float(total / pairs) == pytest.approx(float(theirs), rel=1e-6, abs=1e-6)  # float32 sums


def test_kto_equals_trls(tmp_path):
    from trl import KTOConfig, KTOTrainer

    torch.manual_seed(1)
    policy, ref, tok = _models()
    rows = [{"prompt": [{"role": "user", "content": f"Say {w}."}],
             "completion": [{"role": "assistant", "content": w if i % 2 else w[::-1]}], "label": bool(i % 2)}
            for i, w in enumerate(WORDS + WORDS[::-1])]
    args = KTOConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, report_to=[], beta=0.2,
                     desirable_weight=1.0, undesirable_weight=1.3, use_cpu=True)
    trainer = KTOTrainer(model=policy, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    assert "KL_input_ids" in batch  # TRL's mismatched pairs for the reference point
    with torch.no_grad():
        theirs = trainer._compute_loss(policy, batch, False)
        main, kl = _ours(batch, batch["completion_mask"]), {
            "input_ids": batch["KL_input_ids"], "attention_mask": batch["KL_attention_mask"],
            "labels": batch["KL_input_ids"].masked_fill(batch["KL_completion_mask"] == 0, -100)}
        width = max(main["input_ids"].shape[1], kl["input_ids"].shape[1])
        pad = {"input_ids": tok.pad_token_id, "attention_mask": 0, "labels": -100}
        ours = {k: torch.cat([torch.nn.functional.pad(half[k], (0, width - half[k].shape[1]), value=pad[k])
                              for half in (main, kl)]) for k in main}
        ours["desirable"] = torch.as_tensor(batch["label"], dtype=torch.bool)
        loss_fn = KTOLoss(0.2, 1.0, 1.3, reference=lambda m, b: sequence_logps(ref, b)[0])
        total, n = loss_fn(policy, ours)
    assert n == 8
    assert float(total / n) == pytest.approx(float(theirs), rel=1e-6, abs=1e-6)


def _logps(n=6):
    torch.manual_seed(2)
    lengths = torch.randint(3, 20, (2, n)).float()
    return -torch.rand(2, n) * lengths * 2, lengths


def test_simpo_equals_trls_cpo_trainer():
    from trl.experimental.cpo import CPOTrainer

    (chosen, rejected), (nc, nr) = _logps()
    stub = types.SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=0.8, beta=2.0, label_smoothing=0.0,
                                 accelerator=types.SimpleNamespace(device="cpu"))
    theirs = CPOTrainer.cpo_loss(stub, chosen / nc, rejected / nr)[0]  # TRL averages SimPO's log-probs itself
    ours = preference_loss("simpo", chosen, rejected, n_chosen=nc, n_rejected=nr, beta=2.0, gamma=0.8)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_orpos_odds_ratio_term_equals_trls():
    from trl.experimental.orpo import ORPOTrainer

    (chosen, rejected), (nc, nr) = _logps()
    stub = types.SimpleNamespace(beta=0.1, accelerator=types.SimpleNamespace(device="cpu"))
    ratio_term = ORPOTrainer.odds_ratio_loss(stub, chosen / nc, rejected / nr)[0]  # β log σ(log odds ratio)
    ours = preference_loss("orpo", chosen, rejected, n_chosen=nc, n_rejected=nr, beta=0.1)
    # llmlab's ORPO loss is the chosen reply's mean NLL minus that term (TRL averages the NLL over the batch's
    # tokens instead of per reply; the odds-ratio part is the same)
    torch.testing.assert_close(ours, -chosen / nc - ratio_term, rtol=0, atol=1e-6)
