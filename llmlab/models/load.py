"""`load_model(spec) -> (model, tokenizer)` for every kind of model llmlab knows, and `save_model`.

A spec is one of
    smollm2-135m               the built-in model (default)
    tiny-llama, tiny-gpt2, …   tiny random models for tests
    path/to/hf-folder          a saved transformers model (safetensors)
    path/to/model.gguf         a GGUF file, de-quantized by transformers
    runs/<name>                a run folder: the model that run wrote
    org/name                   a Hugging Face hub id (needs the network)
"""

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmlab.atomic import atomic_dir
from llmlab.config import field
from llmlab.errors import LlmlabError, closest
from llmlab.models.builtin import BUILTIN_HUB_ID, BUILTIN_NAME, builtin_folder, builtin_gguf
from llmlab.models.dtypes import DTYPES, resolve_device, resolve_dtype  # noqa: F401  (re-exported)
from llmlab.models.packed.io import LOWRANK_MARKER, MARKER, load_decomposed, load_quantized
from llmlab.models.tiny import tiny_configs, tiny_model


@dataclass
class ModelOptions:
    """The model section every verb shares (`--model`, `--dtype`, `--device`); a verb's config derives from it."""
    model: str = field(BUILTIN_NAME, help="model: built-in name, HF folder (packed ones too), .gguf file, run folder "
                                          "or hub id")
    dtype: str = field("fp32", help="weights' dtype: fp32, bf16 or fp16")
    device: str = field("cpu", help="cpu, cuda, cuda:N or auto")

    def load_model(self):
        """(model, tokenizer) as the section says."""
        return load_model(self.model, self.dtype, self.device)


def model_names() -> list[str]:
    return [BUILTIN_NAME, *tiny_configs()]


def load_model(spec: str = BUILTIN_NAME, dtype: str | torch.dtype = "fp32", device: str = "cpu"):
    """Load a causal LM and its tokenizer, in eval mode, on `device`, in `dtype`."""
    dtype, device = resolve_dtype(dtype), resolve_device(device)
    model, tokenizer = _load(str(spec), dtype)
    model = model.to(device=device, dtype=dtype).eval()
    # The name other tools know the model by (peft's base_model_name_or_path): the hub id of the built-in
    # model rather than its cache folder, the name a user gave for a tiny one; a folder or hub id stays.
    if str(spec) == BUILTIN_NAME:
        model.config._name_or_path = BUILTIN_HUB_ID
    elif str(spec) in tiny_configs():
        model.config._name_or_path = str(spec)
    if tokenizer.pad_token is None:  # batching needs one; EOS is the usual stand-in
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _load(spec: str, dtype: torch.dtype):
    path = Path(spec).expanduser()
    if spec == BUILTIN_NAME:
        model, tokenizer = _load_folder(builtin_folder(_convert_gguf), dtype)
        if not getattr(model.config, "gguf_pre_tokenizer", None):  # a cache converted before llmlab kept it
            model.config.gguf_pre_tokenizer = gguf_pre_tokenizer(builtin_gguf())
        return model, tokenizer
    if spec in tiny_configs():
        return tiny_model(spec)
    if path.is_file() and path.suffix == ".gguf":
        return _load_gguf(path, dtype)
    if path.is_dir():
        return _load_folder(_model_folder(path), dtype)
    if path.exists():
        raise LlmlabError(f"{spec} is neither a model folder nor a .gguf file")
    if _looks_like_hub_id(spec):
        return _load_hub(spec, dtype)
    if "/" in spec or "\\" in spec or path.suffix:
        raise LlmlabError(f"model path not found: {spec}")
    raise LlmlabError(f"unknown model '{spec}'{closest(spec, model_names())}; give a built-in name "
                      f"({', '.join(model_names())}), a model folder, a .gguf file or a hub id")


def _model_folder(path: Path) -> Path:
    """A run folder keeps its model in `model/`; any other folder must be an HF folder itself."""
    if (path / "config.json").is_file():
        return path
    if (path / "model" / "config.json").is_file():
        return path / "model"
    if (path / "summary.json").is_file():
        raise LlmlabError(f"run folder {path} holds no model (no {path / 'model'}/config.json)")
    raise LlmlabError(f"{path} is not a model folder: it has no config.json")


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "~")) and "." not in parts[0]


