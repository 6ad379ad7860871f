"""The one table of llmlab's methods: every fine-tuning, quantization, pruning, low-rank,
distillation and data-pipeline method, by family and name.

An entry says where the method lives, its config dataclass, the function (or step class) that
runs it, what it needs and its one-line help. Files are imported only when their method is
asked for, so `llmlab --help` and `llmlab quantize --help` stay fast and a method whose optional
dependency is missing fails alone. Adding a method touches its own file and one line here.

    cfg_cls, fn, entry = load("quantize", "gptq")    # GPTQConfig, quantize_gptq, the entry
    names("prune")                                   # ["magnitude", "wanda", "sparsegpt", "llm_pruner"]

What a family's function is called with:
    finetune   apply_<m>(model, cfg, name) -> model           (entry.extra["method"]: the peft Method record)
    quantize   quantize_<m>(model, calib, cfg) -> model
    prune      prune_<m>(model, calib, cfg) -> model          (entry.extra["sparsity_key"]: what --sparsity sets)
    decompose  decompose(model, calib, cfg) -> model
    distill    make_<m>_loss(teacher, tokenizer, cfg) -> loss_fn(model, batch)
    align      <m>_loss(cfg, reference, name) -> loss_fn(model, batch)   (extra["reference"]: needs π_ref;
               extra["unpaired"]: reads thumbs-up/down rows); online methods (extra["online"]):
               train_<m>(cfg, align.online.Online) -> summary numbers
    data       a pipeline Step class (config: its Config)
"""

import dataclasses
import importlib
from dataclasses import dataclass, field
from typing import Any

from llmlab.config import build, describe
from llmlab.errors import LlmlabError, closest

FAMILIES = ("finetune", "quantize", "prune", "decompose", "distill", "align", "data")
NOUNS = {"finetune": "fine-tuning", "quantize": "quantization", "prune": "pruning", "decompose": "low-rank",
         "distill": "distillation", "align": "alignment", "data": "data step"}  # how messages name a family


@dataclass(frozen=True)
class Entry:
    module: str                    # the file, as a module under llmlab
    config: str                    # its config dataclass (for data steps: the step class's Config)
    function: str                  # what runs it (see the module docstring)
    help: str
    needs_calib: bool = False      # reads calibration text
    extra: dict = field(default_factory=dict)  # a family's own flags
    obj: Any = None                # a step registered at run time: the class itself


def _e(module, config, function, help, **kw) -> Entry:
    return Entry(f"llmlab.{module}", config, function, help, **kw)


