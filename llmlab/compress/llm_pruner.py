"""LLM-Pruner: structured pruning of coupled groups by first-order (Taylor) importance.

Ma, Fang & Wang 2023, "LLM-Pruner: On the Structural Pruning of Large Language Models",
https://arxiv.org/abs/2305.11627. A *group* is a set of weights that must go together for the
network to stay a smaller network of the same kind (§3.1, dependency graph). In a LLaMA layer:

    query head h      rows h·d..(h+1)·d of q_proj  +  the same columns of o_proj
    KV group j        rows j·d.. of k_proj, v_proj  +  its n_rep query heads (GQA: heads j·n_rep..)
    FFN channel c     row c of gate_proj and up_proj  +  column c of down_proj

The importance of a group is the first-order Taylor estimate of the loss change when its weights
are zeroed (§3.2, element-wise, "param_first"), summed over the group:

    I(G) = Σ_{w ∈ G} |w · ∂L/∂w|,       L = calibration cross-entropy

The least important groups are removed for real: the linears are rebuilt smaller and the config
says the new sizes, so the saved folder is a transformers model with fewer parameters.

Which layers. The paper keeps the first and last layers dense (for LLaMA-7B its scripts prune
layers 4..29 of 32: block_*_layer_start=4, end=30), because they matter most for the loss, and
prunes the others harder so that the whole model still loses `ratio` of its parameters. Here
`skip_first` / `skip_last` say how many stay dense; by default 1/8 and 1/16 of the layers (4 and 2
of 32, and of SmolLM2's 30; none in other architectures, which have no per-layer config). On
SmolLM2-135M at 20% this takes perplexity from 230 (all layers alike) to 96. Every pruned layer
loses the same number of parameters: its query heads are cut at the layer's own fraction (the same
number in each KV group, so GQA stays valid), rounded to whole heads with at least one kept, and
its FFN channels then chosen to land nearest; *which* heads and channels is decided per layer by
importance. Embeddings and norms are not pruned (the hidden size couples every layer) but count
in `ratio`, the fraction of all parameters removed, as in the paper's tables. When every layer is
pruned alike (skip_first = skip_last = 0, or a 2-layer test model) the config is the model's own
LlamaConfig / Qwen2Config (backward compatible); otherwise, or when the head count no longer
divides hidden_size (which LlamaConfig refuses), it is `llmlab_llama` (llmlab/models/llmlab_llama.py),
a LLaMA with per-layer sizes that `load_model` and, after `import llmlab.models`,
AutoModelForCausalLM load.

LoRAPrune importance (`importance="lora"`). Zhang et al. 2023, "LoRAPrune: Structured Pruning Meets
Low-Rank Parameter-Efficient Fine-Tuning", https://arxiv.org/abs/2305.18403. The full weight
gradients cost as much memory as the weights; LoRAPrune estimates them from the gradients of a
LoRA W + s·BA (B ∈ R^{out×r}, A ∈ R^{r×in}) alone, as the change of BA under a unit step on A and B:

    ∂L/∂W ≈ Ĝ = G_B·A + B·G_A − G_B·G_A,        G_A = ∂L/∂A,  G_B = ∂L/∂B
    Î(w) = |(W + s·BA) ⊙ Ĝ|,                     Ī ← λ·Ī + (1 − λ)·Î over batches (λ = 0.9 there)

summed over each group as above (the reference code also L2-normalises each linear's scores; this
does not, so "taylor" and "lora" differ only in the gradient). A temporary llmlab LoRA (rank
`lora_r`) is put on every projection for the gradient pass and removed after. It is fresh, so B = 0
and Ĝ = s·(∂L/∂W)·AᵀA: a rank-r random sketch of the full gradient; LoRAPrune prunes iteratively
while it fine-tunes, when B ≠ 0. `ema` = 0 scores the gradients of the mean loss, like "taylor".

Recovery (the paper's LoRA step, on Alpaca there) is the fine-tuning stage on the saved model:

    llmlab prune --method llm_pruner --sparsity 0.2 --calib FILE --model M --out runs/p20
    llmlab finetune --model runs/p20 --data alpaca_data.json --method lora --train.max-steps 50 --out runs/p20-lora
    llmlab merge --adapter runs/p20-lora --out runs/p20-rec    # a smaller model again

(`--data rows.jsonl --format text` trains on plain {"text": …} rows instead.)
"""

