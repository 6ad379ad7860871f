"""`llmlab qat`: quantization-aware training, distilled from the float model (LLM-QAT), and a report."""

import time

import torch

from llmlab.atomic import atomic_write_jsonl
from llmlab.compress.qat import QATConfig, collate, convert_qat, frozen_copy, prepare_qat, training_data
from llmlab.data.text import read_text
from llmlab.evaluate.perplexity import perplexity
from llmlab.models import load_model
from llmlab.models.packed.io import save_quantized
from llmlab.runs import RunOptions, start_run
from llmlab.train.loop import evaluate, fit, frozen_linears_to_bf16
from llmlab.train.losses import SoftTargetLoss


def qat_verb(cfg: QATConfig, opts: RunOptions) -> dict:
    ppl_text = read_text(cfg.ppl_data) if cfg.ppl_data else None  # a missing file fails before any work
    model, tokenizer = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
    with start_run("qat", cfg, opts) as run:
        start = time.perf_counter()
        data = training_data(model, tokenizer, cfg)
        gen_seconds = time.perf_counter() - start
        train_rows, eval_rows = list(data[:cfg.n_samples]), list(data[cfg.n_samples:])
        teacher = frozen_copy(model)
        stats = {"ppl_fp": _ppl(teacher, tokenizer, ppl_text, cfg)}
        if cfg.train.bf16:
            frozen_linears_to_bf16(teacher)  # the teacher only runs forward: bf16 storage halves its cost
        prepare_qat(model, cfg)
        loss_fn = SoftTargetLoss(teacher)
        stats["ppl_rtn"] = _ppl(model, tokenizer, ppl_text, cfg)  # step 0: the student is the RTN model
        stats["kd_rtn"] = _kd(model, loss_fn, eval_rows, cfg)
        result = fit(model, loss_fn, train_rows, cfg.train, collate=collate, eval_data=eval_rows or None, run=run)
        stats["kd_qat"] = result["eval_loss"]
        if cfg.act_bits or cfg.kv_bits or not cfg.convert:  # weight-only, the converted model computes the same
            stats["ppl_qat_fake"] = _ppl(model, tokenizer, ppl_text, cfg)
        if cfg.convert:
            convert_qat(model)
            stats["ppl_qat"] = _ppl(model, tokenizer, ppl_text, cfg)
            saved = str(save_quantized(model, tokenizer, run.path / "model", method="qat"))
        else:
            saved = None
        _write_samples(run, tokenizer, data[:8])
        summary = run.finish({"model": cfg.model, "bits": cfg.bits, "group_size": cfg.group_size,
                              "act_bits": cfg.act_bits, "kv_bits": cfg.kv_bits, "data_free": not cfg.data,
                              "generate_seconds": round(gen_seconds, 2), **result, **stats, "saved": saved})
    _report(cfg, summary)
    return summary


def _kd(model, loss_fn, rows, cfg: QATConfig) -> float | None:
    if not rows:
        return None
    autocast = lambda: torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=cfg.train.bf16)  # noqa: E731
    return evaluate(model, loss_fn, rows, cfg.train.batch_size, collate, autocast)


def _ppl(model, tokenizer, text: str | None, cfg: QATConfig) -> float | None:
    if text is None:
        return None

    return perplexity(model, tokenizer, text, seq_len=cfg.ppl_seq_len, max_windows=cfg.ppl_windows,
                      progress=False)["ppl"]


def _write_samples(run, tokenizer, ids: torch.Tensor):
    """A few training sequences as text, to see what the model taught itself with."""
    atomic_write_jsonl(run.artifact("samples.jsonl"), [{"text": tokenizer.decode(row)} for row in ids.tolist()])


def _report(cfg: QATConfig, summary: dict):
    kd = "" if summary["kd_rtn"] is None else f"; KD loss {summary['kd_rtn']:.4f} (RTN) -> {summary['kd_qat']:.4f}"
    ppl = ""
    if summary["ppl_fp"] is not None:
        after = summary["ppl_qat"] if cfg.convert else summary["ppl_qat_fake"]
        ppl = f"; ppl fp {summary['ppl_fp']:.3f}, RTN {summary['ppl_rtn']:.3f}, QAT {after:.3f}"
    print(f"QAT W{cfg.bits} g{cfg.group_size} of {cfg.model}: {summary['steps']} steps{kd}{ppl}"
          f" -> {summary['saved'] or summary['path']}")
