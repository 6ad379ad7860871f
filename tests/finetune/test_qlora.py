"""QLoRA: LoRA adapters trained on a frozen quantized base (NF4 with bf16 compute, or an RTN/GPTQ
QuantLinear base), through `llmlab finetune --quantize` and through a quantized folder as --model."""

import ast
import json
from pathlib import Path

import pytest
import torch

from llmlab.cli import main
from llmlab.compress.nf4 import quantize_nf4
from llmlab.compress.rtn import RTNConfig, quantize_rtn
from llmlab.errors import LlmlabError
from llmlab.models import load_model
from llmlab.models.packed.io import save_quantized
from llmlab.models.packed.nf4 import NF4Linear
from llmlab.models.packed.qlinear import QuantLinear, quantized_linears
from llmlab.peft import (DoraConfig, IA3Config, LoraConfig, apply_dora, apply_ia3, apply_lora, load_adapter,
                         merge_and_unload)
from llmlab.peft.lora import LoraLinear

ROWS = [{"instruction": f"Repeat the word {w}", "input": "", "output": f"{w} {w} {w}"}
        for w in ["apple", "river", "stone", "cloud", "green", "table", "music", "light"]]
IDS = torch.tensor([[5, 80, 81, 82, 90, 100]])
TRAIN = ["--train.max-steps", "4", "--train.batch-size", "8", "--train.lr", "2e-2", "--adapter.r", "4"]


@pytest.fixture
def data(tmp_path):
    (tmp_path / "x.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return "x.jsonl"


@torch.no_grad()
def logits(model):
    return model(input_ids=IDS).logits


def losses(run) -> list[float]:
    return [m["loss"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in m]


def test_lora_on_nf4_is_base_plus_update_and_trains_only_the_adapter():
    model, _ = load_model("tiny-llama")
    quantize_nf4(model)
    apply_lora(model, LoraConfig(r=4, targets=["all-linear"]))
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoraLinear) and isinstance(layer.base_layer, NF4Linear)
    lora = layer.adapters["default"]
    torch.nn.init.normal_(lora.B.weight)
    x = torch.randn(2, 3, 64)
    expected = layer.base_layer(x) + lora.B(lora.A(x)) * lora.scaling  # h = W_nf4 x (bf16 compute) + s·BAx
    torch.testing.assert_close(layer(x), expected, atol=0, rtol=0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 14 and all(".adapters.default." in n for n in trainable)
    frozen = {n: b.clone() for n, b in model.named_buffers() if "absmax" in n or "qweight" in n}
    model(input_ids=IDS, labels=IDS).loss.backward()
    assert all(model.get_parameter(n).grad is not None for n in trainable)
    assert all(torch.equal(b, frozen[n]) for n, b in model.named_buffers() if n in frozen)


def test_qlora_finetune_trains_and_the_adapter_loads_onto_a_quantized_base(tmp_path, data):
    assert main(["finetune", "--model", "tiny-llama", "--quantize", "nf4", "--method", "lora", "--data", data, *TRAIN,
                 "--out", "run"]) == 0
    run = tmp_path / "run"
    loss = losses(run)
    assert len(loss) == 4 and loss[-1] < loss[0]  # the same 8 rows every step: the loss goes down
    summary = json.loads((run / "summary.json").read_text())
    assert summary["trainable_params"] == 2 * 4 * ((64 + 64) + (64 + 32))  # q_proj and v_proj, r = 4, 2 layers

    # the adapter onto an NF4 folder (save_quantized): the same numbers as on the base quantized in memory
    base, tokenizer = load_model("tiny-llama")
    save_quantized(quantize_nf4(base), tokenizer, tmp_path / "nf4")
    on_folder = load_adapter(load_model("nf4")[0], run / "adapter")
    in_memory = load_adapter(quantize_nf4(load_model("tiny-llama")[0]), run / "adapter")
    assert torch.equal(logits(on_folder), logits(in_memory))
    assert not torch.allclose(logits(on_folder), logits(load_model("nf4")[0]), atol=1e-4)
    assert main(["generate", "--model", "nf4", "--adapter", "run/adapter", "--prompt", "hi",
                 "--max-new-tokens", "4"]) == 0

    # merging goes into the float model the run was trained from (its config.yaml names tiny-llama)
    assert main(["merge", "--adapter", "run", "--out", "merged"]) == 0
    float_adapted = load_adapter(load_model("tiny-llama")[0], run / "adapter")
    torch.testing.assert_close(logits(load_model("merged")[0]), logits(float_adapted), atol=1e-5, rtol=1e-5)


def test_a_quantized_folder_is_a_finetune_model(tmp_path, data):
    model, tokenizer = load_model("tiny-llama")
    save_quantized(quantize_rtn(model, None, RTNConfig(bits=4, group_size=32)), tokenizer, tmp_path / "rtn4")
    assert main(["finetune", "--model", "rtn4", "--data", data, *TRAIN, "--out", "run"]) == 0
    loss = losses(tmp_path / "run")
    assert loss[-1] < loss[0]
    adapted = load_adapter(load_model("rtn4")[0], tmp_path / "run" / "adapter")
    assert isinstance(adapted.model.layers[1].self_attn.v_proj.base_layer, QuantLinear)
    # and --quantize rtn with its options does the same in one go
    assert main(["finetune", "--model", "tiny-llama", "--quantize", "rtn", "--quant.bits", "4",
                 "--quant.group-size", "32", "--data", data, *TRAIN, "--out", "run2"]) == 0
    assert losses(tmp_path / "run2") == pytest.approx(loss, rel=1e-4)


def test_lora_on_a_gptq_base_trains():
    from llmlab.compress.gptq import GPTQConfig, quantize_gptq

    model, _ = load_model("tiny-llama")
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    quantize_gptq(model, calib, GPTQConfig(bits=4, group_size=32))
    assert len(quantized_linears(model)) == 14
    apply_lora(model, LoraConfig(r=4))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    history = []
    for _ in range(4):
        loss = model(input_ids=calib, labels=calib).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        history.append(loss.item())
    assert history[-1] < history[0]


def test_merging_into_a_quantized_base_is_refused():
    model, _ = load_model("tiny-llama")
    apply_lora(quantize_nf4(model), LoraConfig(r=4))
    with pytest.raises(LlmlabError, match="merge_and_unload needs a float base; dequantize first"):
        merge_and_unload(model)


def test_dora_and_ia3_on_an_nf4_base():
    for apply, cfg in ((apply_dora, DoraConfig(r=4)), (apply_ia3, IA3Config())):
        model, _ = load_model("tiny-llama")
        base = logits(quantize_nf4(model))
        apply(model, cfg)
        torch.testing.assert_close(logits(model), base, atol=1e-5, rtol=0)  # both start at the base model
        model(input_ids=IDS, labels=IDS).loss.backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
        with pytest.raises(LlmlabError, match="needs a float base"):
            merge_and_unload(model)


def test_bad_quantize_options(data):
    for args in (["--quantize", "gptq"], ["--quantize", "nf5"], ["--quantize", "nf4", "--method", "full"],
                 ["--quantize", "nf4", "--quant.block-size", "0"]):
        assert main(["finetune", "--model", "tiny-llama", "--data", data, *args]) == 2


def test_peft_does_not_import_compress():
    """Dependencies point one way (compress uses models; peft finds quantized layers by duck typing)."""
    import llmlab.peft

    for path in Path(llmlab.peft.__file__).parent.glob("*.py"):
        for node in ast.parse(path.read_text()).body:  # module level: a lazy import inside a function is fine
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(n.startswith("llmlab.compress") for n in names), path
