"""Pretraining benchmarks: nanoGPT's shakespeare-char recipe, and throughput against a plain PyTorch loop.

    python benchmarks/bench_pretrain.py nanogpt [--steps 2000]
    python benchmarks/bench_pretrain.py speed [--steps 30] [--bf16]

`nanogpt` is nanoGPT's CPU recipe for Tiny Shakespeare (README: 4 layers, 4 heads, width 128, context
64, batch 12, 2,000 iterations, lr 1e-3, dropout 0; config/train_shakespeare_char.py: β₂ 0.99, 100
warm-up steps, cosine to 1e-4, weight decay 0.1, no biases; the last 10% of the text held out) with
its choices (LayerNorm, GeLU, learned positions, tied embeddings). nanoGPT's README reports a
validation loss of about 1.88 after about 3 minutes on a laptop CPU. The character tokenizer comes
from `llmlab data tokenizer --kinds chars`; the validation loss is over every held-out window.

`speed` times the same lab decoder (≈20M parameters, LLaMA's choices) under `llmlab pretrain` and
under a plain loop — the model, AdamW and random windows, nothing else — at the same batch,
context and dtype, and reports tokens/s, their ratio and MFU against the matmul peak measured in
the same run.
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch

from _cli import run
from llmlab.data.corpus import Corpus, Windows
from llmlab.models.lab import LabConfig, LabForCausalLM
from llmlab.train.flops import flops_per_token, matmul_peak

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tiny_shakespeare" / "input.txt"
NANOGPT = ["--arch.num-hidden-layers", "4", "--arch.num-attention-heads", "4", "--arch.hidden-size", "128",
           "--arch.norm", "layernorm", "--arch.ffn", "gelu", "--arch.position", "learned", "--seq-len", "64",
           "--train.batch-size", "12", "--train.lr", "1e-3", "--train.min-lr-ratio", "0.1",
           "--train.warmup-steps", "100", "--train.weight-decay", "0.1", "--train.betas", "0.9,0.99",
           "--eval-fraction", "0.1", "--eval-windows", "100000"]


def nanogpt(args):
    with tempfile.TemporaryDirectory() as tmp:
        tok = run(["data", "tokenizer", "--input.path", str(SHAKESPEARE), "--kinds", "chars",
                   "--special-tokens", "<|endoftext|>", "--out", f"{tmp}/tok"])
        start = time.perf_counter()
        summary = run(["pretrain", "--data", str(SHAKESPEARE), "--tokenizer", tok["tokenizers"]["chars"], *NANOGPT,
                       "--train.max-steps", str(args.steps), "--train.eval-every", str(args.steps),
                       "--train.save-every", "0", "--train.log-every", "100", "--train.seed", str(args.seed),
                       "--out", f"{tmp}/run"])
        wall = time.perf_counter() - start
    print(f"| llmlab pretrain, nanoGPT shakespeare-char CPU recipe, seed {args.seed} | {args.steps} steps | val loss "
          f"{summary['eval_loss']:.4f} | {wall:.0f} s wall ({summary['seconds']:.0f} s training) | "
          f"{summary['tokens_per_s']:,.0f} tokens/s | MFU {summary['mfu']:.1%} | nanoGPT README: ≈1.88 |")


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
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("speed")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--bf16", action="store_true")
    args = parser.parse_args()
    {"nanogpt": nanogpt, "speed": speed}[args.what](args)
