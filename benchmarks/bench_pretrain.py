"""Pretraining benchmarks: nanoGPT's shakespeare-char recipe, and throughput against a plain PyTorch loop.

    python benchmarks/bench_pretrain.py nanogpt [--steps 2000] [--seeds 0,1,2] [--nanogpt PATH]
    python benchmarks/bench_pretrain.py speed [--steps 30] [--bf16]
    python benchmarks/bench_pretrain.py vocab [--steps 100]
    python benchmarks/bench_pretrain.py ablation [--steps 600] [--seeds 0] [--only positions,norms,ffn,moe]

`nanogpt` is nanoGPT's CPU recipe for Tiny Shakespeare (README: 4 layers, 4 heads, width 128, context
64, batch 12, 2,000 iterations, lr 1e-3, dropout 0; config/train_shakespeare_char.py: β₂ 0.99, 100
warm-up steps, cosine to 1e-4, weight decay 0.1, no biases; the last 10% of the text held out) with
its choices (LayerNorm, GeLU, learned positions, tied embeddings). nanoGPT's README reports a
validation loss of about 1.88 after about 3 minutes on a laptop CPU. The character tokenizer comes
from `llmlab data tokenizer --kinds chars`; llmlab's validation loss is over every held-out window.
With `--nanogpt PATH` (a checkout of karpathy/nanoGPT, copied to a temporary folder and run
unmodified) nanoGPT's own train.py runs the README's CPU command in the same invocation, with
`--eval_iters=200` (2,400 random validation windows) instead of 20 for a steadier estimate.

`speed` times the same lab decoder (≈20M parameters, LLaMA's choices) under `llmlab pretrain` and
under a plain loop — the model, AdamW and random windows, nothing else — at the same batch,
context and dtype, and reports tokens/s, their ratio and MFU against the matmul peak measured in
the same run.

`vocab` is the Chinese-LLaMA recipe on the built-in model: a BPE tokenizer trained on alpaca_zh's
replies (part 00), its Chinese pieces merged into SmolLM2's tokenizer, then the same number of
continued-pretraining steps with and without the extension. Reported on held-out replies (part 01):
tokens per character, and per-character perplexity exp(Σ NLL / Σ characters), which compares models
whose tokenizers differ; wikitext-2 validation perplexity shows what the English side loses.

`ablation` is the survey's architecture comparison at a size this CPU can run: nanoGPT's character
model (4 layers, width 128, context 64) on Tiny Shakespeare, one choice varied at a time from
pre-LN + LayerNorm + GeLU + learned positions, the same steps, batch and seeds. Each position scheme
is also evaluated at 2x and 4x the training context (every model gets a 4x position table; a
learned table's rows past the training length are never trained). `moe` compares 8 experts top-2
with the dense model of equal active parameters, with and without the balancing loss.
"""

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch

from _cli import run
from llmlab.data.corpus import Corpus, Windows
from llmlab.models.lab import LabConfig, LabForCausalLM
from llmlab.train.flops import flops_per_token, matmul_peak

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tiny_shakespeare" / "input.txt"
SIZE = ["--arch.num-hidden-layers", "4", "--arch.num-attention-heads", "4", "--arch.hidden-size", "128"]
RECIPE = ["--seq-len", "64", "--train.batch-size", "12", "--train.lr", "1e-3", "--train.min-lr-ratio", "0.1",
          "--train.warmup-steps", "100", "--train.weight-decay", "0.1", "--train.betas", "0.9,0.99"]
NANOGPT = [*SIZE, "--arch.norm", "layernorm", "--arch.ffn", "gelu", "--arch.position", "learned", *RECIPE,
           "--eval-fraction", "0.1", "--eval-windows", "100000"]