from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from llmlab.config import field
from llmlab.errors import LlmlabError
from llmlab.models.layers import decoder_layers
from llmlab.models.llmlab_llama import MODEL_TYPE, as_llmlab_llama
from llmlab.models.surgery import count_parameters
from llmlab.peft.base import adapter_modules, delete_adapter
from llmlab.peft.lora import LoraConfig, apply_lora

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
IMPORTANCE = ("taylor", "lora", "magnitude", "random")
ATTENTION = ("auto", "heads", "groups", "none")
LLAMA = ("llama", MODEL_TYPE)  # the model types whose layers may differ (written as llmlab_llama)
LORA_ADAPTER = "llm_pruner"  # the temporary adapter of importance="lora"


@dataclass
class LLMPrunerConfig:
    ratio: float = field(0.2, help="fraction of the model's parameters to remove (embeddings count, are kept)")
    attention: str = field("auto", help="heads: query heads, the same number per KV group; groups: whole KV "
                                        "groups; none: FFN channels only; auto: heads under GQA, else groups")
    importance: str = field("taylor", help="taylor: Σ|w·∂L/∂w| per group; lora: LoRAPrune's Σ|(W+sBA)·Ĝ|, Ĝ "
                                           "from a temporary LoRA's gradients; magnitude: Σ|w|; random (baselines)")
    skip_first: int | None = field(None, help="first layers kept dense (the paper's block_*_layer_start); "
                                              "default: 1/8 of the layers for LLaMA models, 0 for others")
    skip_last: int | None = field(None, help="last layers kept dense (layers - the paper's block_*_layer_end); "
                                             "default: 1/16 of the layers for LLaMA, 0 for others; "
                                             "0 and 0 prune every layer alike (a plain config)")
    lora_r: int = field(8, help="rank of the temporary LoRA of importance=lora")
    ema: float = field(0.0, help="importance=lora: λ of the average Ī ← λĪ + (1-λ)Î over calibration batches "
                                 "(LoRAPrune: 0.9); 0: Î of the mean loss's gradients")
    batch_size: int = field(2, help="calibration windows per forward/backward when taking gradients")
    seed: int = field(0, help="seed of the random importance baseline and of the temporary LoRA's A")

    def __post_init__(self):
        if not 0 < self.ratio < 1:
            raise LlmlabError(f"llm_pruner ratio must be in (0, 1) (fraction of parameters removed), got {self.ratio}")
        if self.attention not in ATTENTION:
            raise LlmlabError(f"llm_pruner attention must be one of {', '.join(ATTENTION)}, got '{self.attention}'")
        if self.importance not in IMPORTANCE:
            raise LlmlabError(f"llm_pruner importance must be one of {', '.join(IMPORTANCE)}, got '{self.importance}'")
        if self.batch_size < 1:
            raise LlmlabError(f"llm_pruner batch_size must be at least 1, got {self.batch_size}")
        if min(self.skip_first or 0, self.skip_last or 0) < 0:
            raise LlmlabError(f"llm_pruner skip_first and skip_last count layers kept dense: give 0 or more, "
                              f"got {self.skip_first} and {self.skip_last}")
        if self.lora_r < 1 or not 0 <= self.ema < 1:
            raise LlmlabError(f"llm_pruner lora_r must be at least 1 and ema in [0, 1), got {self.lora_r} and "
                              f"{self.ema}")


@dataclass
class Dims:
    """The sizes of one LLaMA-style layer."""
    kv: int       # key/value heads
    n_rep: int    # query heads per KV head
    d: int        # head_dim
    ffn: int      # intermediate channels


