"""Save a compressed model as an HF folder with its packed weights, and load it back.

The folder is a normal transformers folder (config.json, generation_config.json, the tokenizer,
model.safetensors) whose state dict holds each quantized layer's packed buffers (qweight,
scales, zeros, …) in place of its float weight, plus `llmlab_quantization.json`, which lists
every module that was swapped for another:

    {"format": 1, "method": "gptq", "modules": {"model.layers.0.self_attn.q_proj": {"kind": "weight_only",
                                                                                   "bits": 4, ...}, ...}}

A kind is a quantized layer or a wrapper of lowrank.py that holds other linears (`LAYERS` below,
a static table from kind to class), listed before the modules inside it, so that methods compose on disk too:

    decompose → quantize   "…q_proj": {"kind": "lowrank", "rank": 16},   (and "lowrank": "svd" at the top)
                           "…q_proj.v": {"kind": "weight_only", …}, "…q_proj.u": {"kind": "weight_only", …}
    quantize → LoRC        "…q_proj": {"kind": "lorc", "rank": 8},
                           "…q_proj.base_layer": {"kind": "weight_only", …}   (its float …q_proj.u/.v: plain tensors)

A plain decomposed model is such a folder with "method": null. Loading builds the model with its
parameters on the meta device (no float weights are ever allocated), swaps each listed module,
outermost first, for `<kind's class>.empty(in, out, bias, **options)`, assigns the tensors of the
file, and ties the embeddings again. `load_model(folder)` does this whenever the marker file is
there, so every verb takes a compressed folder as its model.
"""

import json
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from transformers.pytorch_utils import Conv1D

from llmlab.atomic import atomic_dir, atomic_write_json
from llmlab.errors import LlmlabError, closest
from llmlab.models.dtypes import resolve_dtype
from llmlab.models.packed import ecosystem
from llmlab.models.packed.lowrank import LoRCLinear, LowRankLinear
from llmlab.models.packed.nf4 import NF4Linear
from llmlab.models.packed.qlinear import QuantizedLinear, QuantLinear, quantized_linears
from llmlab.models.packed.w8a8 import LLMInt8Linear, W8A8Linear
from llmlab.models.surgery import set_module

MARKER = "llmlab_quantization.json"
WEIGHTS = "model.safetensors"
FORMAT = 1
# kind -> the class that rebuilds it: `LAYERS[kind].empty(in, out, bias, **options)`
LAYERS = {cls.kind: cls for cls in (QuantLinear, NF4Linear, W8A8Linear, LLMInt8Linear, LowRankLinear, LoRCLinear)}
WRAPPERS = (LowRankLinear, LoRCLinear)  # the kinds that hold other linears


def save_quantized(model, tokenizer, out: str | Path, method: str | None = None) -> Path:
    """Write the compressed model, its tokenizer and the marker file into `out`, atomically.

    Weight-only integer layers are written as compressed-tensors, which transformers and vLLM load;
    any other packed layer makes the folder an llmlab-only architecture (see ecosystem.py)."""
    out = Path(out)
    modules = _swapped_modules(model)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, (QuantizedLinear, *WRAPPERS))}
    kinds = sorted({m.kind for m in quantized_linears(model).values()})
    method = method or getattr(model, "llmlab_quant_method", None) or "+".join(kinds) or None
    marker = {"format": FORMAT, "method": method, "modules": modules}
    if any(m["kind"] == "lowrank" for m in modules.values()):
        marker["lowrank"] = getattr(model, "llmlab_lowrank", {}).get("method")
    tensors = _unique_tensors(model.state_dict())
    config = model.config.to_dict()
    compressed = ecosystem.compressible(layers)
    if compressed:
        marker["tensors"] = "compressed-tensors"
        tensors = _compressed_tensors(tensors, layers, model.get_input_embeddings().weight.dtype)
        config["quantization_config"] = ecosystem.quantization_config(layers)
    elif layers:
        config = {**config, "model_type": ecosystem.PACKED_TYPE, "llmlab_model_type": config["model_type"],
                  "architectures": ["LlmlabPackedForCausalLM"],
                  "auto_map": {"AutoConfig": f"{ecosystem.REMOTE_MODULE}.LlmlabPackedConfig",
                               "AutoModelForCausalLM": f"{ecosystem.REMOTE_MODULE}.LlmlabPackedForCausalLM"}}
    with atomic_dir(out) as tmp:
        atomic_write_json(tmp / "config.json", config)
        if layers and not compressed:
            (tmp / f"{ecosystem.REMOTE_MODULE}.py").write_text(ecosystem.REMOTE_CODE, encoding="utf-8")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        save_file(tensors, tmp / WEIGHTS, metadata={"format": "pt"})
        atomic_write_json(tmp / MARKER, marker)
    return out


