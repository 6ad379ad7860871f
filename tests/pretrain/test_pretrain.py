"""`llmlab pretrain` end to end on a tiny lab decoder: it learns, saves a model every verb loads, logs MFU, layer
dropping and expert loads; bad input fails in one line; DDP and FSDP2 on 2 CPU processes give the 1-process
losses and their checkpoints resume on 1 process (slow: torchrun start-up)."""

import json
import math
from pathlib import Path

import pytest

from llmlab.cli import main
from llmlab.generation import SamplingConfig, generate
from llmlab.models import load_model
from llmlab.pretrain.layer_drop import keep_probabilities
from llmlab.train import TrainConfig
from llmlab.train.loop import micro_batches

SHAKESPEARE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "tiny_shakespeare" / "input.txt"
TINY = ["--tokenizer", "tiny-llama", "--arch.num-hidden-layers", "2", "--arch.num-attention-heads", "2",
        "--arch.hidden-size", "32", "--seq-len", "32", "--train.log-every", "1", "--eval-windows", "8"]


@pytest.fixture
def text(tmp_path) -> Path:
    path = tmp_path / "text.txt"
    source = SHAKESPEARE.read_text(encoding="utf-8")[:60000] if SHAKESPEARE.is_file() else \
        "".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(1500))
    path.write_text(source, encoding="utf-8")
    return path


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_pretraining_learns_and_saves_a_model_every_verb_loads(text, tmp_path):
    code = main(["pretrain", "--data", str(text), *TINY, "--train.max-steps", "40", "--train.batch-size", "8",
                 "--train.eval-every", "20", "--out", str(tmp_path / "run")])
    assert code == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    rows = metrics(tmp_path / "run")
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert evals[-1] < evals[0] < math.log(320)  # below the uniform guess, and falling
    assert 0 < summary["mfu"] < 1 and summary["eval_ppl"] == pytest.approx(math.exp(summary["eval_loss"]))
    assert all("mfu" in r for r in rows if "loss" in r)
    model, tok = load_model(str(tmp_path / "run"))
    assert type(model).__name__ == "LabForCausalLM"
    assert isinstance(generate(model, tok, "the", SamplingConfig(max_new_tokens=5)), str)


def test_layer_dropping_and_experts_show_in_the_metrics(text, tmp_path):
    code = main(["pretrain", "--data", str(text), *TINY, "--train.max-steps", "6", "--train.eval-every", "0",
                 "--layer-drop", "true", "--arch.num-experts", "4", "--arch.num-experts-per-tok", "2",
                 "--objective", "prefix", "--out", str(tmp_path / "run")])
    assert code == 0
    rows = [r for r in metrics(tmp_path / "run") if "loss" in r]
    assert rows[0]["expected_layers"] > rows[-1]["expected_layers"]
    per_layer = 2 * 12 * 32  # k = 2 assignments of each of the 12 x 32 tokens, in each layer that ran
    assert all(sum(r["expert_tokens"]) in (0, per_layer, 2 * per_layer) for r in rows)  # 0, 1 or 2 layers ran
    assert sum(rows[0]["expert_tokens"]) == 2 * per_layer  # at step 1 every layer runs
    assert rows[-1]["expert_cv"] >= 0


def test_progressive_layer_drop_schedule_and_batch_warmup_follow_their_formulas():
    keep = keep_probabilities(0, 4, 0.5, 0.1)
    assert keep == [1.0, 1.0, 1.0, 1.0]
    late = keep_probabilities(10 ** 6, 4, 0.5, 0.1)
    assert late == pytest.approx([1 - 0.25 * 0.5, 1 - 0.5 * 0.5, 1 - 0.75 * 0.5, 0.5])
    cfg = TrainConfig(grad_accum=4, batch_warmup_steps=8)
    assert [micro_batches(s, cfg) for s in range(10)] == [1, 1, 2, 2, 3, 3, 4, 4, 4, 4]


