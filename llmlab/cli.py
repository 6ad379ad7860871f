"""`llmlab <stage> …`: one table of verbs, each a Python function taking its config dataclass.

Every verb accepts
    --config FILE      YAML file with the verb's options (command-line options override it)
    --out DIR          the run folder to write (default runs/<verb>-<time>)
    --name NAME        the run's name in the registry (default: the folder's name)
    --registry PATH    the SQLite run registry (default runs/registry.sqlite, or $LLMLAB_REGISTRY)
    --json             print the run's summary as one JSON object on the last line of stdout
    --debug            show tracebacks instead of one-line errors
and its own options as `--key value` or `--section.key value`.
"""

import dataclasses
import importlib
import json
import logging
import os
import sys

from llmlab import config
from llmlab.config import bool_keys, describe, type_names
from llmlab.errors import LlmlabError, closest
from llmlab.runs import RunOptions

# verb -> (stage module, function, config class, positional fields, one-line help). The stages
# (llmlab/stages/) are imported only here and only when their verb runs, so `llmlab --help` answers at once.
STAGES = {
    "demo": ("llmlab.stages.demo", "demo", "DemoConfig", [],
             "the main job on the built-in model: chat answers, generation and a perplexity report"),
    "generate": ("llmlab.stages.generate", "generate_verb", "GenerateConfig", [],
                 "generate text from a prompt or a file of prompts"),
    "chat": ("llmlab.stages.chat", "chat_verb", "ChatConfig", [],
             "interactive chat with streamed replies (/reset, /exit)"),
    "data tasks": ("llmlab.stages.data", "tasks_verb", "TasksConfig", [],
                   "synthetic instructions with exact answers: train.jsonl and heldout.jsonl"),
    "data run": ("llmlab.stages.data", "run_verb", "PipelineConfig", ["config"],
                 "run a data pipeline YAML: read, filter, de-duplicate, redact, write shards"),
    "data tokenizer": ("llmlab.stages.data", "tokenizer_verb", "TokenizerConfig", [],
                       "train BPE, WordPiece or Unigram tokenizers; bytes per token on held-out text"),
    "data pack": ("llmlab.stages.data", "pack_verb", "PackConfig", [],
                  "tokenize documents into memory-mapped uint16/uint32 token shards with a manifest"),
    "pretrain": ("llmlab.stages.pretrain", "pretrain", "PretrainConfig", [],
                 "pretrain the lab decoder from scratch, or continue pretraining a model (torchrun DDP/FSDP2)"),
    "finetune": ("llmlab.stages.finetune", "finetune", "FinetuneConfig", [],
                 "supervised fine-tuning on instruction or chat data: LoRA and friends, or full"),
    "merge": ("llmlab.stages.merge", "merge_verb", "MergeConfig", [],
              "merge a trained adapter into its base model and save the result"),
    "align": ("llmlab.stages.align", "align_verb", "AlignConfig", [],
              "alignment: dpo, cdpo, robust, hinge, ipo, simpo, orpo, kto, reward models, ppo, grpo, raft, best-of-n"),
    "redteam": ("llmlab.stages.safety", "redteam_verb", "RedTeamConfig", [],
                "red teaming: an attacker model writes attacks per harm category, the target answers, a judge scores"),
    "quantize": ("llmlab.stages.quantize", "quantize_verb", "QuantizeConfig", [],
                 "quantize a model (rtn, gptq, awq, smoothquant, llm_int8, zeroquant, nf4; + LoRC) and save it packed"),
    "prune": ("llmlab.stages.prune", "prune_verb", "PruneConfig", [],
              "prune a model: magnitude, wanda, sparsegpt (unstructured or N:M), llm_pruner (structured)"),
    "decompose": ("llmlab.stages.decompose", "decompose_verb", "DecomposeConfig", [],
                  "low-rank factorization of linear layers: truncated SVD, ASVD or SVD-LLM"),
    "distill": ("llmlab.stages.distill", "distill_verb", "DistillConfig", [],
                "knowledge distillation into a smaller student: kd, seqkd, gkd, minillm, cot (or the ce baseline)"),
    "qat": ("llmlab.stages.qat", "qat_verb", "QATConfig", [],
            "quantization-aware training: fake-quant with STE, distilled from the float model (LLM-QAT)"),
    "export gguf": ("llmlab.stages.export", "export_verb", "ExportConfig", [],
                    "write a llama-architecture model as a GGUF file (f32, f16, q8_0, q4_0) with its tokenizer"),
    "eval ppl": ("llmlab.stages.evaluate", "perplexity_verb", "PerplexityConfig", [],
                 "perplexity of a model on a text file (GPTQ protocol or sliding window)"),
    "eval em": ("llmlab.stages.evaluate", "exact_match_verb", "ExactMatchConfig", [],
                "exact-match accuracy of greedy answers to alpaca rows (optionally with an adapter)"),
    "eval mmlu": ("llmlab.stages.evaluate", "exam_verb", "MMLUConfig", [],
                  "MMLU: 5-shot multiple choice, accuracy per subject, category and overall (as lm-eval)"),
    "eval cmmlu": ("llmlab.stages.evaluate", "exam_verb", "CMMLUConfig", [],
                   "CMMLU: Chinese 5-shot multiple choice, per subject, category and overall (as lm-eval)"),
    "eval ceval": ("llmlab.stages.evaluate", "exam_verb", "CEvalConfig", [],
                   "C-Eval: Chinese 5-shot multiple choice on val, per subject, category and overall"),
    "eval arc": ("llmlab.stages.evaluate", "arc_verb", "ArcConfig", [],
                 "ARC-Easy and ARC-Challenge: acc and acc_norm by log-likelihood (as lm-eval)"),
    "eval gsm8k": ("llmlab.stages.evaluate", "gsm8k_verb", "GSM8KConfig", [],
                   "GSM8K: 8-shot chain-of-thought generation, exact match on the final number"),
    "eval harness": ("llmlab.stages.harness", "harness_verb", "HarnessConfig", [],
                     "any lm-evaluation-harness task on any llmlab model, adapters included"),
    "eval reward": ("llmlab.stages.align", "reward_eval_verb", "RewardEvalConfig", [],
                    "a reward model's pairwise accuracy and margin distribution on held-out preference pairs"),
    "eval safety": ("llmlab.stages.safety", "safety_verb", "SafetyConfig", [],
                    "refusal rate on harmful prompts and over-refusal on benign look-alikes (XSTest, XSafety), by category"),
    "arena": ("llmlab.stages.arena", "arena_verb", "ArenaConfig", [],
              "pairwise battles between models' answers, judged by a model or a person, as Elo ratings"),
    "report": ("llmlab.stages.report", "report_verb", "ReportConfig", ["runs*"],
               "compare runs: a table of quality, size and speed, plots, Markdown and a self-contained HTML page"),
    "runs list": ("llmlab.stages.runs", "runs_list", "RunsListConfig", [],
                  "list the runs in the registry"),
    "runs show": ("llmlab.stages.runs", "runs_show", "RunsShowConfig", ["name"],
                  "show one run's config and summary"),
    "runs compare": ("llmlab.stages.runs", "runs_compare", "RunsCompareConfig", ["names"],
                     "a table of several runs' summary metrics"),
}