def nanogpt(args):
    if args.nanogpt:
        loss, wall = nanogpt_peer(Path(args.nanogpt), args.steps)
        print(f"| nanoGPT train.py (unmodified), seed 1337 | {args.steps} | {loss:.4f} | {wall:.0f} s |")
    with tempfile.TemporaryDirectory() as tmp:
        tok = run(["data", "tokenizer", "--input.path", str(SHAKESPEARE), "--kinds", "chars",
                   "--special-tokens", "<|endoftext|>", "--out", f"{tmp}/tok"])
        for seed in args.seeds.split(","):
            start = time.perf_counter()
            summary = run(["pretrain", "--data", str(SHAKESPEARE), "--tokenizer", tok["tokenizers"]["chars"],
                           *NANOGPT, "--train.max-steps", str(args.steps), "--train.eval-every", str(args.steps),
                           "--train.save-every", "0", "--train.log-every", "100", "--train.seed", seed,
                           "--out", f"{tmp}/run{seed}"])
            wall = time.perf_counter() - start
            print(f"| llmlab pretrain, seed {seed} | {args.steps} | {summary['eval_loss']:.4f} | {wall:.0f} s "
                  f"({summary['tokens_per_s']:,.0f} tokens/s, MFU {summary['mfu']:.1%}) |", flush=True)


def nanogpt_peer(checkout: Path, steps: int) -> tuple[float, float]:
    """nanoGPT's README CPU command on a copy of the checkout; (validation loss at the last step, wall seconds)."""
    import re
    import shutil
    import subprocess
    import sys

    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "nanoGPT"
        shutil.copytree(checkout, repo, ignore=shutil.ignore_patterns(".git", "out-*"))
        shutil.copy(SHAKESPEARE, repo / "data" / "shakespeare_char" / "input.txt")  # prepare.py then skips the download
        subprocess.run([sys.executable, "data/shakespeare_char/prepare.py"], cwd=repo, check=True, capture_output=True)
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "train.py", "config/train_shakespeare_char.py", "--device=cpu",
                              "--compile=False", "--eval_iters=200", "--log_interval=100", "--block_size=64",
                              "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128", f"--max_iters={steps}",
                              f"--lr_decay_iters={steps}", "--dropout=0.0"], cwd=repo, check=True,
                             capture_output=True, text=True).stdout
        wall = time.perf_counter() - start
    return float(re.findall(rf"step {steps}: train loss [0-9.]+, val loss ([0-9.]+)", out)[-1]), wall


def speed(args):
    arch = dict(hidden_size=512, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=8, vocab_size=8192,
                max_position_embeddings=args.seq_len)
    flags = [f"--arch.{k.replace('_', '-')}={v}" for k, v in arch.items() if k != "vocab_size"]
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    peak = matmul_peak(dtype)
    with tempfile.TemporaryDirectory() as tmp:
        summary = run(["pretrain", "--data", str(SHAKESPEARE), "--tokenizer", "smollm2-135m", *flags,
                       "--seq-len", str(args.seq_len), "--train.batch-size", str(args.batch),
                       "--train.max-steps", str(args.steps), "--train.eval-every", "0", "--train.save-every", "0",
                       "--train.bf16", str(args.bf16).lower(), "--eval-fraction", "0", "--out", f"{tmp}/run"])
    ours = summary["tokens_per_s"]
    plain, model = plain_loop(arch, args, dtype)
    per_token = flops_per_token(model, args.seq_len)
    print(f"peak {peak / 1e9:.0f} GFLOP/s ({dtype}), model {summary['params'] / 1e6:.1f}M active parameters")
    print("| loop | tokens/s | MFU |\n|---|---|---|")
    for name, rate in (("llmlab pretrain", ours), ("plain PyTorch loop", plain)):
        print(f"| {name} | {rate:,.0f} | {rate * per_token / peak:.1%} |")
    print(f"llmlab / plain: {ours / plain:.2f}x")


BASE = {"norm": "layernorm", "norm-position": "pre", "ffn": "gelu", "position": "learned"}
ABLATIONS = {
    "positions": [{"position": p} for p in ("learned", "sinusoidal", "rope", "alibi", "none")],
    "norms": [{"norm": n, "norm-position": p, **({"deepnorm": "true"} if d else {})}
              for n in ("layernorm", "rmsnorm") for p, d in (("post", False), ("pre", False), ("sandwich", False),
                                                              ("post", True))],
    "ffn": [{"ffn": f} for f in ("gelu", "swiglu", "geglu")],
    "moe": [{"ffn": "swiglu", "intermediate-size": "688"},  # dense: the active width of 2 experts of 344
            {"ffn": "swiglu", "intermediate-size": "344", "num-experts": "8", "num-experts-per-tok": "2"},
            {"ffn": "swiglu", "intermediate-size": "344", "num-experts": "8", "num-experts-per-tok": "2",
             "moe-aux-loss-coef": "0", "moe-z-loss-coef": "0"}],
}


