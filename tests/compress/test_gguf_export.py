"""GGUF export: the file reads with gguf.GGUFReader (types, metadata, tokenizer), loads back through
transformers (llmlab.models.load_model on the .gguf) with the same logits, and a Q8_0 export gives
the logits of the llmlab model whose linears hold the Q8_0 grid."""

import gguf
import numpy as np
import pytest
import torch

from llmlab.compress.gguf_export import export_gguf, permute, q8_0_grid, q8_0_linears
from llmlab.compress.nf4 import NF4Config, quantize_nf4
from llmlab.errors import LlmlabError
from llmlab.models import load_model
from llmlab.models.packed.qlinear import QuantLinear, quantized_linears
from llmlab.peft import apply_lora
from llmlab.runs import RunOptions
from llmlab.stages.export import ExportConfig, export_verb

IDS = torch.tensor([[5, 80, 81, 82, 90, 100, 258, 44, 45]])
TEXT = "Hello wörld <|im_start|>user\nhi<|im_end|> 123"


@torch.no_grad()
def logits(model):
    return model(input_ids=IDS).logits


def fields(path) -> dict:
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items()}, {t.name: t for t in reader.tensors}


def test_q8_0_file_reads_with_gguf(tmp_path):
    model, tokenizer = load_model("tiny-llama")
    path = export_gguf(model, tokenizer, tmp_path / "tiny.gguf", "q8_0")
    meta, tensors = fields(path)
    assert meta["general.architecture"] == "llama" and meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert (meta["llama.block_count"], meta["llama.embedding_length"], meta["llama.feed_forward_length"]) == (2, 64, 128)
    assert (meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]) == (4, 2)
    assert meta["llama.rope.dimension_count"] == 16 and meta["llama.vocab_size"] == 320
    assert meta["tokenizer.ggml.model"] == "gpt2" and len(meta["tokenizer.ggml.tokens"]) == 320
    assert meta["tokenizer.ggml.tokens"][257] == "<|im_start|>" and meta["tokenizer.ggml.token_type"][257] == 3
    assert meta["tokenizer.ggml.token_type"][300] == gguf.TokenType.UNUSED  # padding up to the embedding rows
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (256, 258)
    assert meta["tokenizer.chat_template"] == tokenizer.chat_template
    types = {name: t.tensor_type.name for name, t in tensors.items()}
    assert len(types) == 1 + 2 * 9 + 1 and "output.weight" not in types  # tied head: no output tensor
    assert types["token_embd.weight"] == "F16" and types["output_norm.weight"] == "F32"
    assert {types[f"blk.1.{n}.weight"] for n in ("attn_q", "attn_k", "attn_v", "attn_output",
                                                  "ffn_gate", "ffn_up", "ffn_down")} == {"Q8_0"}
    assert types["blk.0.attn_norm.weight"] == types["blk.0.ffn_norm.weight"] == "F32"
    assert tensors["blk.0.attn_k.weight"].shape.tolist() == [64, 32]  # ggml order: (in, out)


def test_f32_export_loads_back_exactly(tmp_path):
    model, tokenizer = load_model("tiny-llama")
    export_gguf(model, tokenizer, tmp_path / "tiny.gguf", "f32")
    loaded, loaded_tokenizer = load_model(tmp_path / "tiny.gguf")
    assert torch.equal(logits(loaded), logits(model))  # q/k permuted for llama.cpp and back again
    assert loaded_tokenizer(TEXT).input_ids == tokenizer(TEXT).input_ids
    assert loaded_tokenizer.chat_template == tokenizer.chat_template
    assert (loaded_tokenizer.eos_token, loaded_tokenizer.bos_token) == (tokenizer.eos_token, tokenizer.bos_token)


def test_untied_head_is_exported(tmp_path):
    model, tokenizer = load_model("tiny-mistral")  # llama.cpp runs Mistral as llama; its head is not tied
    path = export_gguf(model, tokenizer, tmp_path / "m.gguf", "f32")
    assert "output.weight" in fields(path)[1]
    assert torch.equal(logits(load_model(path)[0]), logits(model))


def test_q8_0_export_matches_the_llmlab_q8_0_model(tmp_path):
    model, tokenizer = load_model("tiny-llama")
    export_gguf(model, tokenizer, tmp_path / "tiny.gguf", "q8_0")
    loaded, _ = load_model(tmp_path / "tiny.gguf")
    reference = q8_0_linears(model)  # QuantLinear 8-bit symmetric groups of 32, fp16 scales, ggml's rounding
    assert len(quantized_linears(reference)) == 14
    with torch.no_grad():  # the file keeps the embeddings in f16
        reference.get_input_embeddings().weight.copy_(reference.get_input_embeddings().weight.half().float())
    # tolerance 1e-5 for kernel order; the weights are the same numbers (observed difference: 0)
    torch.testing.assert_close(logits(loaded), logits(reference), atol=1e-5, rtol=0)
    assert (logits(loaded) - logits(load_model("tiny-llama")[0])).abs().max() > 1e-4  # it is quantized


