import pytest
import torch

from llmlab.errors import LlmlabError
from llmlab.models import decoder_layers, load_model, save_model

EXPECTED_BLOCKS = {"tiny-llama": "LlamaDecoderLayer", "tiny-qwen2": "Qwen2DecoderLayer",
                   "tiny-mistral": "MistralDecoderLayer", "tiny-gpt2": "GPT2Block",
                   "tiny-opt": "OPTDecoderLayer", "tiny-gpt-neox": "GPTNeoXLayer"}


@pytest.mark.parametrize("name", sorted(EXPECTED_BLOCKS))
def test_decoder_layers_finds_the_blocks_of_every_family(name):
    model, _ = load_model(name)
    layers = decoder_layers(model)
    assert type(layers[0]).__name__ == EXPECTED_BLOCKS[name]
    assert len(layers) == 2 and all(type(x) is type(layers[0]) for x in layers)


def test_tiny_models_are_deterministic_and_tokenizer_round_trips():
    (a, tok), (b, _) = load_model("tiny-llama"), load_model("tiny-llama")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    text = "héllo 世界 <|im_end|>"
    assert tok.decode(tok(text).input_ids) == text
    assert tok.convert_tokens_to_ids("<|im_end|>") == tok.eos_token_id


@pytest.mark.parametrize("dtype, expected", [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_dtypes(dtype, expected):
    model, _ = load_model("tiny-gpt2", dtype=dtype)
    assert next(model.parameters()).dtype == expected


def test_save_and_load_round_trip_gives_the_same_logits(tmp_path, tiny_llama):
    model, tok = tiny_llama
    out = save_model(model, tok, tmp_path / "m")
    assert (out / "model.safetensors").is_file() and (out / "generation_config.json").is_file()
    assert (out / "tokenizer_config.json").is_file()
    loaded, tok2 = load_model(str(out))
    ids = tok("some text", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert tok2("some text").input_ids == tok("some text").input_ids
    assert not list(tmp_path.glob(".m.*")), "no temporary folder left behind"


def test_run_folder_loads_its_model(tmp_path, tiny_llama):
    model, tok = tiny_llama
    save_model(model, tok, tmp_path / "run" / "model")
    (tmp_path / "run" / "summary.json").write_text("{}")
    loaded, _ = load_model(str(tmp_path / "run"))
    assert type(loaded) is type(model)


def test_unknown_name_and_missing_path(tmp_path):
    with pytest.raises(LlmlabError, match=r"unknown model 'tiny-lama' \(did you mean 'tiny-llama'\?\)"):
        load_model("tiny-lama")
    with pytest.raises(LlmlabError, match="model path not found: ./nowhere/model"):
        load_model("./nowhere/model")
    with pytest.raises(LlmlabError, match="not a model folder: it has no config.json"):
        load_model(str(tmp_path))


def test_truncated_safetensors_is_named(tmp_path, tiny_llama):
    out = save_model(*tiny_llama, tmp_path / "m")
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(LlmlabError, match=r"model.safetensors is corrupt or truncated"):
        load_model(str(out))
    weights.write_bytes(b"garbage")
    with pytest.raises(LlmlabError, match=r"model.safetensors is corrupt or truncated"):
        load_model(str(out))


def test_pickled_weights_are_refused(tmp_path, tiny_llama):
    out = save_model(*tiny_llama, tmp_path / "m")
    (out / "model.safetensors").rename(out / "pytorch_model.bin")
    with pytest.raises(LlmlabError, match="pickled weights"):
        load_model(str(out))


def test_truncated_gguf_is_named(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 10)
    with pytest.raises(LlmlabError, match="broken.gguf is not a readable GGUF file"):
        load_model(str(path))


def test_hub_id_offline_fails_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LlmlabError, match="could not get 'someone/no-such-model' from the Hugging Face hub"):
        load_model("someone/no-such-model")


def test_cuda_without_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(LlmlabError, match="sees no CUDA GPU"):
        load_model("tiny-llama", device="cuda")