TABLE: dict[str, dict[str, Entry]] = {
    "finetune": {
        "lora": _e("peft.lora", "LoraConfig", "apply_lora", "low-rank adapters (Hu et al. 2021); rsLoRA scaling",
                   extra={"method": "METHOD"}),
        "dora": _e("peft.dora", "DoraConfig", "apply_dora", "weight-decomposed LoRA (Liu et al. 2024)",
                   extra={"method": "METHOD"}),
        "ia3": _e("peft.ia3", "IA3Config", "apply_ia3", "learned rescaling of keys, values and FFN (Liu et al. 2022)",
                  extra={"method": "METHOD"}),
        "adapter": _e("peft.adapter", "AdapterConfig", "apply_adapter",
                      "bottleneck adapters, series or parallel (Houlsby et al. 2019)", extra={"method": "METHOD"}),
        "freeze": _e("peft.freeze", "FreezeConfig", "apply_freeze", "train only the last layers",
                     extra={"method": "FREEZE", "whole_model": True}),
        "full": _e("peft.freeze", "FullConfig", "apply_full", "train every weight",
                   extra={"method": "FULL", "whole_model": True}),
        "prefix": _e("peft.prefix", "PrefixConfig", "apply_prefix", "prefix tuning (Li & Liang 2021)",
                     extra={"method": "METHOD"}),
        "ptuning2": _e("peft.prefix", "PTuningV2Config", "apply_ptuning2", "P-tuning v2: deep prompts (Liu et al.)",
                       extra={"method": "METHOD_V2"}),
        "prompt": _e("peft.prompt", "PromptConfig", "apply_prompt", "prompt tuning (Lester et al. 2021)",
                     extra={"method": "METHOD"}),
        "ptuning": _e("peft.ptuning", "PTuningConfig", "apply_ptuning", "P-tuning v1: an encoder of soft prompts",
                      extra={"method": "METHOD"}),
    },
    "quantize": {
        "rtn": _e("compress.rtn", "RTNConfig", "quantize_rtn", "round-to-nearest on a uniform grid"),
        "gptq": _e("compress.gptq", "GPTQConfig", "quantize_gptq", "GPTQ: second-order error compensation",
                   needs_calib=True),
        "awq": _e("compress.awq", "AWQConfig", "quantize_awq", "activation-aware weight scaling", needs_calib=True),
        "smoothquant": _e("compress.smoothquant", "SmoothQuantConfig", "quantize_smoothquant",
                          "W8A8 with activation outliers migrated into the weights", needs_calib=True),
        "llm_int8": _e("compress.llm_int8", "LLMInt8Config", "quantize_llm_int8",
                       "LLM.int8(): int8 with fp16 outlier features"),
        "zeroquant": _e("compress.zeroquant", "ZeroQuantConfig", "quantize_zeroquant",
                        "group-wise weights, token-wise activations"),
        "nf4": _e("compress.nf4", "NF4Config", "quantize_nf4", "4-bit NormalFloat with double quantization (QLoRA)"),
    },
    "prune": {
        "magnitude": _e("compress.magnitude", "MagnitudeConfig", "prune_magnitude", "smallest |w| per row",
                        extra={"sparsity_key": "sparsity"}),
        "wanda": _e("compress.wanda", "WandaConfig", "prune_wanda", "|w| · ‖x‖ per output row", needs_calib=True,
                    extra={"sparsity_key": "sparsity"}),
        "sparsegpt": _e("compress.sparsegpt", "SparseGPTConfig", "prune_sparsegpt",
                        "OBS mask and weight update, GPTQ-style", needs_calib=True, extra={"sparsity_key": "sparsity"}),
        "llm_pruner": _e("compress.llm_pruner", "LLMPrunerConfig", "prune_llm_pruner",
                         "structured: remove heads and channels by Taylor importance", needs_calib=True,
                         extra={"sparsity_key": "ratio"}),
    },
    "decompose": {
        "svd": _e("compress.lowrank", "LowRankConfig", "decompose", "truncated SVD of each weight"),
        "asvd": _e("compress.lowrank", "LowRankConfig", "decompose",
                   "activation-aware SVD (input scale)", needs_calib=True),
        "svd_llm": _e("compress.lowrank", "LowRankConfig", "decompose",
                      "SVD-LLM: truncation-aware whitening", needs_calib=True),
    },
    "distill": {
        "ce": _e("distill.kd", "CEConfig", "make_ce_loss", "hard labels only: the baseline"),
        "kd": _e("distill.kd", "KDConfig", "make_kd_loss", "forward KL to the teacher's softened distribution"),
        "seqkd": _e("distill.seqkd", "SeqKDConfig", "make_seqkd_loss", "sequence-level KD: the teacher's outputs"),
        "gkd": _e("distill.gkd", "GKDConfig", "gkd_loss", "generalised JSD on the student's own samples"),
        "minillm": _e("distill.minillm", "MiniLLMConfig", "minillm_loss", "reverse KL by policy gradient"),
        "cot": _e("distill.cot", "CoTConfig", "make_cot_loss", "distilling step-by-step: rationales as targets"),
    },
    "align": {
        "dpo": _e("align.dpo", "DPOConfig", "dpo_loss", "DPO: the Bradley-Terry preference loss against a reference",
                  extra={"reference": True}),
        "cdpo": _e("align.dpo", "CDPOConfig", "dpo_loss", "conservative DPO: labels flipped with probability ε",
                   extra={"reference": True}),
        "robust": _e("align.dpo", "DPOConfig", "dpo_loss", "robust DPO: unbiased under label noise ε",
                     extra={"reference": True}),
        "hinge": _e("align.dpo", "DPOConfig", "dpo_loss", "SLiC's hinge on the DPO margin", extra={"reference": True}),
        "ipo": _e("align.dpo", "DPOConfig", "dpo_loss", "IPO: a squared loss towards margin 1/(2β)",
                  extra={"reference": True}),
        "simpo": _e("align.simpo", "SimPOConfig", "simpo_loss", "SimPO: length-normalised, no reference"),
        "orpo": _e("align.orpo", "ORPOConfig", "orpo_loss", "ORPO: SFT plus an odds ratio, no reference"),
        "kto": _e("align.kto", "KTOConfig", "kto_loss", "KTO: unpaired thumbs-up/down against a KL reference point",
                  extra={"reference": True, "unpaired": True}),
        "reward": _e("align.reward", "RewardConfig", "reward_loss", "a reward model: Bradley–Terry on a scalar head",
                     extra={"reward_model": True}),
        "ppo": _e("align.ppo", "PPOConfig", "train_ppo", "PPO-RLHF: sampled replies, a value head, GAE, KL penalty",
                  extra={"online": True, "reference": True}),
        "grpo": _e("align.grpo", "GRPOConfig", "train_grpo", "GRPO: group-normalised rewards, no value model",
                   extra={"online": True, "reference": True}),
        "raft": _e("align.rejection", "RAFTConfig", "train_raft", "RAFT: fine-tune on the best of n samples, in rounds",
                   extra={"online": True}),
        "best-of-n": _e("align.rejection", "BestOfNConfig", "best_of_n",
                        "best-of-n sampling: the reward's pick of n replies (no training)",
                        extra={"online": True, "sampling_only": True}),
    },
    "data": {
        "language": _e("data.steps.language", "LanguageConfig", "Language", "language identification and filter"),
        "gopher_quality": _e("data.steps.quality", "GopherQualityConfig", "GopherQuality", "Gopher's quality rules"),
        "gopher_repetition": _e("data.steps.quality", "GopherRepetitionConfig", "GopherRepetition",
                                "Gopher's repetition rules"),
        "c4_rules": _e("data.steps.quality", "C4RulesConfig", "C4Rules", "C4's line and document rules"),
        "blocklist": _e("data.steps.quality", "BlocklistConfig", "Blocklist", "drop documents with listed words"),
        "redact_pii": _e("data.steps.redact", "RedactConfig", "RedactPII", "redact e-mails, phones, IPs"),
        "exact_dedup": _e("data.steps.exact_dedup", "ExactDedupConfig", "ExactDedup", "exact duplicate documents"),
        "minhash_dedup": _e("data.steps.minhash", "MinhashDedupConfig", "MinhashDedup", "near duplicates (MinHash)"),
        "sentence_dedup": _e("data.steps.sentence_dedup", "SentenceDedupConfig", "SentenceDedup",
                             "repeated sentence spans"),
        "substring_dedup": _e("data.steps.substring", "SubstringDedupConfig", "SubstringDedup",
                              "repeated substrings by suffix array"),
        "decontaminate": _e("data.steps.decontaminate", "DecontaminateConfig", "Decontaminate",
                            "drop documents that overlap evaluation sets"),
    },
}