def test_q8_0_grid_is_bit_exact_with_gguf():
    torch.manual_seed(0)
    w = torch.randn(48, 96) * torch.logspace(-3, 1, 48)[:, None]
    w[3, :32] = 0  # an all-zero block: d = 0
    w[5, 32:37] = torch.tensor([127.0, 0.5, 1.5, -2.5, 2.5])  # d = 1: ggml rounds halves away from zero
    q, scale, zero = q8_0_grid(w)
    blocks = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q8_0).reshape(48, 3, 34)
    assert np.array_equal(scale.half().numpy().view(np.uint8).reshape(48, 3, 2), blocks[..., :2])
    assert np.array_equal((q.int() - 128).to(torch.int8).numpy().reshape(48, 3, 32), blocks[..., 2:].view(np.int8))
    layer = QuantLinear.from_float(torch.nn.Linear(96, 48, bias=False), _spec(), q, scale, zero)
    expected = gguf.quants.dequantize(blocks.reshape(48, -1), gguf.GGMLQuantizationType.Q8_0)
    assert np.array_equal(layer.dequantized_weight().numpy(), expected)


def _spec():
    from llmlab.models.packed.quant import QuantSpec

    return QuantSpec(bits=8, group_size=32, symmetric=True)


def test_q4_0_weights_are_ggml_q4_0(tmp_path):
    model, tokenizer = load_model("tiny-llama")
    path = export_gguf(model, tokenizer, tmp_path / "tiny.gguf", "q4_0")
    assert fields(path)[1]["blk.0.attn_q.weight"].tensor_type.name == "Q4_0"
    loaded, _ = load_model(path)
    for name in ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj"):
        w = model.model.layers[0].get_submodule(name).weight.detach().numpy()
        q4 = gguf.quants.dequantize(gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q4_0),
                                    gguf.GGMLQuantizationType.Q4_0)
        # the row permutation commutes with row-blocked quantization: unpermuted on load, the weight is exact
        assert np.array_equal(loaded.model.layers[0].get_submodule(name).weight.detach().numpy(), q4)


def test_permute_is_what_transformers_reverses():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = torch.arange(8 * 3 * 5, dtype=torch.float32).reshape(24, 5)  # 3 heads of dim 8
    back = LlamaTensorProcessor({"num_attention_heads": 3, "num_key_value_heads": 3})._reverse_permute_weights(
        permute(w, 3).numpy(), 3, 3)
    assert np.array_equal(back, w.numpy())
    assert permute(w, 3)[:4, 0].tolist() == [0, 20, 5, 25]  # head 0: rows 0, 4, 1, 5 (pairs, not halves)


def test_a_quantized_llmlab_model_exports_its_dequantized_weights(tmp_path):
    model, tokenizer = load_model("tiny-llama")
    quantize_nf4(model, None, NF4Config(compute_dtype="fp32"))
    export_gguf(model, tokenizer, tmp_path / "nf4.gguf", "f32")
    torch.testing.assert_close(logits(load_model(tmp_path / "nf4.gguf")[0]), logits(model), atol=1e-5, rtol=0)


def test_export_verb(tmp_path):
    summary = export_verb(ExportConfig(model="tiny-llama", qtype="q4_0"), RunOptions(out=str(tmp_path / "t.gguf")))
    assert summary["bytes"] == (tmp_path / "t.gguf").stat().st_size > 0
    # tiny layers are small next to the f16 embedding: still, q4_0 < q8_0 < f16 < f32
    sizes = {q: export_gguf(*load_model("tiny-llama"), tmp_path / f"{q}.gguf", q).stat().st_size
             for q in ("f32", "f16", "q8_0", "q4_0")}
    assert sizes["q4_0"] < sizes["q8_0"] < sizes["f16"] < sizes["f32"]


