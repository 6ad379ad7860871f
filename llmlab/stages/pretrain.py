"""`llmlab pretrain`: train a language model from scratch (the lab decoder), or continue pretraining one.

    llmlab pretrain --data runs/pack --arch.hidden-size 256 --arch.num-hidden-layers 6 --seq-len 256
    llmlab pretrain --data book.txt --tokenizer chars/ --arch.norm layernorm --arch.ffn gelu --arch.position learned
    llmlab pretrain --data new_domain/ --model smollm2-135m --replay-data old_domain.txt --replay-fraction 0.25
    llmlab pretrain --nproc 2 --parallel fsdp …                 (torchrun underneath; or run torchrun yourself)

The model is `LabConfig(**arch)` with the tokenizer's vocabulary (rounded up to a multiple of 64)
and its special tokens; `--objective` picks what the windows teach (train/objectives.py). The
run folder holds the model as an HF folder (`<run>/model`), metrics with tokens/s and MFU, and
checkpoints that `--resume` continues exactly, on any number of processes.
"""

import contextlib
import dataclasses
import json
import logging
import math
import tempfile
import time
import typing
from pathlib import Path
from typing import Any

import torch
import yaml
from huggingface_hub.errors import StrictDataclassFieldValidationError
from transformers import AutoModelForCausalLM

from llmlab.config import field
from llmlab.data.corpus import Corpus, Mixture, Windows
from llmlab.data.shards import load_tokenizer
from llmlab.errors import LlmlabError, closest
from llmlab.models import load_model, save_model
from llmlab.models.lab import LabConfig, LabForCausalLM
from llmlab.models.lab.convert import t5_config
from llmlab.models.lab.moe import MoE
from llmlab.pretrain.layer_drop import LayerDropConfig, keep_probabilities
from llmlab.pretrain.vocab import extend_vocabulary, is_chinese, new_pieces
from llmlab.runs import RunOptions, start_run
from llmlab.train import TrainConfig, fit, resume_source, seed_everything
from llmlab.train import distributed as dist
from llmlab.train.flops import active_parameters, flops_per_token, matmul_peak
from llmlab.train.loop import micro_batches
from llmlab.train.objectives import OBJECTIVES, Collate, Seq2SeqCollate, lm_loss, seq2seq_loss, special_tokens

log = logging.getLogger("llmlab")


@dataclasses.dataclass
class PretrainTrainConfig(TrainConfig):
    """The training loop with nanoGPT's small-model recipe as defaults: a high peak rate, β₂ 0.99, weight decay on
    matrices, 100 warm-up steps, evaluation every 250 steps."""
    lr: float = field(1e-3, help="peak learning rate")
    max_steps: int | None = field(2000, help="optimizer steps")
    batch_size: int = field(12, help="windows per micro-batch (over all processes)")
    warmup_steps: int | None = field(100, help="linear warmup steps")
    betas: list[float] = field([0.9, 0.99], help="AdamW betas")
    weight_decay: float = field(0.1, help="AdamW decoupled weight decay (matrices only)")
    eval_every: int = field(250, help="evaluate every N steps (0: only at the end)")
    save_every: int = field(500, help="checkpoint every N steps (0: never)")
    log_every: int = field(10, help="log the mean loss of every N steps")