def names(family: str) -> list[str]:
    return list(TABLE[family])


def entry(family: str, name: str) -> Entry:
    methods = TABLE[family]
    if name not in methods:
        raise LlmlabError(f"unknown {NOUNS[family]} method '{name}'{closest(name, methods)}; "
                          f"choose one of {', '.join(methods)}")
    return methods[name]


def check(family: str, name: str, option: str = "--method") -> Entry:
    """The entry, or the one-line error a verb gives for its `--method` option."""
    if name not in TABLE[family]:
        raise LlmlabError(f"unknown {option} '{name}'{closest(name, TABLE[family])}; "
                          f"use one of {', '.join(TABLE[family])}")
    return TABLE[family][name]


def load(family: str, name: str) -> tuple[type, Any, Entry]:
    """(config class, function, entry) of a method, importing only its file."""
    e = entry(family, name)
    if e.obj is not None:
        return e.obj.Config, e.obj, e
    try:
        module = importlib.import_module(e.module)
    except ModuleNotFoundError as err:
        if err.name != e.module:
            raise
        raise LlmlabError(f"{NOUNS[family]} method '{name}' is not available in this llmlab "
                          f"(no {e.module.replace('.', '/')}.py)") from None
    return getattr(module, e.config), getattr(module, e.function), e


def build_options(family: str, name: str, options: dict, flags: dict) -> Any:
    """The method's config from a verb's `--options.*` and its top-level flags, {flag: (config key, value)}
    (a value of None is a flag not given). A flag the method has no key for, or one that contradicts
    `--options.KEY`, is a one-line error."""
    cfg_cls, _, _ = load(family, name)
    names = {f.name for f in dataclasses.fields(cfg_cls)}
    options = {str(k).replace("-", "_"): v for k, v in options.items()}
    for flag, (key, value) in flags.items():
        if value is None:
            continue
        if key not in names:
            raise LlmlabError(f"--{flag} does not apply to --method {name}; its options are "
                              f"{', '.join(sorted(names)) or 'none'}")
        if key in options and options[key] != value:
            raise LlmlabError(f"--{flag} {value} and --options.{key} {options[key]} disagree; give one")
        options[key] = value
    return build(cfg_cls, options, "options")


def attribute(family: str, name: str, key: str):
    """An object the entry names in `extra` (e.g. a peft method's save/load record), from the method's file."""
    e = entry(family, name)
    return getattr(importlib.import_module(e.module), e.extra[key])


def register_step(cls) -> type:
    """Class decorator for pipeline steps written outside llmlab: `name` becomes usable in pipeline YAML."""
    known = TABLE["data"].get(cls.name)
    if known is not None and known.obj is not cls and (known.module, known.function) != (cls.__module__, cls.__name__):
        raise TypeError(f"two steps are registered as '{cls.name}': {known.function} and {cls.__name__}")
    TABLE["data"][cls.name] = Entry(cls.__module__, "Config", cls.__name__, (cls.__doc__ or "").strip(), obj=cls)
    return cls


def options_help(family: str, prefix: str = "options.") -> str:
    """Each method's options, for a verb's --help."""
    lines = []
    for name in TABLE[family]:
        try:
            cfg_cls, _, e = load(family, name)
        except LlmlabError:
            lines.append(f"  {name}: (not available)")
            continue
        rows = "; ".join(f"{opt} [{default}]" for opt, default, _ in describe(cfg_cls, prefix)) or "(none)"
        lines.append(f"  {name}{' (needs --calib)' if e.needs_calib else ''}: {rows}")
    return "\n".join(lines)