def ablation(args):
    import json
    import statistics

    from llmlab.evaluate.perplexity import perplexity
    from llmlab.models import load_model

    val = SHAKESPEARE.read_text(encoding="utf-8")[-111540:]  # nanoGPT's validation split
    with tempfile.TemporaryDirectory() as tmp:
        tok = run(["data", "tokenizer", "--input.path", str(SHAKESPEARE), "--kinds", "chars",
                   "--special-tokens", "<|endoftext|>", "--out", f"{tmp}/tok"])["tokenizers"]["chars"]
        for study in args.only.split(","):
            print(f"\n{study}: validation loss at context 64 (mean ± sd over seeds {args.seeds})"
                  + (", and at 128 / 256" if study == "positions" else ""))
            print("| choice | val loss | " + ("128 | 256 | " if study == "positions" else "")
                  + "tokens/s | extra |\n|---|---|" + ("---|---|" if study == "positions" else "") + "---|---|")
            for choice in ABLATIONS[study]:
                if args.where and args.where not in [f"{k}={v}" for k, v in choice.items()]:
                    continue
                arch = {**BASE, **choice}
                flags = [f"--arch.{k}={v}" for k, v in arch.items()]
                losses, longer, rates, extra = [], [], [], ""
                for seed in args.seeds.split(","):
                    out = f"{tmp}/{study}-{len(losses)}-{seed}"
                    summary = run(["pretrain", "--data", str(SHAKESPEARE), "--tokenizer", tok, *SIZE, *RECIPE,
                                   *flags, "--arch.max-position-embeddings", "256",
                                   "--train.max-steps", str(args.steps), "--train.eval-every", str(args.steps),
                                   "--train.save-every", "0", "--train.log-every", "25", "--train.seed", seed,
                                   "--eval-fraction", "0.1", "--eval-windows", "100000", "--out", out])
                    losses.append(summary["eval_loss"])
                    rates.append(summary["tokens_per_s"])
                    if study == "positions":
                        model, tokenizer = load_model(f"{out}/model")
                        longer.append([math.log(perplexity(model, tokenizer, val, seq_len=n, stride=n,
                                                           progress=False)["ppl"]) for n in (128, 256)])
                    if study == "moe":
                        rows = [json.loads(line) for line in Path(f"{out}/metrics.jsonl").read_text().splitlines()]
                        cvs = [r["expert_cv"] for r in rows if "expert_cv" in r]
                        if cvs:
                            extra = f"expert load CV {statistics.mean(cvs[len(cvs) // 2:]):.2f} (second half)"
                sd = f" ± {statistics.stdev(losses):.3f}" if len(losses) > 1 else ""
                long = "".join(f"{statistics.mean(x[i] for x in longer):.3f} | " for i in range(2)) if longer else ""
                print(f"| {', '.join(f'{k}={v}' for k, v in choice.items())} | {statistics.mean(losses):.3f}{sd} | "
                      f"{long}{statistics.mean(rates):,.0f} | {extra} |", flush=True)


ZH = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca_zh"
WIKI = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2_raw" / "wiki.valid.raw"