@pytest.mark.parametrize("args, message", [
    (["--arch.hidden-size", "30", "--arch.num-attention-heads", "4"], "num_attention_heads=4 does not divide"),
    (["--arch.norm-position", "pre", "--arch.deepnorm", "true"], "deepnorm is a post-LN scheme"),
    (["--arch.num-experts", "2", "--arch.num-experts-per-tok", "3"], "num_experts_per_tok"),
    (["--arch.hiden-size", "64"], "did you mean 'hidden_size'"),
    (["--objective", "mlm"], "unknown --objective"),
    (["--arch.dropout", "yes"], "dropout"),
])
def test_inconsistent_configs_are_one_line_errors(text, tmp_path, capsys, args, message):
    code = main(["pretrain", "--data", str(text), "--tokenizer", "tiny-llama", *args, "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "r").exists()


def test_whole_numbers_are_fine_for_float_keys(text, tmp_path):
    assert main(["pretrain", "--data", str(text), *TINY, "--arch.num-experts", "2", "--arch.moe-aux-loss-coef", "0",
                 "--arch.dropout", "0", "--train.max-steps", "1", "--out", str(tmp_path / "r")]) == 0


def test_objectives_beyond_causal_need_the_lab_decoder(text, tmp_path, capsys):
    code = main(["pretrain", "--data", str(text), "--model", "tiny-llama", "--objective", "prefix",
                 "--out", str(tmp_path / "r")])
    assert code == 2 and "needs a bidirectional prefix" in capsys.readouterr().err


def test_the_encoder_decoder_of_the_three_way_comparison_trains_on_span_corruption(text, tmp_path):
    from transformers import T5ForConditionalGeneration

    code = main(["pretrain", "--data", str(text), *TINY, "--architecture", "encoder-decoder", "--objective", "span",
                 "--seq-len", "64", "--train.max-steps", "30", "--train.eval-every", "15",
                 "--out", str(tmp_path / "t5")])
    assert code == 0
    evals = [r["eval_loss"] for r in metrics(tmp_path / "t5") if "eval_loss" in r]
    assert evals[-1] < evals[0]
    model = T5ForConditionalGeneration.from_pretrained(tmp_path / "t5" / "model")
    assert model.config.num_layers == 2 and model.config.d_model == 32


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in metrics(run) if "loss" in r]


@pytest.mark.slow
def test_ddp_and_fsdp2_on_two_processes_give_the_one_process_losses_and_resume_on_one(text, tmp_path):
    common = ["pretrain", "--data", str(text), *TINY, "--train.max-steps", "8", "--train.batch-size", "4",
              "--train.eval-every", "0", "--train.save-every", "4"]
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    want = losses(tmp_path / "one")
    for kind in ("ddp", "fsdp"):
        assert main([*common, "--nproc", "2", "--parallel", kind, "--out", str(tmp_path / kind)]) == 0
        assert losses(tmp_path / kind) == pytest.approx(want, rel=1e-5, abs=1e-5)
    # the 2-process FSDP2 checkpoint of step 4, resumed by one process, continues the same run
    import shutil
    shutil.rmtree(tmp_path / "fsdp" / "checkpoints" / "step-000008")
    assert main([*common, "--out", str(tmp_path / "fsdp"), "--resume", "true"]) == 0
    assert losses(tmp_path / "fsdp") == pytest.approx(want, rel=1e-5, abs=1e-5)


@pytest.mark.slow
def test_resuming_with_a_changed_model_config_is_refused(text, tmp_path, capsys):
    common = ["pretrain", "--data", str(text), *TINY, "--train.max-steps", "2", "--train.save-every", "2",
              "--out", str(tmp_path / "r")]
    assert main(common) == 0
    assert main([*common, "--resume", "true", "--arch.hidden-size", "64"]) == 2
    assert "model config changed" in capsys.readouterr().err