COMMON_VALUE = {"config", "out", "name", "registry"}
COMMON_FLAGS = {"json", "debug", "help"}
_BOOL_WORDS = {"true", "false", "yes", "no", "on", "off", "1", "0"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    _quiet_libraries(debug)
    try:
        return _run(argv)
    except LlmlabError as e:
        if debug:
            raise
        print(f"llmlab: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # a failure inside torch or transformers: one line, the traceback behind --debug
        if debug:
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        print(f"llmlab: error: {first} (an internal error; run again with --debug for the traceback)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nllmlab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `llmlab … | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _run(argv: list[str]) -> int:
    verb, rest = _split_verb(argv)
    if verb is None:
        print(_usage())
        return 0
    module_name, fn_name, cfg_name, positionals, _ = STAGES[verb]
    module = importlib.import_module(module_name)
    cfg_cls = getattr(module, cfg_name)

    common, overrides, loose = _parse(rest, cfg_cls)
    if positionals == ["config"] and loose and "config" not in common:  # `llmlab data run pipeline.yaml`
        common["config"], positionals = loose.pop(0), []
    if common.pop("help", False):
        print(_verb_help(verb, cfg_cls, positionals))
        return 0
    values = _positionals(loose, positionals, verb)
    cfg = config.load(cfg_cls, common.pop("config", None), overrides)
    if values:  # positionals arrive as already-typed values; validate again with them in place
        cfg = dataclasses.replace(cfg, **values)
    opts = RunOptions(**common)
    summary = getattr(module, fn_name)(cfg, opts)
    if opts.json and summary is not None:
        sys.stdout.flush()
        print(json.dumps(summary, default=str, ensure_ascii=False))
    return 0


def _split_verb(argv: list[str]):
    words = []
    for token in argv:
        if token.startswith("-"):
            break
        words.append(token)
    for n in (2, 1):
        if len(words) >= n and " ".join(words[:n]) in STAGES:
            return " ".join(words[:n]), argv[n:]
    if not words:
        if any(t in ("-h", "--help") for t in argv) or not argv:
            return None, []
        raise LlmlabError(f"expected a stage before '{argv[0]}'; see `llmlab --help`")
    groups = {v.split()[0] for v in STAGES}
    if words[0] in groups and len(words) == 1:
        subs = [v for v in STAGES if v.startswith(words[0] + " ")]
        raise LlmlabError(f"'{words[0]}' needs a sub-command: {', '.join(subs)}")
    guess = " ".join(words[:2]) if words[0] in groups else words[0]
    raise LlmlabError(f"unknown stage '{guess}'{closest(guess, [*STAGES, *groups])}; see `llmlab --help`")


def _parse(tokens: list[str], cfg_cls):
    """Split the tokens after the verb into common options, `--key value` overrides and positionals."""
    flags = bool_keys(cfg_cls)
    common, overrides, loose = {}, {}, []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        i += 1
        if token in ("-h", "--help"):
            common["help"] = True
            continue
        if not token.startswith("--"):
            loose.append(token)
            continue
        option, eq, value = token[2:].partition("=")
        key = option.replace("-", "_")
        takes_value = key in COMMON_VALUE or (key not in COMMON_FLAGS and key not in flags)
        if not eq and takes_value:
            if i >= len(tokens) or tokens[i].startswith("--"):
                raise LlmlabError(f"option --{token[2:]} needs a value")
            value, i = tokens[i], i + 1
        elif not eq and i < len(tokens) and tokens[i].lower() in _BOOL_WORDS:
            value, i = tokens[i], i + 1  # `--chat false` as well as a bare `--chat`
        elif not eq:
            value = "true"
        if key in COMMON_FLAGS:
            common[key] = value.lower() in ("true", "1", "yes")
        elif key in COMMON_VALUE:
            common[key] = value
        else:
            overrides[option] = value
    return common, overrides, loose


def _positionals(loose: list[str], names: list[str], verb: str) -> dict:
    if not names:
        if loose:
            raise LlmlabError(f"unexpected argument '{loose[0]}' for `llmlab {verb}`; options take the form --key value")
        return {}
    if names[-1].endswith(("s", "*")):  # a plural last name takes all remaining words; "runs*": maybe none
        *single, many = names
        if len(loose) < len(single) + (not many.endswith("*")):
            raise LlmlabError(f"`llmlab {verb}` needs {' '.join(n.upper() for n in names)}…")
        return {**dict(zip(single, loose)), many.rstrip("*"): loose[len(single):]}
    if len(loose) != len(names):
        raise LlmlabError(f"`llmlab {verb}` takes {' '.join(n.upper() for n in names)}; got {len(loose)} argument(s)")
    return dict(zip(names, loose))


def _usage() -> str:
    width = max(map(len, STAGES)) + 2
    rows = "\n".join(f"  {verb:<{width}}{entry[4]}" for verb, entry in STAGES.items())
    return (f"usage: llmlab <stage> [--config FILE] [--key value …] [--out DIR] [--json] [--debug]\n\n"
            f"stages:\n{rows}\n\n`llmlab <stage> --help` lists a stage's options.")


def _verb_help(verb: str, cfg_cls, positionals: list[str]) -> str:
    kinds = type_names(cfg_cls)
    rows = [(opt, kinds.get(opt, ""), default, help_) for opt, default, help_ in describe(cfg_cls)
            if opt[2:].replace("-", "_") not in [p.rstrip("*") for p in positionals]]
    rows += [("--config", "FILE", "", "YAML file of options"), ("--out", "DIR", "runs/<verb>-<time>", "run folder"),
             ("--name", "NAME", "", "run name in the registry"),
             ("--registry", "PATH", "runs/registry.sqlite", "run registry"),
             ("--json", "", "false", "print the summary as JSON on the last line"),
             ("--debug", "", "false", "show tracebacks")]
    width = max(len(f"{opt} {kind}") for opt, kind, *_ in rows) + 2
    lines = [f"  {f'{opt} {kind}'.strip():<{width}}{help_}{_default(default, help_)}"
             for opt, kind, default, help_ in rows]
    args = " ".join(f"[{p[:-1].upper()}…]" if p.endswith("*") else p.upper() + ("…" if p.endswith("s") else "")
                    for p in positionals)
    more = cfg_cls.more_help() if hasattr(cfg_cls, "more_help") else ""  # e.g. each method's options
    usage = " ".join(["usage: llmlab", verb, *([args] if args else []), "[options]"])
    return f"{usage}\n\n{STAGES[verb][4]}\n\noptions:\n" + "\n".join(lines) + more


def _default(default: str, help_: str) -> str:
    """` [default: x]`, unless there is none or the help text already says what happens by default."""
    return "" if default in ("", "None", "[]", "{}") or "default" in help_ else f" [default: {default}]"


def _quiet_libraries(debug: bool):
    """Library chatter (HF loading bars, hub retries) buries llmlab's own output; --debug brings it back."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(message)s")
    logging.getLogger("llmlab").setLevel(logging.DEBUG if debug else logging.INFO)
    if not debug:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
        for noisy in ("torchao", "torch.utils._pytree"):  # transformers imports torchao: absent CUDA kernels, deprecations
            logging.getLogger(noisy).setLevel(logging.ERROR)


if __name__ == "__main__":
    sys.exit(main())