def prune_llm_pruner(model, calib: Tensor | None, cfg: LLMPrunerConfig | None = None):
    """Remove the least important head/channel groups of the pruned layers in place; returns the model.

    `calib` (n, T) token ids give the gradients of the taylor and lora importance (the baselines need none).
    """
    cfg = cfg or LLMPrunerConfig()
    dims = layer_dims(model)
    pruned = pruned_layers(model, cfg)
    keep = plan(model, dims, pruned, cfg)
    if cfg.importance in ("taylor", "lora") and calib is None:
        raise LlmlabError(f"llm_pruner's {cfg.importance} importance needs calibration data: pass calib ids "
                          "(or --calib FILE)")
    scores = group_importance(model, calib, cfg, dims)
    layers = decoder_layers(model)
    for i in pruned:
        heads = _pick_heads(scores[i], keep[i].kv, keep[i].n_rep)  # kept query heads, sorted, grouped by KV head
        kv = sorted({h // dims[i].n_rep for h in heads})
        channels = scores[i]["channel"].topk(keep[i].ffn).indices.sort().values
        _shrink_layer(layers[i], dims[i].d, heads, kv, channels)
        layers[i].self_attn.num_key_value_groups = keep[i].n_rep
    _write_config(model, keep)
    return model


def layer_dims(model) -> list[Dims]:
    """Each layer's Dims, read from its linears; LlmlabError for architectures without q/k/v/o and gate/up/down."""
    config = model.config.get_text_config()
    d = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dims = []
    for layer in decoder_layers(model):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if not all(isinstance(getattr(attn, n, None), nn.Linear) for n in ATTN) or \
                not all(isinstance(getattr(mlp, n, None), nn.Linear) for n in MLP):
            raise LlmlabError(f"llm_pruner handles LLaMA-style layers (q/k/v/o_proj, gate/up/down_proj) of plain "
                              f"nn.Linear; {type(model).__name__} has none (merge adapters first, or use magnitude, "
                              f"wanda or sparsegpt)")
        kv = attn.k_proj.out_features // d
        dims.append(Dims(kv=kv, n_rep=attn.q_proj.out_features // (kv * d), d=d, ffn=mlp.gate_proj.out_features))
    return dims


def pruned_layers(model, cfg: LLMPrunerConfig) -> range:
    """The layers pruned: all but the first skip_first and the last skip_last (defaults in the module docstring)."""
    n = len(decoder_layers(model))
    model_type = model.config.model_type  # the whole model's: llmlab_llama is a LlamaForCausalLM
    first = cfg.skip_first if cfg.skip_first is not None else (round(n / 8) if model_type in LLAMA else 0)
    last = cfg.skip_last if cfg.skip_last is not None else (round(n / 16) if model_type in LLAMA else 0)
    if first + last >= n:
        raise LlmlabError(f"llm_pruner skip_first {first} + skip_last {last} leave none of the model's {n} layers "
                          "to prune; skip fewer")
    if (first or last) and model_type not in LLAMA:
        raise LlmlabError(f"llm_pruner keeps layers dense only in LLaMA models (written as {MODEL_TYPE}); "
                          f"a {model_type} model is pruned alike in every layer: set skip_first and skip_last to 0")
    return range(first, n - last)


def n_params(model) -> int:
    """Parameters, a tied tensor counted once."""
    return count_parameters(model)


def _layer_params(layer, dims: Dims) -> int:
    """Parameters of `layer`'s linears at the sizes `dims` (bias where the layer has one)."""
    attn, mlp, hidden = layer.self_attn, layer.mlp, layer.self_attn.q_proj.in_features
    q_rows, kv_rows, ffn = dims.kv * dims.n_rep * dims.d, dims.kv * dims.d, dims.ffn
    bias = lambda m, n: n if m.bias is not None else 0  # noqa: E731
    return (q_rows * hidden + bias(attn.q_proj, q_rows) + 2 * (kv_rows * hidden + bias(attn.k_proj, kv_rows))
            + hidden * q_rows + bias(attn.o_proj, hidden)
            + 2 * (ffn * hidden + bias(mlp.gate_proj, ffn)) + hidden * ffn + bias(mlp.down_proj, hidden))


def plan(model, dims: list[Dims], pruned: range, cfg: LLMPrunerConfig) -> list[Dims]:
    """The Dims every layer keeps: its own for the dense ones; the pruned ones each lose an equal share of
    cfg.ratio of all parameters, attention at the layer's own fraction (whole heads, at least one
    kept), then the FFN channel count that lands nearest."""
    layers, total = decoder_layers(model), n_params(model)
    budget = cfg.ratio * total / len(pruned)  # parameters each pruned layer loses
    keep = list(dims)
    for i in pruned:
        mode = _mode(cfg.attention, dims[i])
        frac = 1 - budget / _layer_params(layers[i], dims[i])  # the fraction of the layer kept
        heads = max(1, round(dims[i].n_rep * frac)) if mode == "heads" else dims[i].n_rep
        kv = max(1, round(dims[i].kv * frac)) if mode == "groups" else dims[i].kv
        attn_only = _layer_params(layers[i], replace(dims[i], kv=kv, n_rep=heads, ffn=0))
        per_channel = _layer_params(layers[i], replace(dims[i], kv=kv, n_rep=heads, ffn=1)) - attn_only
        ffn = round((_layer_params(layers[i], dims[i]) - budget - attn_only) / per_channel)
        keep[i] = replace(dims[i], kv=kv, n_rep=heads, ffn=min(dims[i].ffn, ffn))
    if any(k.ffn < 1 for k in keep):
        smallest = [_layer_params(layers[i], _smallest(dims[i], _mode(cfg.attention, dims[i]))) for i in pruned]
        most = sum(_layer_params(layers[i], dims[i]) for i in pruned) - sum(smallest)
        raise LlmlabError(f"llm_pruner cannot remove {cfg.ratio:.0%} of the parameters with attention="
                          f"{cfg.attention} and layers {pruned.start}..{pruned.stop - 1} pruned: embeddings, norms "
                          f"and the dense layers are kept, so at most {most / total:.1%} can go; lower the ratio or "
                          "skip fewer layers")
    _check_writable(model, keep)
    return keep


def _mode(attention: str, dims: Dims) -> str:
    return attention if attention != "auto" else ("heads" if dims.n_rep > 1 else "groups")


def _smallest(dims: Dims, mode: str) -> Dims:
    """The least a layer may keep: one query head per KV group or one KV group, one FFN channel."""
    return replace(dims, kv=1 if mode == "groups" else dims.kv, n_rep=1 if mode == "heads" else dims.n_rep, ffn=1)


def _plain(config, keep: list[Dims]) -> bool:
    """Whether the kept sizes fit the model's own config: one size for all layers, heads dividing hidden_size."""
    k = keep[0]
    return (config.model_type != MODEL_TYPE and len({(d.kv, d.n_rep, d.ffn) for d in keep}) == 1
            and config.hidden_size % (k.kv * k.n_rep) == 0)


def _check_writable(model, keep: list[Dims]) -> None:
    """Non-LLaMA models have no per-layer config (llmlab_llama is a LLaMA): fail before anything changes."""
    config = model.config.get_text_config()
    if model.config.model_type not in LLAMA and not _plain(config, keep):
        k = keep[0]
        raise LlmlabError(f"llm_pruner would leave {k.kv * k.n_rep} query heads, which a {config.model_type} config "
                          f"cannot hold (hidden_size {config.hidden_size} is not a multiple of them); "
                          "choose another ratio or attention mode")


def _write_config(model, keep: list[Dims]) -> None:
    """Say the new sizes: in the model's own config when they fit it, else as llmlab_llama."""
    config = model.config.get_text_config()
    config.head_dim = keep[0].d  # no longer hidden_size // num_attention_heads
    if not _plain(config, keep):
        as_llmlab_llama(model)
        return
    k = keep[0]
    config.num_attention_heads, config.num_key_value_heads = k.kv * k.n_rep, k.kv
    config.intermediate_size = k.ffn


def group_importance(model, calib: Tensor | None, cfg: LLMPrunerConfig, dims: list[Dims]) -> list[dict[str, Tensor]]:
    """Per layer: {"head": (kv·n_rep,) query-head scores, "kv": (kv,) KV-head-only scores, "channel": (ffn,)}.

    A query head's score is its q rows and o columns; a KV group's importance is "kv" plus the
    scores of its query heads (see `_pick_heads`). Each score is Σ over the group of `element(w)`.
    """
    if cfg.importance == "taylor":
        element = _taylor(model, calib, cfg.batch_size)
    elif cfg.importance == "lora":
        element = _lora_taylor(model, calib, cfg)
    elif cfg.importance == "magnitude":
        element = lambda m: m.weight.detach().abs(), lambda m: m.bias.detach().abs()  # noqa: E731
    else:
        gen = torch.Generator().manual_seed(cfg.seed)
        element = (lambda m: torch.rand(m.weight.shape, generator=gen).to(m.weight.device),
                   lambda m: torch.zeros_like(m.bias))
    weight, bias = element
    scores = []
    for layer, dim in zip(decoder_layers(model), dims):
        a, m = layer.self_attn, layer.mlp
        rows = lambda lin: weight(lin).float().sum(1) + (bias(lin).float() if lin.bias is not None else 0)  # noqa: E731
        cols = lambda lin: weight(lin).float().sum(0)  # noqa: E731
        head = (rows(a.q_proj) + cols(a.o_proj)).view(-1, dim.d).sum(1)  # (kv·n_rep,)
        kv = (rows(a.k_proj) + rows(a.v_proj)).view(-1, dim.d).sum(1)  # (kv,)
        channel = rows(m.gate_proj) + rows(m.up_proj) + cols(m.down_proj)  # (ffn,)
        scores.append({"head": head, "kv": kv, "channel": channel})
    return scores


def _check_calib(calib: Tensor) -> None:
    if calib.ndim != 2 or calib.shape[1] < 2:
        raise LlmlabError(f"calibration ids must be (n_samples, seq_len >= 2), got shape {tuple(calib.shape)}")


def _taylor(model, calib: Tensor, batch_size: int):
    """|w · ∂L/∂w| element-wise, L the mean next-token cross-entropy over the calibration windows."""
    _check_calib(calib)
    grads = calibration_gradients(model, calib, batch_size)
    return (lambda m: (m.weight.detach() * grads[id(m.weight)]).abs(),
            lambda m: (m.bias.detach() * grads[id(m.bias)]).abs())


def _lora_taylor(model, calib: Tensor, cfg: LLMPrunerConfig):
    """LoRAPrune's |(W + s·BA) ⊙ Ĝ| element-wise, from a temporary LoRA's gradients (module docstring)."""
    _check_calib(calib)
    with _temporary_lora(model, cfg) as wrappers:
        loras = [w.adapters[LORA_ADAPTER] for w in wrappers]
        params = [p for lora in loras for p in (lora.A.weight, lora.B.weight)]
        batches = batch_gradients(model, calib, cfg.batch_size, params)
        if not cfg.ema:
            batches = [_mean(batches)]
        scores = None
        for grads in batches:
            new = [lora_importance(w.base_layer.weight, lora, g_a, g_b)
                   for w, lora, g_a, g_b in zip(wrappers, loras, grads[0::2], grads[1::2])]
            scores = new if scores is None else [cfg.ema * s + (1 - cfg.ema) * n for s, n in zip(scores, new)]
        by_weight = {id(w.base_layer.weight): s for w, s in zip(wrappers, scores)}
    return lambda m: by_weight[id(m.weight)], lambda m: torch.zeros_like(m.bias)  # LoRA has no bias gradient


def lora_importance(weight: Tensor, lora, grad_a: Tensor, grad_b: Tensor) -> Tensor:
    """Î = |(W + s·BA) ⊙ Ĝ|, Ĝ = G_B·A + B·G_A − G_B·G_A: LoRAPrune's ∂L/∂W from the LoRA gradients."""
    A, B = lora.A.weight.detach().float(), lora.B.weight.detach().float()  # (r, in), (out, r)
    G_A, G_B = grad_a.float(), grad_b.float()
    G = G_B @ A + B @ G_A - G_B @ G_A  # (out, in)
    return ((weight.detach().float() + lora.delta_weight().detach().float()) * G).abs()


@contextmanager
def _temporary_lora(model, cfg: LLMPrunerConfig):
    """A fresh LoRA on every projection (B = 0: the model's outputs are unchanged), gone on exit."""
    with _kept_flags(model):  # apply_lora freezes the base model
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)  # A's random init, the same for the same seed
            apply_lora(model, LoraConfig(r=cfg.lora_r, targets=[*ATTN, *MLP]), name=LORA_ADAPTER)
        try:
            yield [m for _, m in adapter_modules(model) if LORA_ADAPTER in m.adapters]
        finally:
            delete_adapter(model, LORA_ADAPTER)


def calibration_gradients(model, calib: Tensor, batch_size: int, params: list | None = None) -> dict[int, Tensor]:
    """∂L/∂p keyed by id(p), L averaged over batches; `params` default to each decoder linear's weight and bias."""
    if params is None:
        params = [p for layer in decoder_layers(model) for n in (*ATTN, *MLP)
                  for lin in [layer.get_submodule(("self_attn." if n in ATTN else "mlp.") + n)]
                  for p in (lin.weight, lin.bias) if p is not None]
    return dict(zip(map(id, params), _mean(batch_gradients(model, calib, batch_size, params))))


def batch_gradients(model, calib: Tensor, batch_size: int, params: list):
    """Per calibration batch, the gradients of its mean next-token cross-entropy w.r.t. `params`, the only
    tensors that take gradients meanwhile (embeddings and head need none: a third of the memory)."""
    with _kept_flags(model), torch.enable_grad():
        model.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        for batch in tqdm(calib.split(batch_size), desc="llm_pruner gradients", unit="batch", disable=None,
                          leave=False):
            batch = batch.to(params[0].device)
            logits = model(input_ids=batch, use_cache=False).logits  # (B, T, V)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten())
            yield [g.detach() for g in torch.autograd.grad(loss, params)]


def _mean(batches) -> list[Tensor]:
    total, n = None, 0
    for grads in batches:
        total, n = grads if total is None else [t + g for t, g in zip(total, grads)], n + 1
    return [t / n for t in total]


@contextmanager
def _kept_flags(model):
    """Restore every parameter's requires_grad on exit."""
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)


def _pick_heads(score: dict, keep_kv: int, keep_heads: int) -> list[int]:
    """Query heads kept: the best `keep_kv` KV groups (group score = its KV head + its query heads), and
    in each the `keep_heads` best query heads. Sorted, so kept head order follows the KV groups."""
    n_kv = score["kv"].numel()
    head = score["head"].view(n_kv, -1)  # (kv, n_rep)
    groups = (score["kv"] + head.sum(1)).topk(keep_kv).indices.sort().values
    n_rep = head.shape[1]
    return [int(g) * n_rep + int(r) for g in groups for r in head[g].topk(keep_heads).indices.sort().values]


@torch.no_grad()
def _shrink_layer(layer, d: int, heads: list[int], kv: list[int], channels: Tensor) -> None:
    """Rebuild the layer's linears keeping only the given query heads, KV heads and FFN channels."""
    a, m = layer.self_attn, layer.mlp
    q_idx = _expand(heads, d, a.q_proj.weight.device)
    kv_idx = _expand(kv, d, a.q_proj.weight.device)
    a.q_proj, a.k_proj, a.v_proj = (_take(a.q_proj, rows=q_idx), _take(a.k_proj, rows=kv_idx),
                                    _take(a.v_proj, rows=kv_idx))
    a.o_proj = _take(a.o_proj, cols=q_idx)
    channels = channels.to(m.gate_proj.weight.device)
    m.gate_proj, m.up_proj = _take(m.gate_proj, rows=channels), _take(m.up_proj, rows=channels)
    m.down_proj = _take(m.down_proj, cols=channels)


def _expand(heads: list[int], d: int, device) -> Tensor:
    """Row indices of whole heads: head h is rows h·d..(h+1)·d."""
    return (torch.tensor(heads, device=device)[:, None] * d + torch.arange(d, device=device)).flatten()


def _take(linear: nn.Linear, rows: Tensor | None = None, cols: Tensor | None = None) -> nn.Linear:
    """A new, smaller nn.Linear with the chosen output rows or input columns of `linear`."""
    w = linear.weight
    w = w[rows] if rows is not None else w
    w = w[:, cols] if cols is not None else w
    b = linear.bias
    b = b[rows] if b is not None and rows is not None else b
    new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
    new.weight.copy_(w)
    if b is not None:
        new.bias.copy_(b)
    new.weight.requires_grad_(linear.weight.requires_grad)
    return new
