"""fit(): it learns, grad accumulation equals a big batch, metrics and checkpoints land in the run."""

import importlib.util
import json

import pytest
import torch

from llmlab.errors import LlmlabError
from llmlab.runs import Run
from llmlab.train import TrainConfig, accumulate, fit, list_checkpoints
from tests.train.helpers import batches, examples, loss_fn, tiny


def test_loss_falls_on_a_tiny_set_it_can_memorise():
    model, tok = tiny()
    data = examples(tok, 4)
    losses = []
    cfg = TrainConfig(lr=3e-3, max_steps=40, batch_size=4, warmup_steps=0, save_every=0, eval_every=0)
    summary = fit(model, loss_fn, data, cfg, collate=batches(tok), callbacks=[lambda s, m: losses.append(m["loss"])],
                  progress=False)
    assert len(losses) == 40 and summary["steps"] == 40
    assert losses[-1] < 0.5 * losses[0], losses
    assert not model.training  # handed back in eval mode, with its KV cache setting restored
    assert model.config.use_cache is True
    assert summary["tokens"] == 40 * sum(len(e["input_ids"]) for e in data)
    assert summary["tokens_per_s"] > 0 and summary["peak_rss_mb"] > 0


def test_two_micro_batches_of_two_give_the_gradient_of_one_batch_of_four():
    data = examples(tiny()[1], 4)
    grads = []
    for split in ([data], [data[:2], data[2:]], [data[:1], data[1:]]):
        model, tok = tiny()
        loss_sum, n = accumulate(model, loss_fn, [batches(tok)(part) for part in split])
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
        assert n == sum(sum(label != -100 for label in e["labels"]) for e in data)
    for other in grads[1:]:
        for name, g in grads[0].items():
            torch.testing.assert_close(other[name], g, atol=1e-6, rtol=1e-5, msg=name)


def test_grad_accum_in_fit_logs_the_same_loss_and_grad_norm_as_the_big_batch():
    logs = []
    for batch_size, accum in ((4, 1), (2, 2)):
        model, tok = tiny()
        got = []
        fit(model, loss_fn, examples(tok, 8), TrainConfig(max_steps=2, batch_size=batch_size, grad_accum=accum,
                                                          save_every=0), collate=batches(tok),
            callbacks=[lambda s, m: got.append((m["loss"], m["grad_norm"]))], progress=False)
        logs.append(got)
    for (a_loss, a_norm), (b_loss, b_norm) in zip(*logs):
        assert a_loss == pytest.approx(b_loss, rel=1e-6) and a_norm == pytest.approx(b_norm, rel=1e-5)


def test_metrics_eval_and_checkpoints_go_to_the_run_folder(tmp_path, caplog):
    model, tok = tiny()
    data = examples(tok)
    cfg = TrainConfig(max_steps=6, batch_size=2, eval_every=3, save_every=2, keep_checkpoints=2, log_every=2,
                      tensorboard=True)
    with Run("test", {}, out=tmp_path / "run") as run:
        summary = fit(model, loss_fn, data[:8], cfg, collate=batches(tok), eval_data=data[8:], run=run,
                      checkpoint_dir=run.path / "ckpt", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [2, 4, 6]
    assert [r["step"] for r in rows if "eval_loss" in r] == [3, 6]
    assert all({"lr", "tokens_per_s", "grad_norm"} <= r.keys() for r in rows if "loss" in r)
    assert summary["eval_loss"] == rows[-1]["eval_loss"]
    assert [p.name for p in list_checkpoints(run.path / "ckpt")] == ["step-000004", "step-000006"]
    assert sorted(p.name for p in (run.path / "ckpt" / "step-000006").iterdir()) == [
        "optimizer.safetensors", "rng.safetensors", "state.json", "trainable.safetensors"]
    if importlib.util.find_spec("tensorboard") is None:
        assert "tensorboard package is not installed" in caplog.text
    else:
        assert any((run.path / "tensorboard").iterdir())


def test_only_trainable_parameters_are_optimised_and_saved(tmp_path):
    from safetensors.torch import load_file

    model, tok = tiny()
    for name, p in model.named_parameters():
        p.requires_grad_("layers.1." in name)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    fit(model, loss_fn, examples(tok), TrainConfig(max_steps=2, batch_size=2, save_every=2), collate=batches(tok),
        checkpoint_dir=tmp_path, progress=False)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    saved = load_file(tmp_path / "step-000002" / "trainable.safetensors")
    assert saved and all("layers.1." in name for name in saved)


def test_nothing_to_train_and_no_data_are_clear_errors():
    model, tok = tiny()
    with pytest.raises(LlmlabError, match="no training examples"):
        fit(model, loss_fn, [], TrainConfig(max_steps=1), collate=batches(tok), progress=False)
    model.requires_grad_(False)
    with pytest.raises(LlmlabError, match="nothing to train"):
        fit(model, loss_fn, examples(tok), TrainConfig(max_steps=1), collate=batches(tok), progress=False)


def test_bad_train_config_is_a_one_line_error():
    with pytest.raises(LlmlabError, match="--train.grad-accum must be at least 1"):
        TrainConfig(grad_accum=0)


def test_bf16_autocast_keeps_fp32_master_weights_and_checkpointing_gives_the_same_grads():
    model, tok = tiny()
    losses = []
    fit(model, loss_fn, examples(tok), TrainConfig(max_steps=2, batch_size=4, bf16=True, save_every=0),
        collate=batches(tok), callbacks=[lambda s, m: losses.append(m["loss"])], progress=False)
    assert all(p.dtype == torch.float32 for p in model.parameters()) and all(0 < x < 10 for x in losses)

    norms, active = [], []
    checkpointed = lambda model: any(getattr(m, "gradient_checkpointing", False) for m in model.modules())  # noqa: E731
    for checkpointing in (False, True):
        model, tok = tiny()
        fit(model, loss_fn, examples(tok), TrainConfig(max_steps=1, batch_size=4, gradient_checkpointing=checkpointing,
                                                       save_every=0), collate=batches(tok), progress=False,
            callbacks=[lambda s, m: (norms.append(m["grad_norm"]), active.append(checkpointed(model)))])
        assert not checkpointed(model)  # switched off again after training
    assert active == [False, True] and norms[0] == pytest.approx(norms[1], rel=1e-6)


def test_frozen_linears_in_bf16_give_the_same_autocast_numbers():
    import copy

    from llmlab.models import load_model
    from llmlab.peft import LoraConfig, apply_lora
    from llmlab.train.loop import frozen_linears_to_bf16
    from llmlab.train.losses import sft_loss

    torch.manual_seed(0)
    model, _ = load_model("tiny-llama")
    apply_lora(model, LoraConfig(r=4, targets=["all-linear"]))
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    compact = copy.deepcopy(model)
    assert frozen_linears_to_bf16(compact) == 14  # 7 linear layers x 2 blocks; the tied head stays fp32
    assert all(p.dtype == torch.float32 for p in compact.parameters() if p.requires_grad)
    ids = torch.randint(0, 320, (2, 12))
    batch = {"input_ids": ids, "labels": ids.clone()}
    results = []
    for m in (model, compact):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = sft_loss(m, batch)
        loss.backward()
        results.append((loss.detach(), [p.grad for p in m.parameters() if p.requires_grad]))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))