def _compressed_tensors(tensors: dict, layers: dict, dtype: torch.dtype) -> dict:
    """The state dict with each quantized layer's llmlab buffers replaced by its compressed-tensors tensors."""
    for name, layer in layers.items():
        for key in ("qweight", "scales", "zeros", "bias"):
            tensors.pop(f"{name}.{key}", None)
        tensors.update({f"{name}.{key}": value for key, value in ecosystem.layer_tensors(layer, dtype).items()})
    return tensors


def _swapped_modules(model) -> dict:
    """name -> {"kind", **options} of every quantized layer and wrapper; named_modules lists a wrapper
    before the modules inside it."""
    classes = (QuantizedLinear, *WRAPPERS)
    return {name: {"kind": m.kind, **m.config()} for name, m in model.named_modules() if isinstance(m, classes)}


def _unique_tensors(state: dict) -> dict:
    """The state dict without the second name of a tied tensor (safetensors refuses shared memory);
    loading ties them again. The first name (the input embedding) is the one kept."""
    seen, unique = set(), {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        unique[name] = tensor.detach().contiguous()
    return unique


def is_quantized_folder(folder: str | Path) -> bool:
    return (Path(folder) / MARKER).is_file()


def load_quantized(folder: str | Path, dtype: str | torch.dtype = "fp32"):
    """(model, tokenizer) from a folder written by save_quantized; float tensors in `dtype`."""
    return load_with_marker(Path(folder), _read_marker(Path(folder)), dtype)


def load_with_marker(folder: Path, marker: dict, dtype: str | torch.dtype = "fp32"):
    """(model, tokenizer) from the folder's config and tensors, with the modules `marker` lists swapped in."""
    dtype = resolve_dtype(dtype)
    config = _read_config(folder)
    with init_empty_weights(include_buffers=False):  # parameters on meta; buffers (rotary tables) computed
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name, options in sorted(marker["modules"].items(), key=lambda item: item[0].count(".")):  # outermost first
        _swap_in(model, name, dict(options), folder)
    if marker.get("tensors") == "compressed-tensors":
        _fill_compressed(model, marker, folder)
    model.load_state_dict(_read_tensors(folder, model, dtype), strict=False, assign=True)
    model.tie_weights()
    _check_loaded(model, folder)
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    model.llmlab_quant_method = marker.get("method")
    ranks = {name: m["rank"] for name, m in marker["modules"].items() if m.get("kind") == "lowrank"}
    if ranks:
        model.llmlab_lowrank = {"method": marker.get("lowrank"), "modules": ranks}
    return model.eval(), AutoTokenizer.from_pretrained(folder)


def _read_config(folder: Path):
    """The model's transformers config: an llmlab-only folder names its real model type inside."""
    data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if data.get("model_type") == ecosystem.PACKED_TYPE:
        for key in ("model_type", "auto_map", "architectures"):
            data.pop(key, None)
        config = AutoConfig.for_model(data.pop("llmlab_model_type"), **data)
    else:
        config = AutoConfig.from_pretrained(folder)
    if hasattr(config, "quantization_config"):  # compressed-tensors' description; llmlab rebuilds the layers
        del config.quantization_config
    return config


def _fill_compressed(model, marker: dict, folder: Path):
    """Set each weight-only layer's buffers from its compressed-tensors tensors in the file; a missing or
    mis-shaped tensor is named."""
    names = [n for n, m in marker["modules"].items() if m.get("kind") == QuantLinear.kind]
    with safe_open(folder / WEIGHTS, framework="pt") as f:
        present = set(f.keys())
        for name in names:
            layer = model.get_submodule(name)
            expected = ecosystem.expected_shapes(layer)
            tensors = {}
            for key in ("weight_packed", "weight_scale", "weight_zero_point", "bias"):
                full = f"{name}.{key}"
                if full not in present:
                    if key in expected:
                        raise LlmlabError(f"{folder / WEIGHTS} has no tensor '{full}'{_what(full)}; the file is "
                                          "incomplete: save the model again")
                    continue
                tensors[key] = f.get_tensor(full)
                if key in expected and tuple(tensors[key].shape) != expected[key]:
                    raise LlmlabError(f"{folder / WEIGHTS}: tensor '{full}' has shape {tuple(tensors[key].shape)}, "
                                      f"the model needs {expected[key]}; the file does not match its config")
            ecosystem.fill_layer(layer, tensors)


def _read_marker(folder: Path) -> dict:
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise LlmlabError(f"{folder / MARKER} is not readable JSON ({e}); re-run `llmlab quantize`") from None
    if not isinstance(marker, dict) or marker.get("format") != FORMAT or not isinstance(marker.get("modules"), dict):
        raise LlmlabError(f"{folder / MARKER} is not an llmlab quantization file of format {FORMAT}")
    return marker


def _swap_in(model, name: str, options: dict, folder: Path):
    """Replace the float module `name` (still on meta) by an empty quantized layer or wrapper of its shape."""
    kind = options.pop("kind", None)
    cls = _layer_class(kind, folder)
    try:
        old = model.get_submodule(name)
    except AttributeError:
        raise LlmlabError(f"{folder / MARKER} names module '{name}', which this model "
                          f"({type(model).__name__}) does not have") from None
    out_features, in_features = old.weight.shape[::-1] if isinstance(old, Conv1D) else old.weight.shape
    try:
        with torch.device("meta"):  # every tensor of the layer must then come from the file
            layer = cls.empty(in_features, out_features, old.bias is not None, **options)
    except TypeError as e:
        raise LlmlabError(f"{folder / MARKER}: bad options for {name} ({e})") from None
    set_module(model, name, layer)


def _layer_class(kind, folder: Path):
    if kind not in LAYERS:
        raise LlmlabError(f"{folder / MARKER} uses module kind '{kind}', which this llmlab does not know"
                          f"{closest(str(kind), LAYERS)}; known kinds: {', '.join(LAYERS)}")
    return LAYERS[kind]


def _read_tensors(folder: Path, model, dtype: torch.dtype) -> dict:
    """Every tensor the model expects, from the folder's safetensors files (one, or the shards of an
    older decomposed folder): a missing or mis-shaped one is named."""
    expected, tensors = model.state_dict(), {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            for name in [n for n in f.keys() if n in expected]:
                t = f.get_tensor(name)
                if tuple(t.shape) != tuple(expected[name].shape):
                    raise LlmlabError(f"{shard}: tensor '{name}' has shape {tuple(t.shape)}, the model "
                                      f"needs {tuple(expected[name].shape)}; the file does not match its config")
                tensors[name] = t.to(dtype) if t.is_floating_point() else t
    for name, want in expected.items():  # tied copies and computed buffers (not on meta) need no data
        if name not in tensors and want.device.type == "meta" and not _is_tied(model, name):
            raise LlmlabError(f"{folder / WEIGHTS} has no tensor '{name}'{_what(name)}; the file is incomplete: "
                              "save the model again")
    return tensors


def _is_tied(model, name: str) -> bool:
    """Whether `name` is the second name of a tied parameter (the output embedding, usually)."""
    tied = model.get_expanded_tied_weights_keys(all_submodels=True) if hasattr(
        model, "get_expanded_tied_weights_keys") else {}
    return name in tied


def _what(name: str) -> str:
    role = {"scales": "the scales", "zeros": "the zero points", "qweight": "the packed weights",
            "weight_scale": "the scales", "weight_zero_point": "the zero points",
            "weight_packed": "the packed weights"}.get(name.rsplit(".", 1)[-1])
    return f" ({role} of a quantized layer)" if role else ""


def _check_loaded(model, folder: Path):
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.device.type == "meta":
            raise LlmlabError(f"{folder / WEIGHTS} has no tensor '{name}'; the file is incomplete: save the model again")


LOWRANK_MARKER = "llmlab_lowrank.json"  # the marker of decomposed folders written before io.py knew low-rank layers


def save_decomposed(model, tokenizer, out: str | Path) -> Path:
    """io.py's folder (config, tokenizer, safetensors with the factors, the marker listing each LowRankLinear)."""
    return save_quantized(model, tokenizer, out)


def load_decomposed(folder: str | Path, dtype: str | torch.dtype = "fp32"):
    """(model, tokenizer) from a decomposed folder: io.py's, or one with the older llmlab_lowrank.json."""
    folder = Path(folder)
    if is_quantized_folder(folder):
        return load_quantized(folder, dtype)
    try:  # {"format": 1, "method": "svd", "modules": {name: {"rank": k, "in": n, "out": m}}}
        old = json.loads((folder / LOWRANK_MARKER).read_text(encoding="utf-8"))
        modules = {name: {"kind": "lowrank", "rank": int(m["rank"])} for name, m in old["modules"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise LlmlabError(f"{folder / LOWRANK_MARKER} is not a readable llmlab low-rank file ({e}); decompose again") from None
    return load_with_marker(folder, {"method": None, "lowrank": old.get("method"), "modules": modules}, dtype)
