"""`llmlab finetune` and `llmlab merge` end to end on tiny-llama: LoRA and full fine-tuning, resume, merge.

These go through llmlab.peft (apply_method, save_adapter, load_adapter, merge_and_unload).
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from llmlab.cli import main
from llmlab.models import load_model
from llmlab.peft import load_adapter

ROWS = [{"instruction": f"Repeat the word {w}", "input": "", "output": f"{w} {w} {w}"}
        for w in ["apple", "river", "stone", "cloud", "green", "table", "music", "light"]]


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return "x.jsonl"


def _metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@torch.no_grad()
def _logits(model):
    return model(input_ids=torch.tensor([[5, 80, 81, 82, 90, 100]])).logits


def test_lora_finetune_writes_adapter_and_metrics_then_merge(tmp_path, data, capsys):
    assert main(["finetune", "--model", "tiny-llama", "--data", data, "--train.max-steps", "3", "--out", "run",
                 "--adapter.r", "4", "--adapter.alpha", "8", "--train.lr", "1e-2", "--train.batch-size", "4",
                 "--eval-fraction", "0.25", "--json"]) == 0
    out = capsys.readouterr().out
    assert "trainable params: " in out and " || all params: " in out and " || trainable%: " in out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["steps"] == 3 and summary["method"] == "lora" and summary["examples"] == 6
    assert summary["eval_loss"] is not None and summary["tokens_per_s"] > 0 and summary["peak_rss_mb"] > 0
    assert 0 < summary["trainable_params"] < summary["total_params"] and summary["truncated_rows"] == 0
    run = tmp_path / "run"
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["r"] == 4
    assert [m["step"] for m in _metrics(run) if "loss" in m] == [1, 2, 3]

    assert main(["merge", "--adapter", "run", "--out", "merged"]) == 0  # the base model comes from run/config.yaml
    base, _ = load_model("tiny-llama")
    adapted = load_adapter(load_model("tiny-llama")[0], run / "adapter")
    merged, _ = load_model("merged")
    torch.testing.assert_close(_logits(merged), _logits(adapted), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(_logits(merged), _logits(base), atol=1e-4)


def test_full_finetune_saves_a_loadable_model(tmp_path, data):
    assert main(["finetune", "--model", "tiny-llama", "--data", data, "--method", "full", "--train.max-steps", "2",
                 "--train.lr", "1e-3", "--packing", "--max-len", "128", "--out", "run"]) == 0
    assert (tmp_path / "run" / "model" / "config.json").is_file() and not (tmp_path / "run" / "adapter").exists()
    tuned, _ = load_model("run")
    base, _ = load_model("tiny-llama")
    assert not torch.allclose(_logits(tuned), _logits(base), atol=1e-4)
    assert tuned.config.use_cache is True  # training switched the KV cache off; the saved model has it back


def test_resume_continues_from_the_last_checkpoint_exactly(tmp_path, data):
    args = ["finetune", "--model", "tiny-llama", "--data", data, "--adapter.dropout", "0.2", "--train.max-steps", "6",
            "--train.batch-size", "2", "--train.save-every", "2", "--train.keep-checkpoints", "3", "--out", "run"]
    assert main(args) == 0
    run = tmp_path / "run"
    whole, adapter = _metrics(run), load_file(run / "adapter" / "adapter_model.safetensors")
    shutil.rmtree(run / "checkpoints" / "step-000006")  # as if killed between steps 4 and 6
    assert main(args + ["--resume"]) == 0
    assert [(m["step"], m["loss"]) for m in _metrics(run)] == [(m["step"], m["loss"]) for m in whole]
    again = load_file(run / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(again[k], v) for k, v in adapter.items())


@pytest.mark.parametrize("argv, message", [
    (["--method", "loraa"], "unknown --method 'loraa'"),
    (["--adapter.rr", "4"], "rr"),
    (["--format", "chat"], "unknown --format 'chat'"),
    (["--resume"], "--resume continues the run in --out DIR"),
    (["--data", "missing.jsonl"], "data file not found: missing.jsonl"),
    (["--method", "prefix", "--packing"], "--packing: this model (or fine-tuning method) cannot keep packed examples"),
])
def test_mistakes_are_one_line_errors(data, capsys, argv, message):
    assert main(["finetune", "--model", "tiny-llama", "--data", data, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_merge_without_an_adapter_is_a_clear_error(capsys):
    assert main(["merge", "--adapter", "nowhere"]) == 2
    assert "adapter not found: nowhere" in capsys.readouterr().err


@pytest.mark.slow
def test_builtin_model_learns_only_its_replies_and_finetunes_with_lora(builtin_model, data, capsys):
    from llmlab.data.sft import chat_template, encode_chat

    _, tok = builtin_model
    conversation = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"},
                    {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4, of course."}]
    ids, labels = encode_chat(conversation, tok, chat_template(tok, "auto"))  # SmolLM2's own ChatML template
    assert tok.decode([i for i, label in zip(ids, labels) if label != -100]) == \
        "Hello! How can I help?<|im_end|>4, of course.<|im_end|>"
    assert main(["finetune", "--data", data, "--train.max-steps", "2", "--train.batch-size", "2",
                 "--max-len", "128", "--out", "run", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["model"] == "smollm2-135m" and summary["steps"] == 2 and 0 < summary["train_loss"] < 10


@pytest.mark.parametrize("bf16", ["false", "true"])
@pytest.mark.parametrize("packing", ["false", "true"])
@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "adapter", "freeze", "full", "prefix", "ptuning2",
                                    "prompt", "ptuning"])
def test_every_method_with_and_without_packing_and_bf16_trains_or_says_why_in_one_line(
        data, capsys, method, packing, bf16):
    code = main(["finetune", "--model", "tiny-llama", "--data", data, "--method", method, "--packing", packing,
                 "--train.bf16", bf16, "--train.max-steps", "1", "--train.batch-size", "4", "--max-len", "64",
                 "--out", f"run-{method}-{packing}-{bf16}"])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if packing == "true" and method in ("prefix", "ptuning2", "prompt", "ptuning"):  # virtual tokens shift positions
        assert code == 2 and len(err.strip().splitlines()) == 1 and "packing" in err
    else:
        assert code == 0, err


def test_tensorboard_event_files_hold_the_training_curve(tmp_path, data):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert main(["finetune", "--model", "tiny-llama", "--data", data, "--train.max-steps", "3",
                 "--train.log-every", "1", "--train.tensorboard", "--out", "tb"]) == 0
    events = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    events.Reload()
    assert "loss" in events.Tags()["scalars"]
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3]
    logged = [r["loss"] for r in _metrics(tmp_path / "tb") if "loss" in r]
    assert [e.value for e in events.Scalars("loss")] == pytest.approx(logged, rel=1e-6)