def test_bad_input(tmp_path):
    model, tokenizer = load_model("tiny-llama")
    with pytest.raises(LlmlabError, match="unsupported GGUF qtype 'q5_k'"):
        export_gguf(model, tokenizer, tmp_path / "x.gguf", "q5_k")
    with pytest.raises(LlmlabError, match="qtype"):
        ExportConfig(qtype="int4")
    with pytest.raises(LlmlabError, match="must name a .gguf file"):
        export_verb(ExportConfig(model="tiny-llama"), RunOptions(out=str(tmp_path / "model.bin")))
    with pytest.raises(LlmlabError, match="architecture 'gpt2' is not llama-like"):
        export_gguf(*load_model("tiny-gpt2"), tmp_path / "x.gguf")
    with pytest.raises(LlmlabError, match="architecture 'qwen2' is not llama-like"):
        export_gguf(*load_model("tiny-qwen2"), tmp_path / "x.gguf")
    with pytest.raises(LlmlabError, match="merge"):
        export_gguf(apply_lora(model), tokenizer, tmp_path / "x.gguf")
    assert list(tmp_path.iterdir()) == []  # nothing half-written


@pytest.mark.slow
def test_builtin_model_q8_0_round_trip(tmp_path, builtin_model):
    model, tokenizer = builtin_model
    path = export_gguf(model, tokenizer, tmp_path / "smollm2.q8_0.gguf", "q8_0")
    loaded, loaded_tokenizer = load_model(path)
    assert loaded_tokenizer(TEXT).input_ids == tokenizer(TEXT).input_ids
    reference, _ = load_model("smollm2-135m")
    q8_0_linears(reference)
    with torch.no_grad():
        reference.get_input_embeddings().weight.copy_(reference.get_input_embeddings().weight.half().float())
        ids = torch.tensor([tokenizer("The capital of France is Paris, and the capital of Italy is").input_ids])
        ours, theirs = reference(input_ids=ids).logits, loaded(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
    print(f"smollm2-135m q8_0 gguf: {path.stat().st_size / 2**20:.1f} MiB")


# ---- the exported files in llama.cpp itself (xllamacpp: llama.cpp's server, in process) ----

def llama_cpp_greedy(path, prompt: list[int], n: int) -> str:
    """llama.cpp's greedy continuation of token ids `prompt`, as text."""
    xllamacpp = pytest.importorskip("xllamacpp")
    params = xllamacpp.CommonParams()
    params.model.path = str(path)
    params.n_ctx, params.warmup = 256, False
    params.cpuparams.n_threads = 2
    server = xllamacpp.Server(params)
    reply = server.handle_completions({"prompt": prompt, "n_predict": n, "temperature": 0.0, "top_k": 1,
                                       "cache_prompt": False})
    return reply["choices"][0]["text"]


def llmlab_greedy(model, tokenizer, prompt: list[int], n: int) -> str:
    from llmlab.generation import SamplingConfig, decode

    new = decode(model, [prompt], SamplingConfig(max_new_tokens=n, temperature=0.0, ignore_eos=True), eos=[], pad=0)
    return tokenizer.decode(new[0])


def test_tiny_export_loads_in_llama_cpp_and_continues_as_llmlab_does(tmp_path):
    model, tokenizer = load_model("tiny-llama")
    path = export_gguf(model, tokenizer, tmp_path / "tiny.gguf", "f32")  # a byte vocabulary: no merges
    assert oct(path.stat().st_mode & 0o777) != oct(0o600)  # the usual mode, not mkstemp's private one
    prompt = tokenizer("the cat sat on", add_special_tokens=False).input_ids
    assert llama_cpp_greedy(path, prompt, 12) == llmlab_greedy(model, tokenizer, prompt, 12)


def test_the_source_gguf_pre_tokenizer_name_is_kept():
    from llmlab.compress.gguf_export import _pre_tokenizer

    assert _pre_tokenizer({"pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}) == "gpt-2"
    assert _pre_tokenizer({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, {"type": "ByteLevel", "use_regex": True}]}}) == "smollm"


@pytest.mark.slow
def test_builtin_q8_0_export_in_llama_cpp_continues_as_the_llmlab_q8_0_model(tmp_path, builtin_model):
    model, tokenizer = builtin_model
    path = export_gguf(model, tokenizer, tmp_path / "smollm2.q8_0.gguf", "q8_0")
    assert gguf.GGUFReader(path).fields["tokenizer.ggml.pre"].parts[-1].tobytes().decode() == "smollm"  # as the source
    reference, _ = load_model("smollm2-135m")
    q8_0_linears(reference)
    with torch.no_grad():  # the file keeps the embedding in f16
        reference.get_input_embeddings().weight.copy_(reference.get_input_embeddings().weight.half().float())
    prompt = tokenizer("The capital of France is Paris, and the capital of Italy is").input_ids
    assert llama_cpp_greedy(path, prompt, 16) == llmlab_greedy(reference, tokenizer, prompt, 16)
