"""Export a llama-architecture model to GGUF, the single-file format of llama.cpp.

https://github.com/ggml-org/ggml/blob/master/docs/gguf.md

A GGUF file holds key-value metadata (architecture hyper-parameters, the tokenizer: tokens, BPE
merges, token types, special ids, chat template) and named tensors, each in a ggml type. The two
block formats written here cut each weight row into blocks of 32 with one fp16 scale d per block
(llama.cpp's ggml-quants.c, bit-exact in the `gguf` package's `gguf.quants`):

    Q8_0   d = max|w| / 127,                   q = round(w / d) ∈ [−127, 127],        w ≈ d·q        8.5 bits/weight
    Q4_0   d = m / −8 (m: the w of largest |w|), q = min(15, ⌊w / d + 8.5⌋) ∈ [0, 15],  w ≈ d·(q − 8)  4.5 bits/weight

Tensors follow llama.cpp's names (`blk.N.attn_q.weight`, …) and its q/k row order: llama.cpp's
RoPE rotates adjacent pairs (x₀, x₁), transformers' rotates halves (x_i, x_{i+d/2}), so the converter
interleaves the rows of W_q and W_k per head (`permute` below, the inverse of the one transformers
undoes on load, modeling_gguf_pytorch_utils.LlamaTensorProcessor). Row permutations commute with
row-blocked quantization, so the permuted Q8_0 weight is the Q8_0 weight permuted.

Norms stay F32. Token embeddings and an untied output head are written F16 in the quantized and f16
files (llmlab never quantizes embeddings), F32 in an f32 file; a weight whose rows are not a multiple
of 32 falls back to F16 as in llama.cpp. `q8_0_linears(model)` makes the matching llmlab model:
QuantLinear layers holding exactly the Q8_0 grid.
"""

import json
import os
import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import Tensor, nn

from llmlab.compress.calibrate import linears_of
from llmlab.errors import LlmlabError, closest
from llmlab.models.layers import decoder_layers
from llmlab.models.packed.qlinear import QuantLinear
from llmlab.models.packed.quant import QuantSpec
from llmlab.models.surgery import set_module

QTYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
          "q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
LLAMA_LIKE = ("llama", "mistral")  # decoders llama.cpp runs as its "llama" architecture
BLOCK = 32  # weights per Q8_0 / Q4_0 block


def check_qtype(qtype: str):
    if qtype not in QTYPES:
        raise LlmlabError(f"unsupported GGUF qtype '{qtype}'{closest(qtype, QTYPES)}; use one of {', '.join(QTYPES)}")


def export_gguf(model: nn.Module, tokenizer, path: str | Path, qtype: str = "q8_0") -> Path:
    """Write `model` (float or llmlab-quantized linears, dequantized first) and its tokenizer as GGUF.

    Atomic: the file appears complete or not at all.
    """
    check_qtype(qtype)
    config = check_llama_like(model)
    tensors = gguf_tensors(model, qtype)  # before any file exists: bad input leaves nothing behind
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, "llama")
        _write_hparams(writer, config, qtype)
        _write_tokenizer(writer, tokenizer, config.vocab_size, getattr(config, "gguf_pre_tokenizer", None))
        for name, (data, ggml_type) in tensors.items():
            writer.add_tensor(name, data, raw_dtype=ggml_type if data.dtype == np.uint8 else None)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp made it private; the finished file gets the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def check_llama_like(model: nn.Module):
    """The model's config, if llama.cpp's llama architecture describes the model exactly."""
    config = model.config
    kind = getattr(config, "model_type", type(model).__name__)
    problem = None
    if kind not in LLAMA_LIKE:
        problem = f"architecture '{kind}' is not llama-like ({', '.join(LLAMA_LIKE)})"
    elif getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        problem = "it has linear biases, which llama.cpp's llama architecture lacks"
    elif getattr(config, "hidden_act", "silu") != "silu":
        problem = f"its activation is {config.hidden_act}, not silu"
    elif getattr(config, "sliding_window", None):
        problem = "it uses sliding-window attention"
    elif _rope(config).get("rope_type", "default") != "default":
        problem = f"its RoPE scaling ({_rope(config)['rope_type']}) is not exported"
    if problem:
        raise LlmlabError(f"cannot export to GGUF: {problem}")
    return config