@dataclasses.dataclass
class PretrainConfig:
    data: str = field("", help="token shards (`llmlab data pack` folder) or a text file/folder (.txt .md .jsonl)")
    eval_data: str | None = field(None, help="held-out data of the same kind (default: the tail of --data)")
    eval_fraction: float = field(0.01, help="hold out this last fraction of --data when --eval-data is not given")
    eval_windows: int = field(200, help="evaluate on at most this many held-out windows")
    model: str | None = field(None, help="continue pretraining this model instead of building one from --arch")
    architecture: str = field("decoder", help="decoder (the lab decoder) or encoder-decoder (transformers' T5 at "
                                              "the --arch sizes, trained with --objective span)")
    arch: dict[str, Any] = field({}, help="the lab decoder's choices, e.g. --arch.hidden-size 256 --arch.norm "
                                          "layernorm --arch.position alibi (see docs/pretrain.md)")
    tokenizer: str = field("smollm2-135m", help="tokenizer folder or model name, for a model built from --arch")
    seq_len: int = field(256, help="tokens per training window")
    windows: str = field("random", help="random (start anywhere, nanoGPT) or sequential (tile the stream)")
    objective: str = field("causal", help=", ".join(OBJECTIVES))
    doc_mask: bool = field(False, help="attend only within each document (EOS-separated) of a window")
    extend_vocab: str | None = field(None, help="continual pretraining: a tokenizer folder (trained on the new "
                                                "language) whose new pieces join --model's tokenizer first")
    extend_filter: str = field("chinese", help="which of its pieces to add: chinese (CJK only) or all")
    replay_data: str | None = field(None, help="continual pretraining: old-domain data mixed back in")
    replay_fraction: float = field(0.0, help="share of windows drawn from --replay-data")
    layer_drop: bool = field(False, help="progressive layer dropping (Zhang & He 2020)")
    pld: LayerDropConfig = field(default_factory=LayerDropConfig, help="the layer-dropping schedule")
    compile: bool = field(False, help="torch.compile the model (needs a C++ compiler on CPU)")
    device: str = field("auto", help="cpu, cuda or auto")
    nproc: int = field(1, help="data-parallel processes (launches torchrun)")
    parallel: str = field("ddp", help="ddp (replicate) or fsdp (FSDP2: shard parameters, gradients, optimizer)")
    train: PretrainTrainConfig = field(default_factory=PretrainTrainConfig, help="the training loop")
    resume: bool = field(False, help="continue the run in --out from its last checkpoint")

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise LlmlabError(f"unknown --objective '{self.objective}'; use one of {', '.join(OBJECTIVES)}")
        if self.windows not in ("random", "sequential"):
            raise LlmlabError(f"unknown --windows '{self.windows}'; use random or sequential")
        if self.parallel not in dist.KINDS:
            raise LlmlabError(f"unknown --parallel '{self.parallel}'; use ddp or fsdp")
        if self.seq_len < 2:
            raise LlmlabError(f"--seq-len must be at least 2, got {self.seq_len}")
        if not 0 <= self.eval_fraction < 1 or not 0 <= self.replay_fraction < 1:
            raise LlmlabError("--eval-fraction and --replay-fraction must be in [0, 1)")
        if self.replay_fraction and not self.replay_data:
            raise LlmlabError("--replay-fraction needs --replay-data (the old-domain text to mix back in)")
        if self.architecture not in ("decoder", "encoder-decoder"):
            raise LlmlabError(f"unknown --architecture '{self.architecture}'; use decoder or encoder-decoder")
        if self.architecture == "encoder-decoder" and (self.objective != "span" or self.model):
            raise LlmlabError("--architecture encoder-decoder is built from --arch and trained with --objective span "
                              "(the corrupted text in, the spans out)")
        if self.extend_vocab and not self.model:
            raise LlmlabError("--extend-vocab adds tokens to an existing model's tokenizer: give --model too")
        if self.extend_filter not in ("chinese", "all"):
            raise LlmlabError(f"unknown --extend-filter '{self.extend_filter}'; use chinese or all")
        if self.nproc < 1:
            raise LlmlabError(f"--nproc must be at least 1, got {self.nproc}")
        if self.model is None:
            lab_config(self, vocab_size=64)  # a bad --arch key or choice fails now, before any data is read


def lab_config(cfg: PretrainConfig, vocab_size: int, tokenizer=None) -> LabConfig:
    fields = {"max_position_embeddings": max(cfg.seq_len, 2048) if cfg.arch.get("position") != "learned"
              else cfg.seq_len,
              # objectives with an input part get a bidirectional prefix, unless --arch.attention causal says no
              "attention": "causal" if cfg.objective == "causal" else "prefix",
              **{k.replace("-", "_"): v for k, v in cfg.arch.items()}}
    names = {f.name for f in dataclasses.fields(LabConfig)}
    unknown = sorted(set(fields) - names)
    if unknown:
        raise LlmlabError(f"unknown key 'arch.{unknown[0]}'{closest(unknown[0], names)}")
    if fields["max_position_embeddings"] < cfg.seq_len:
        raise LlmlabError(f"--arch.max-position-embeddings {fields['max_position_embeddings']} is shorter than "
                          f"--seq-len {cfg.seq_len}")
    if tokenizer is not None:
        fields.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    if tokenizer is not None and fields.get("vocab_size", vocab_size) < len(tokenizer):
        raise LlmlabError(f"--arch.vocab-size {fields['vocab_size']} is smaller than the tokenizer's {len(tokenizer)} "
                          f"tokens; leave it out (the tokenizer's size, rounded up to a multiple of 64) or raise it")
    return _lab(**{"vocab_size": vocab_size, **fields})


