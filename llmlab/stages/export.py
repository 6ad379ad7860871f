"""`llmlab export gguf`: write a llama-architecture model as a GGUF file (f32, f16, q8_0, q4_0)."""

import dataclasses
from pathlib import Path

from llmlab.compress.gguf_export import check_qtype, export_gguf
from llmlab.config import field
from llmlab.errors import LlmlabError
from llmlab.models import load_model


@dataclasses.dataclass
class ExportConfig:
    """The file to write is the common --out option (default: <model name>.<qtype>.gguf)."""
    model: str = field("smollm2-135m", help="model spec: built-in name, folder (also a quantized one), run folder")
    qtype: str = field("q8_0", help="tensor type of the linear weights: f32, f16, q8_0 or q4_0")

    def __post_init__(self):
        check_qtype(self.qtype)


def export_verb(cfg: ExportConfig, opts=None) -> dict:
    """`llmlab export gguf --model M --qtype q8_0 --out FILE.gguf`: write the GGUF, report its size."""
    path = Path(getattr(opts, "out", None) or f"{Path(cfg.model).name}.{cfg.qtype}.gguf")
    if path.suffix != ".gguf":
        raise LlmlabError(f"--out must name a .gguf file, got '{path}'")
    model, tokenizer = load_model(cfg.model)
    export_gguf(model, tokenizer, path, cfg.qtype)
    size = path.stat().st_size
    print(f"exported {cfg.model} as {cfg.qtype} -> {path} ({size / 2**20:.1f} MiB)")
    return {"model": cfg.model, "qtype": cfg.qtype, "gguf": str(path), "bytes": size}
