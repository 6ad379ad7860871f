"""The student: the teacher with layers dropped, a model folder (e.g. a structurally pruned one), or a
fresh small model with the teacher's tokenizer.

Layer dropping keeps `layers` of the teacher's L decoder blocks, evenly spaced and always the first
and the last, i_k = round(k (L − 1) / (n − 1)) for k = 0 … n − 1 (DistilBERT kept every other layer,
Sanh et al. 2019, https://arxiv.org/abs/1910.01108). The kept blocks keep their weights; embeddings,
final norm and head are copied too, so the student starts close to the teacher.

Distillation matches distributions token by token, so teacher and student must share one
vocabulary: `check_tokenizers` compares the vocabularies themselves (token → id), not the objects.
"""

import copy
import dataclasses
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from llmlab.config import field
from llmlab.errors import LlmlabError
from llmlab.models import decoder_layers, load_model
from llmlab.models.surgery import set_module

SOURCES = ("drop", "fresh")  # any other value is a model spec, loaded with load_model


@dataclasses.dataclass
class StudentConfig:
    source: str = field("drop", help="drop (teacher minus layers), fresh (new random model with the teacher's "
                                     "tokenizer), or a model spec: folder, run folder, built-in name")
    layers: int | None = field(None, help="drop: decoder layers to keep, evenly spaced (default half); "
                                          "fresh: its layer count (default half the teacher's)")
    keep: list[int] = field([], help="drop: exactly these layer indices instead of --student.layers")
    config: dict[str, Any] = field({}, help="fresh: overrides of the teacher's config, e.g. --student.config."
                                            "hidden_size 256 --student.config.intermediate_size 768")
    seed: int = field(0, help="fresh: seed of the random initialisation")

    def __post_init__(self):
        if self.layers is not None and self.layers < 1:
            raise LlmlabError(f"--student.layers must be at least 1, got {self.layers}")
        if self.keep and self.source != "drop":
            raise LlmlabError("--student.keep lists layers to keep from the teacher; it needs --student.source drop")
        if self.config and self.source != "fresh":
            raise LlmlabError("--student.config overrides a fresh model's config; it needs --student.source fresh")
        if any(i < 0 for i in self.keep) or len(set(self.keep)) != len(self.keep):
            raise LlmlabError(f"--student.keep must list distinct layer indices >= 0, got {self.keep}")


def evenly_spaced(n_layers: int, keep: int) -> list[int]:
    """`keep` indices out of range(n_layers), evenly spaced, first and last included."""
    if not 1 <= keep <= n_layers:
        raise LlmlabError(f"--student.layers must be between 1 and the teacher's {n_layers} layers, got {keep}")
    if keep == 1:
        return [n_layers - 1]
    return sorted({round(k * (n_layers - 1) / (keep - 1)) for k in range(keep)})


def drop_layers(teacher, keep: list[int]):
    """A copy of `teacher` with only the decoder layers `keep` (in that order), config updated to match."""
    layers = decoder_layers(teacher)
    if not keep or max(keep) >= len(layers):
        raise LlmlabError(f"--student.keep: layer indices must be in 0..{len(layers) - 1}, got {keep}")
    student = copy.deepcopy(teacher)
    stack = decoder_layers(student)
    kept = torch.nn.ModuleList(stack[i] for i in keep)
    for new_index, layer in enumerate(kept):
        for module in layer.modules():  # the KV cache is indexed by each attention's layer_idx
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    set_module(student, next(name for name, m in student.named_modules() if m is stack), kept)
    _set_layer_count(student.config, keep)
    return student.requires_grad_(True)


def _set_layer_count(config, keep: list[int]):
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(getattr(config, key, None), int):
            setattr(config, key, len(keep))
    for key in ("layer_types",):  # per-layer lists (sliding vs full attention) follow the kept layers
        if isinstance(getattr(config, key, None), list):
            setattr(config, key, [getattr(config, key)[i] for i in keep])


def fresh_student(teacher, layers: int | None = None, overrides: dict | None = None, seed: int = 0):
    """A randomly initialised model of the teacher's architecture and vocabulary, smaller by `overrides`."""
    base = teacher.config.to_dict()
    n_teacher = len(decoder_layers(teacher))
    base.update({"num_hidden_layers": layers or max(1, n_teacher // 2)}, **(overrides or {}))
    base.pop("layer_types", None)  # rebuilt by the config class for the new layer count
    model_type = base.pop("model_type")
    try:
        config = AutoConfig.for_model(model_type, **base)
    except Exception as e:  # noqa: BLE001 - transformers' config validators raise several types; the cause says why
        cause = e.__cause__ or e
        raise LlmlabError(f"--student.config: {(str(cause).strip().splitlines() or [type(cause).__name__])[0]}"
                          ) from None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return student.to(teacher.device)


def make_student(cfg: StudentConfig, teacher, tokenizer, dtype="fp32", device="cpu"):
    """(student model in train-ready form, its tokenizer) for `cfg`; see the module docstring."""
    if cfg.source == "drop":
        n = len(decoder_layers(teacher))
        keep = cfg.keep or evenly_spaced(n, cfg.layers or max(1, n // 2))
        return drop_layers(teacher, keep), tokenizer
    if cfg.source == "fresh":
        return fresh_student(teacher, cfg.layers, cfg.config, cfg.seed), tokenizer
    student, student_tokenizer = load_model(cfg.source, dtype=dtype, device=device)
    check_tokenizers(tokenizer, student_tokenizer)
    return student.requires_grad_(True), student_tokenizer


def check_tokenizers(teacher_tokenizer, student_tokenizer):
    """LlmlabError unless both tokenizers map the same tokens to the same ids."""
    a, b = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if a != b:
        differ = sum(1 for token in a.keys() | b.keys() if a.get(token) != b.get(token))
        raise LlmlabError(f"teacher and student tokenizers differ ({len(a)} vs {len(b)} tokens, {differ} tokens "
                          "with different ids); distillation compares them token by token: use a student "
                          "with the teacher's tokenizer")


def check_vocab_sizes(teacher, student):
    """The two output layers must score the same vocabulary (a padded embedding counts as different)."""
    a, b = teacher.get_output_embeddings().weight.shape[0], student.get_output_embeddings().weight.shape[0]
    if a != b:
        raise LlmlabError(f"teacher and student score different vocabularies ({a} vs {b} logits); "
                          "use a student with the teacher's vocabulary")