@contextlib.contextmanager
def _reading(what: str):
    """Turn the many ways a damaged model file fails into one clear message."""
    try:
        yield
    except LlmlabError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, IndexError, EOFError, TypeError) as e:
        raise LlmlabError(f"could not load {what}: {_first_line(e)} — the file may be corrupt or truncated; "
                          "re-download or re-save it") from None


def _load_folder(folder: Path, dtype: torch.dtype):
    _check_safetensors(folder)
    if (folder / MARKER).is_file():  # packed layers (quantized, low-rank, LoRC): rebuilt by models.packed
        return load_quantized(folder, dtype)
    if (folder / LOWRANK_MARKER).is_file():  # factored linears, as written before the packed folder knew them
        return load_decomposed(folder, dtype)
    with _reading(f"model folder {folder}"):
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    return model, tokenizer


def _check_safetensors(folder: Path):
    """Open every shard's header first: a truncated shard then fails here, named, not deep in transformers."""
    from safetensors import safe_open

    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
            raise LlmlabError(f"{folder} holds pickled weights (.bin/.pt), which llmlab does not load "
                              "for safety; convert them to safetensors")
        raise LlmlabError(f"{folder} has no *.safetensors weights")
    for shard in shards:
        try:
            with safe_open(shard, framework="pt") as f:
                keys = list(f.keys())
                if keys:
                    f.get_slice(keys[-1])
            _check_size(shard)
        except Exception as e:  # safetensors raises its own error type from Rust
            raise LlmlabError(f"{shard} is corrupt or truncated ({_first_line(e)}); re-download or re-save it") from None


def _check_size(shard: Path):
    """The header says where the last tensor ends; a shorter file was cut off."""
    with open(shard, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if shard.stat().st_size < 8 + n + end:
        raise ValueError(f"file is {shard.stat().st_size} bytes, header needs {8 + n + end}")


def _load_gguf(path: Path, dtype: torch.dtype):
    _check_gguf(path)
    with _reading(f"GGUF file {path}"):
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    # llama.cpp's name for the source's pre-tokenizer (e.g. "smollm"), which transformers' conversion does
    # not keep; a GGUF export writes it back. Saved with the config, so derived folders keep it too.
    model.config.gguf_pre_tokenizer = gguf_pre_tokenizer(path)
    # The weights are now plain floats: forget the GGUF origin so that save_model writes a normal folder.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    return model, tokenizer


def gguf_pre_tokenizer(path: Path) -> str | None:
    """The `tokenizer.ggml.pre` a GGUF file names, or None."""
    from gguf import GGUFReader

    field = GGUFReader(path).fields.get("tokenizer.ggml.pre")
    return bytes(field.parts[-1]).decode("utf-8") if field is not None else None


def _check_gguf(path: Path):
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
        end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
        if end > path.stat().st_size:
            raise ValueError(f"file is {path.stat().st_size} bytes, its tensors end at {end}")
    except Exception as e:  # gguf raises ValueError, IndexError or numpy errors on damaged files
        raise LlmlabError(f"{path} is not a readable GGUF file ({_first_line(e)}); it may be truncated") from None


def _load_hub(hub_id: str, dtype: torch.dtype):
    try:
        tokenizer = AutoTokenizer.from_pretrained(hub_id)
        model = AutoModelForCausalLM.from_pretrained(hub_id, dtype=dtype, use_safetensors=True)
    except OSError as e:
        raise LlmlabError(f"could not get '{hub_id}' from the Hugging Face hub ({_first_line(e)}); check the id and "
                          "your network, or pass a local model folder or .gguf file") from None
    return model, tokenizer


def _convert_gguf(gguf: Path, out: Path):
    model, tokenizer = _load_gguf(gguf, torch.float32)
    save_model(model, tokenizer, out)


def save_model(model, tokenizer, out: str | Path) -> Path:
    """Write a standard HF folder (safetensors, config, generation config, tokenizer) atomically."""
    out = Path(out)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out


def _first_line(error: Exception) -> str:
    """Library errors can run to pages; the first line says what went wrong."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def context_length(model) -> int | None:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    return None