def _rope(config) -> dict:
    return getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _write_hparams(writer: gguf.GGUFWriter, config, qtype: str):
    # not the bare model type: transformers reads a GGUF named exactly "mistral" with a loader gguf-py lacks
    writer.add_name(Path(getattr(config, "_name_or_path", "")).name or f"llmlab-{config.model_type}")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_rope_dimension_count(_head_dim(config))
    if _head_dim(config) != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(_head_dim(config))  # llama.cpp assumes hidden / heads unless told
        writer.add_value_length(_head_dim(config))
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(_rope(config).get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(FILE_TYPES[qtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


# ---- tensors ----

def permute(w: Tensor, n_head: int) -> Tensor:
    """llama.cpp's q/k row order: per head, rows (0, d/2, 1, d/2+1, …) — pairs instead of halves."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def float_tensors(model: nn.Module) -> dict[str, Tensor]:
    """HF name -> float tensor; a quantized linear gives its dequantized weight, a tied head nothing."""
    tensors, seen = {}, set()
    for prefix, module in model.named_modules():
        if callable(getattr(type(module), "dequantized_weight", None)):
            params = {"weight": module.dequantized_weight()}
            params.update({"bias": module.bias} if module.bias is not None else {})
        else:
            params = dict(module.named_parameters(recurse=False))
        for key, value in params.items():
            if id(value) not in seen:  # a tied lm_head shares the embedding's Parameter
                seen.add(id(value))
                tensors[f"{prefix}.{key}" if prefix else key] = value.detach().float().cpu()
    return tensors


def gguf_tensors(model: nn.Module, qtype: str) -> dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType]]:
    """GGUF name -> (data as written, ggml type), in the model's order."""
    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    out = {}
    for hf_name, tensor in float_tensors(model).items():
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise LlmlabError(f"cannot export tensor '{hf_name}' to GGUF: llama.cpp has no name for it "
                              f"(merge or remove adapters first: llmlab merge)")
        if hf_name.endswith("q_proj.weight"):
            tensor = permute(tensor, n_head)
        elif hf_name.endswith("k_proj.weight"):
            tensor = permute(tensor, n_kv)
        out[gguf_name] = _encode(tensor, _ggml_type(gguf_name, tensor, qtype))
    return out


def _ggml_type(name: str, tensor: Tensor, qtype: str) -> gguf.GGMLQuantizationType:
    if tensor.ndim == 1 or qtype == "f32":
        return QTYPES["f32"]
    if name.startswith(("token_embd.", "output.")) or tensor.shape[-1] % BLOCK:
        return QTYPES["f16"]
    return QTYPES[qtype]


def _encode(tensor: Tensor, ggml_type: gguf.GGMLQuantizationType) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    data = tensor.numpy().astype(np.float32)
    if ggml_type == QTYPES["f32"]:
        return data, ggml_type
    if ggml_type == QTYPES["f16"]:
        return data.astype(np.float16), ggml_type
    return gguf.quants.quantize(data, ggml_type), ggml_type  # uint8 (rows, bytes per row)


def q8_0_grid(w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, scale, zero of w (out, in) on the Q8_0 grid, bit-exact with gguf.quants, in QuantLinear's
    unsigned form (symmetric 8-bit: signed value q − 128): q uint8 (out, in), scale, zero (out, in/32)."""
    blocks = w.detach().float().reshape(w.shape[0], -1, BLOCK)  # (out, G, 32)
    d = blocks.abs().amax(-1) / 127  # (out, G) float32, as ggml computes it
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    x = blocks * inv[..., None]
    q = torch.sign(x) * torch.floor(x.abs() + 0.5)  # ggml's roundf: halves away from zero
    scale = d.half().float()  # the file keeps d as fp16
    return (q + 128).to(torch.uint8).reshape(w.shape), scale, torch.full_like(scale, 128)


def q8_0_linears(model: nn.Module) -> nn.Module:
    """Swap every decoder-layer nn.Linear for a QuantLinear on the Q8_0 grid: the model a Q8_0 export
    describes, apart from its f16 embeddings. In place; returns the model."""
    spec = QuantSpec(bits=8, group_size=BLOCK, symmetric=True)
    for layer in decoder_layers(model):
        for name, linear in linears_of(layer).items():
            if linear.in_features % BLOCK == 0:
                set_module(layer, name, QuantLinear.from_float(linear, spec, *q8_0_grid(linear.weight)))
    return model


# ---- tokenizer ----

def _write_tokenizer(writer: gguf.GGUFWriter, tokenizer, vocab_size: int, pre: str | None = None):
    """A byte-level BPE tokenizer as llama.cpp's "gpt2" model: tokens, merges, types, special ids, template."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str()) if hasattr(tokenizer, "backend_tokenizer") else {}
    if backend.get("model", {}).get("type") != "BPE" or "ByteLevel" not in json.dumps(backend.get("decoder")):
        raise LlmlabError("GGUF export writes byte-level BPE tokenizers (GPT-2 style, llama.cpp's 'gpt2'); "
                          f"this model's tokenizer is {type(tokenizer).__name__}")
    tokens, types = _vocabulary(tokenizer, backend, vocab_size)
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend["model"].get("merges") or []]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre or _pre_tokenizer(backend))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges or [_inert_merge(tokens, types)])
    for token, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                       ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        token_id = getattr(tokenizer, f"{token}_token_id", None)
        if token_id is not None:
            add(token_id)
    bos = tokenizer.bos_token_id
    writer.add_add_bos_token(bos is not None and tokenizer("a").input_ids[:1] == [bos])
    writer.add_add_space_prefix(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _inert_merge(tokens: list[str], types: list[int]) -> str:
    """A merge that never applies, for a byte vocabulary without merges (tiny test models): llama.cpp's BPE
    needs a merges array, GGUF writers drop empty arrays, and readers (transformers) want every merge's
    result to be a token. So an unused padding slot becomes "a1", merged from "a" and "1": GPT-2's
    pre-tokenizer splits letters from digits, so no text ever reaches that merge."""
    unused = [i for i, kind in enumerate(types) if kind == int(gguf.TokenType.UNUSED)]
    if not unused or "a" not in tokens or "1" not in tokens:
        raise LlmlabError("GGUF export: this byte-level tokenizer has no merges and no unused embedding row to "
                          "hold the placeholder merge llama.cpp needs")
    tokens[unused[-1]] = "a1"
    return "a 1"


def _vocabulary(tokenizer, backend: dict, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens by id, padded with unused [PADn] up to the embedding's rows (as llama.cpp's converter does)."""
    vocab = tokenizer.get_vocab()
    if len(vocab) > vocab_size:
        raise LlmlabError(f"the tokenizer has {len(vocab)} tokens but the model only {vocab_size} embeddings")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [int(gguf.TokenType.UNUSED)] * vocab_size
    for token, index in vocab.items():
        tokens[index], types[index] = token, int(gguf.TokenType.NORMAL)
    for added in backend.get("added_tokens", []):
        types[added["id"]] = int(gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED)
    return tokens, types


def _pre_tokenizer(backend: dict) -> str:
    """llama.cpp's name for how text is split before BPE, for a model that did not come from a GGUF (which
    names it itself): digits one by one first (SmolLM's tokenizer), else GPT-2's regex."""
    pre = json.dumps(backend.get("pre_tokenizer"))
    return "smollm" if '"individual_digits": true' in pre else "gpt-2"