def vocab(args):
    import json

    from llmlab.evaluate.perplexity import perplexity
    from llmlab.models import load_model
    from llmlab.pretrain.vocab import tokens_per_char

    train = [" ".join(r["output"].split()) for r in json.loads((ZH / "zh-data-part-00.json").read_text("utf-8"))]
    held = [" ".join(r["output"].split()) for r in json.loads((ZH / "zh-data-part-01.json").read_text("utf-8"))]
    held = [t for t in held if len(t) > 20][:args.heldout]
    english = WIKI.read_text(encoding="utf-8")[:60000]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        Path(f"{tmp}/zh.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in train),
                                          encoding="utf-8")
        tok = run(["data", "tokenizer", "--input.path", f"{tmp}/zh.jsonl", "--kinds", "bpe", "--vocab-size", "8000",
                   "--special-tokens", "<|endoftext|>", "--out", f"{tmp}/tok"])
        zh_tok = tok["tokenizers"]["bpe"]
        base = ["pretrain", "--model", "smollm2-135m", "--data", f"{tmp}/zh.jsonl", "--seq-len", "256",
                "--train.batch-size", "4", "--train.max-steps", str(args.steps), "--train.lr", "1e-4",
                "--train.warmup-steps", "10", "--train.weight-decay", "0", "--train.eval-every", "0",
                "--train.save-every", "0", "--eval-fraction", "0", "--train.log-every", "10"]
        models = {"SmolLM2 as shipped": ("smollm2-135m", None)}
        for name, extra in (("extended, no training", None), (f"{args.steps} steps, base tokenizer", []),
                            (f"{args.steps} steps, extended", ["--extend-vocab", zh_tok])):
            if extra is None:
                from llmlab.pretrain.vocab import extend_vocabulary, is_chinese, new_pieces
                from llmlab.data.shards import load_tokenizer

                model, tokenizer = load_model("smollm2-135m")
                extend_vocabulary(model, tokenizer, new_pieces(tokenizer, load_tokenizer(zh_tok), keep=is_chinese))
                models[name] = (model, tokenizer)
                continue
            summary = run([*base, *extra, "--out", f"{tmp}/{len(models)}"])
            models[name] = (summary["saved"], None)
            rows.append((name, summary["seconds"], summary["tokens_per_s"]))
        print("| model | vocabulary | tokens / Chinese char | Chinese per-char ppl | wikitext-2 ppl |")
        print("|---|---|---|---|---|")
        for name, (spec, tokenizer) in models.items():
            model, tokenizer = (spec, tokenizer) if tokenizer is not None else load_model(spec)
            print(f"| {name} | {len(tokenizer):,} | {tokens_per_char(tokenizer, held):.3f} | "
                  f"{char_perplexity(model, tokenizer, held):.2f} | "
                  f"{perplexity(model, tokenizer, english, seq_len=512, stride=512)['ppl']:.2f} |")
    for name, seconds, rate in rows:
        print(f"{name}: {seconds:.0f} s of training, {rate:,.0f} tokens/s")


@torch.no_grad()
def char_perplexity(model, tokenizer, texts: list[str]) -> float:
    """exp(Σ NLL of every token after the first / Σ characters those tokens spell): comparable across tokenizers."""
    import math

    nll, chars = 0.0, 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) < 2:
            continue
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum"))
        chars += len(text) - len(tokenizer.decode(ids[:1]))
    return math.exp(nll / chars)


def plain_loop(arch: dict, args, dtype) -> tuple[float, LabForCausalLM]:
    """The same model, optimizer and windows with nothing around them: the floor of any training loop's overhead."""
    from llmlab.data.shards import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    torch.manual_seed(0)
    model = LabForCausalLM(LabConfig(**{**arch, "vocab_size": -(-len(tok) // 64) * 64})).train()
    data = Windows(Corpus.open(SHAKESPEARE, tok), args.seq_len, "random", count=10 ** 6)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    seconds = 0.0
    for step in range(args.steps):
        x = torch.stack([torch.from_numpy(data[step * args.batch + i]) for i in range(args.batch)])
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            logits = model(input_ids=x[:, :-1], use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= 2:  # the first steps warm the allocator up, as llmlab's first steps do
            seconds += time.perf_counter() - start
    return (args.steps - 2) * args.batch * args.seq_len / seconds, model


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("nanogpt")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--nanogpt", help="a karpathy/nanoGPT checkout to run as the peer")
    p = sub.add_parser("speed")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--bf16", action="store_true")
    p = sub.add_parser("ablation")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seeds", default="0")
    p.add_argument("--only", default="positions,norms,ffn,moe")
    p.add_argument("--where", help="run only the choice with this key=value, e.g. position=sinusoidal")
    p = sub.add_parser("vocab")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--heldout", type=int, default=150)
    args = parser.parse_args()
    {"nanogpt": nanogpt, "speed": speed, "vocab": vocab, "ablation": ablation}[args.what](args)