def _lab(**fields) -> LabConfig:
    """LabConfig from command-line values: a whole number for a float key is that float (`--arch.dropout 0`), and a
    value of the wrong type is a one-line error naming the key."""
    hints = LabConfig.__annotations__  # the lab's own keys (the base class's hints name torch lazily)
    for key, value in fields.items():
        hint = hints.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and float in (hint, *typing.get_args(hint)):
            fields[key] = float(value)
    try:
        return LabConfig(**fields)
    except (TypeError, ValueError, StrictDataclassFieldValidationError) as e:  # huggingface_hub's strict validation
        message = " ".join(str(e).split())
        raise LlmlabError(f"model config: {message}") from None


def pretrain(cfg: PretrainConfig, opts: RunOptions) -> dict:
    if not cfg.data:
        raise LlmlabError("pretrain needs data: --data (token shards from `llmlab data pack`, or text)")
    if cfg.nproc > 1 and dist.world_size() == 1:
        return _launch(cfg, opts)
    rank, world, device = dist.init()
    if cfg.device != "auto":
        device = torch.device(cfg.device)
    if cfg.train.batch_size % world:
        raise LlmlabError(f"--train.batch-size {cfg.train.batch_size} is the global micro-batch and must split evenly "
                          f"over {world} processes; use a multiple of {world}")
    resume = resume_source(opts.out, cfg.resume)
    model, tokenizer = build_model(cfg, device)
    _check_resume(cfg, opts, model)
    train_data, eval_data = _data(cfg, tokenizer, model.config.vocab_size)
    collate, loss_fn = Collate(cfg.objective, tokenizer, cfg.train.seed, cfg.doc_mask), lm_loss
    if cfg.architecture == "encoder-decoder":
        collate, loss_fn = Seq2SeqCollate(tokenizer, cfg.train.seed), seq2seq_loss
    elif cfg.objective != "causal" and not isinstance(model, LabForCausalLM):
        raise LlmlabError(f"--objective {cfg.objective} needs a bidirectional prefix: the lab decoder "
                          f"(build one with --arch) rather than --model {cfg.model}")
    n_params, per_token = active_parameters(model), flops_per_token(model, cfg.seq_len)
    peak = matmul_peak(torch.bfloat16 if cfg.train.bf16 else torch.float32, device)
    after_step = StepHook(model, cfg, world, per_token, peak)
    sparse = cfg.layer_drop or bool(getattr(model.config, "num_experts", 0))  # some parameters may get no gradient
    wrapped = dist.wrap(model, cfg.parallel, find_unused=sparse) if world > 1 else model
    trained = torch.compile(wrapped) if cfg.compile else wrapped
    per_rank = dataclasses.replace(cfg.train, batch_size=cfg.train.batch_size // world)
    with start_run("pretrain", cfg, opts) if rank == 0 else contextlib.nullcontext() as run:
        run_path = Path(dist.broadcast(str(run.path) if rank == 0 else None))
        if rank == 0:
            (run_path / "model_config.json").write_text(json.dumps(_arch_dict(model), indent=1), encoding="utf-8")
        result = fit(trained, loss_fn, train_data, per_rank, collate=collate, eval_data=eval_data, run=run,
                     checkpoint_dir=run_path / "checkpoints", resume=resume, after_step=after_step)
        state = dist.full_state_dict(wrapped)  # every rank takes part in gathering FSDP2's shards
        summary = None
        if rank == 0:
            after_step.stop()
            saved = _save(model, state, tokenizer, run_path / "model", sharded=world > 1 and cfg.parallel == "fsdp")
            mfu = result["tokens_per_s"] * per_token / peak
            summary = run.finish({
                "model": cfg.model or "lab", "saved": str(saved), **result, "params": n_params,
                "flops_per_token": per_token, "peak_flops": round(peak), "mfu": round(mfu, 4),
                "eval_ppl": math.exp(result["eval_loss"]) if result["eval_loss"] is not None else None,
                "objective": cfg.objective, "vocab": len(tokenizer), "world_size": world,
                "parallel": cfg.parallel if world > 1 else None, "train_windows": len(train_data),
                "eval_windows": len(eval_data or [])})
            ppl = f", eval loss {result['eval_loss']:.4f}" if result["eval_loss"] is not None else ""
            print(f"pretrained {n_params / 1e6:.2f}M parameters for {result['steps']} steps{ppl}, "
                  f"{result['tokens_per_s']:,.0f} tokens/s, MFU {mfu:.1%} -> {saved}")
    dist.finish()
    return summary


class StepHook:
    """What runs after each optimizer step: that step's MFU, the layer-dropping schedule, the experts' loads."""

    def __init__(self, model, cfg: PretrainConfig, world: int, per_token: float, peak: float):
        self.model, self.cfg, self.world, self.per_token, self.peak = model, cfg, world, per_token, peak
        self.layers = len(model.model.layers) if isinstance(model, LabForCausalLM) else 0
        self.gamma = cfg.pld.gamma or 10 / (cfg.train.max_steps or 1000)
        self.clock = time.perf_counter()
        if cfg.layer_drop:
            self.model.model.layer_keep = self.keep(0)

    def keep(self, step: int) -> list[float]:
        return keep_probabilities(step, self.layers, self.cfg.pld.theta, self.gamma)

    def __call__(self, step: int) -> dict:
        now, cfg = time.perf_counter(), self.cfg
        tokens = micro_batches(step - 1, cfg.train) * cfg.train.batch_size * cfg.seq_len  # global batch_size
        out = {"mfu": round(tokens * self.per_token / (now - self.clock) / self.peak, 4)}
        self.clock = now
        if cfg.layer_drop:
            self.model.model.layer_keep = self.keep(step)
            out["expected_layers"] = round(sum(self.model.model.layer_keep), 2)
        return {**out, **_expert_metrics(self.model)}

    def stop(self):
        """The saved model runs every layer."""
        if self.cfg.layer_drop:
            self.model.model.layer_keep = None


def build_model(cfg: PretrainConfig, device):
    """The model to train and its tokenizer: `--model` as it is, or a fresh lab decoder for the tokenizer."""
    seed_everything(cfg.train.seed)
    if cfg.model:
        model, tokenizer = load_model(cfg.model, device=str(device.type))
        model = model.float() if model.dtype != torch.float32 else model
        if cfg.extend_vocab:
            language = load_tokenizer(cfg.extend_vocab)
            pieces = new_pieces(tokenizer, language, keep=is_chinese if cfg.extend_filter == "chinese" else None)
            added = extend_vocabulary(model, tokenizer, pieces)
            log.info("added %d tokens from %s (%d in all now)", added, cfg.extend_vocab, len(tokenizer))
        return model, tokenizer
    tokenizer = load_tokenizer(cfg.tokenizer)
    added = special_tokens(cfg.objective)
    if added:
        tokenizer.add_special_tokens({"additional_special_tokens": added})
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    vocab = -(-len(tokenizer) // 64) * 64  # unless --arch.vocab-size says: a multiple of 64 (nanoGPT's 50304)
    config = lab_config(cfg, vocab, tokenizer)
    if cfg.architecture == "encoder-decoder":
        from transformers import T5ForConditionalGeneration

        model = T5ForConditionalGeneration(t5_config(config)).to(device)
    else:
        model = LabForCausalLM(config).to(device)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _data(cfg: PretrainConfig, tokenizer, vocab_size: int):
    corpus = Corpus.open(cfg.data, tokenizer, vocab_size)
    if cfg.eval_data:
        train, held = corpus, Corpus.open(cfg.eval_data, tokenizer, vocab_size)
    elif cfg.eval_fraction:
        train, held = corpus.split(cfg.eval_fraction)
    else:
        train, held = corpus, None
    # random windows are drawn afresh for every item the run will read (nanoGPT's sampler draws each batch anew),
    # up to 2^24 distinct ones; fit() shuffles the items, so fewer would be revisited every epoch
    steps = cfg.train.max_steps or 1
    count = min(steps * cfg.train.batch_size * cfg.train.grad_accum, 1 << 24) if cfg.windows == "random" else None
    data = Windows(train, cfg.seq_len, cfg.windows, cfg.train.seed, count)
    if cfg.replay_data:
        old = Windows(Corpus.open(cfg.replay_data, tokenizer, vocab_size), cfg.seq_len, cfg.windows, cfg.train.seed + 1,
                      count)
        data = Mixture(data, old, cfg.replay_fraction, cfg.train.seed)
    evaluation = None
    if held is not None and len(held):
        evaluation = Windows(held, cfg.seq_len, "sequential")
        evaluation.count = min(evaluation.count, cfg.eval_windows)
    return data, evaluation


def _expert_metrics(model) -> dict:
    """Per-expert token counts (summed over layers) of the last step, their coefficient of variation, drops."""
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    if not moes:
        return {}
    counts = torch.tensor([m.stats.get("tokens", [0] * m.n) for m in moes], dtype=torch.float64)
    cv = (counts.std(1, unbiased=False) / counts.mean(1).clamp(min=1e-9)).mean()
    return {"expert_tokens": counts.sum(0).long().tolist(), "expert_cv": round(float(cv), 4),
            "dropped_tokens": sum(m.stats.get("dropped", 0) for m in moes)}


def _check_resume(cfg: PretrainConfig, opts: RunOptions, model) -> None:
    """A resumed run's model config must be the one it was started with."""
    if cfg.resume:
        saved = Path(opts.out) / "model_config.json"
        if saved.is_file():
            before, now = json.loads(saved.read_text(encoding="utf-8")), json.loads(json.dumps(_arch_dict(model)))
            changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
            if changed:
                what = ", ".join(f"{k}: {before.get(k)} -> {now.get(k)}" for k in changed[:4])
                raise LlmlabError(f"--resume: the model config changed since the run started ({what}); "
                                  f"resume with the same --arch")


def _arch_dict(model) -> dict:
    d = model.config.to_dict()
    return {k: v for k, v in d.items() if k not in ("transformers_version", "use_cache", "dtype", "torch_dtype")}


def _save(model, state: dict, tokenizer, folder: Path, sharded: bool) -> Path:
    """Save the trained model; an FSDP2 model's gathered weights go into a fresh unsharded copy first."""
    if sharded:
        with torch.device("meta"):
            whole = AutoModelForCausalLM.from_config(model.config)
        whole.load_state_dict(state, strict=False, assign=True)
        whole.tie_weights()
        if isinstance(whole, LabForCausalLM):
            whole._init_weights(whole.model)  # the RoPE/ALiBi buffers, which state dicts do not carry
        whole.generation_config = model.generation_config
        model = whole
    return save_model(model, tokenizer, folder)


def _launch(cfg: PretrainConfig, opts: RunOptions) -> dict:
    """Run this same config in cfg.nproc processes under torchrun; return the run's summary."""
    out = Path(opts.out or Path("runs") / f"pretrain-{time.strftime('%Y%m%d-%H%M%S')}")
    data = dataclasses.asdict(dataclasses.replace(cfg, nproc=1))
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(data, f)
    argv = ["pretrain", "--config", f.name, "--out", str(out)]
    argv += ["--name", opts.name] if opts.name else []
    argv += ["--registry", opts.registry] if opts.registry else []
    code = dist.launch(cfg.nproc, argv)
    Path(f.name).unlink(missing_ok=True)
    if code != 0:
        raise LlmlabError(f"the {cfg.nproc} pretraining processes failed (exit {code}); see their messages above")
    return json.loads((out / "summary.json").read_text(encoding="utf-8"))


__all__ = ["PretrainConfig", "pretrain"]
