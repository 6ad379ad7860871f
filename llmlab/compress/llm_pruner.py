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
says the new sizes, so the saved folder is a plain transformers model with fewer parameters.

Why a *uniform* per-layer ratio. LlamaConfig (and Qwen2/Mistral's) has one intermediate_size,
one num_attention_heads and one num_key_value_heads for every layer; a model whose layers differ
cannot be written as such a config (the paper keeps its first and last layers dense and needs its
own loader). So every layer loses the same number of query heads (the same number in each KV
group, which keeps GQA's num_attention_heads = num_key_value_heads · n_rep valid; `head_dim` is
written explicitly since hidden_size / num_heads no longer gives it) and the same number of FFN
channels; *which* ones is decided per layer by importance. Embeddings and norms are not pruned
(the hidden size couples every layer), but they count in `ratio`, the fraction of all parameters
removed, as in the paper's tables. Attention and FFN are cut at about the same fraction, the
attention one rounded to a whole head per KV group, the FFN one then set to hit `ratio`.

Recovery (the paper's LoRA step, on Alpaca there) is the fine-tuning stage on the saved model:

    llmlab prune --method llm_pruner --sparsity 0.2 --calib FILE --model M --out runs/p20
    llmlab finetune --model runs/p20 --data alpaca_data.json --method lora --train.max-steps 50 --out runs/p20-lora
    llmlab merge --adapter runs/p20-lora --out runs/p20-rec    # a plain, smaller model again

(`--data rows.jsonl --format text` trains on plain {"text": …} rows instead.)
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from llmlab.config import field
from llmlab.errors import LlmlabError
from llmlab.models.layers import decoder_layers

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
IMPORTANCE = ("taylor", "magnitude", "random")
ATTENTION = ("auto", "heads", "groups", "none")


@dataclass
class LLMPrunerConfig:
    ratio: float = field(0.2, help="fraction of the model's parameters to remove (embeddings count, are kept)")
    attention: str = field("auto", help="heads: query heads, the same number per KV group; groups: whole KV "
                                        "groups; none: FFN channels only; auto: heads under GQA, else groups")
    importance: str = field("taylor", help="taylor: Σ|w·∂L/∂w| per group; magnitude: Σ|w|; random (baselines)")
    batch_size: int = field(2, help="calibration windows per forward/backward when taking gradients")
    seed: int = field(0, help="seed of the random importance baseline")

    def __post_init__(self):
        if not 0 < self.ratio < 1:
            raise LlmlabError(f"llm_pruner ratio must be in (0, 1) (fraction of parameters removed), got {self.ratio}")
        if self.attention not in ATTENTION:
            raise LlmlabError(f"llm_pruner attention must be one of {', '.join(ATTENTION)}, got '{self.attention}'")
        if self.importance not in IMPORTANCE:
            raise LlmlabError(f"llm_pruner importance must be one of {', '.join(IMPORTANCE)}, got '{self.importance}'")
        if self.batch_size < 1:
            raise LlmlabError(f"llm_pruner batch_size must be at least 1, got {self.batch_size}")


@dataclass
class Dims:
    """The sizes of one LLaMA-style layer (all layers share them)."""
    kv: int       # key/value heads
    n_rep: int    # query heads per KV head
    d: int        # head_dim
    ffn: int      # intermediate channels


def prune_llm_pruner(model, calib: Tensor | None, cfg: LLMPrunerConfig | None = None):
    """Remove the least important head/channel groups of every layer in place; returns the model.

    `calib` (n, T) token ids give the gradients of the Taylor importance (ignored by the baselines).
    """
    cfg = cfg or LLMPrunerConfig()
    dims = layer_dims(model)
    keep_heads, keep_kv, keep_ffn = plan(model, dims, cfg)
    if cfg.importance == "taylor" and calib is None:
        raise LlmlabError("llm_pruner's taylor importance needs calibration data: pass calib ids (or --calib FILE)")
    scores = group_importance(model, calib, cfg, dims)
    for layer, score in zip(decoder_layers(model), scores):
        heads = _pick_heads(score, keep_kv, keep_heads)  # kept query heads, sorted, grouped by KV head
        kv = sorted({h // dims.n_rep for h in heads})
        channels = score["channel"].topk(keep_ffn).indices.sort().values
        _shrink_layer(layer, dims, heads, kv, channels)
        layer.self_attn.num_key_value_groups = keep_heads
    config = model.config.get_text_config()
    config.head_dim = dims.d  # no longer hidden_size // num_attention_heads
    config.num_attention_heads, config.num_key_value_heads = keep_kv * keep_heads, keep_kv
    config.intermediate_size = keep_ffn
    return model


def layer_dims(model) -> Dims:
    """Dims of a LLaMA-style model; LlmlabError for architectures without q/k/v/o and gate/up/down."""
    layers = decoder_layers(model)
    for layer in layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if not all(isinstance(getattr(attn, n, None), nn.Linear) for n in ATTN) or \
                not all(isinstance(getattr(mlp, n, None), nn.Linear) for n in MLP):
            raise LlmlabError(f"llm_pruner handles LLaMA-style layers (q/k/v/o_proj, gate/up/down_proj); "
                              f"{type(model).__name__} has none: use magnitude, wanda or sparsegpt")
    config = model.config.get_text_config()
    d = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv = config.num_key_value_heads or config.num_attention_heads
    return Dims(kv=kv, n_rep=config.num_attention_heads // kv, d=d, ffn=config.intermediate_size)


def n_params(model) -> int:
    """Parameters, a tied tensor counted once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _layer_params(layer, dims: Dims, kv: int, heads: int, ffn: int) -> int:
    """Parameters of `layer`'s linears with kv KV heads, `heads` query heads per KV head, ffn channels."""
    attn, mlp, d = layer.self_attn, layer.mlp, dims.d
    q_rows, kv_rows, hidden = kv * heads * d, kv * d, attn.q_proj.in_features
    bias = lambda m, n: n if m.bias is not None else 0  # noqa: E731
    return (q_rows * hidden + bias(attn.q_proj, q_rows) + 2 * (kv_rows * hidden + bias(attn.k_proj, kv_rows))
            + hidden * q_rows + bias(attn.o_proj, hidden)
            + 2 * (ffn * hidden + bias(mlp.gate_proj, ffn)) + hidden * ffn + bias(mlp.down_proj, hidden))


def plan(model, dims: Dims, cfg: LLMPrunerConfig) -> tuple[int, int, int]:
    """(query heads per KV group, KV groups, FFN channels) kept in every layer to remove cfg.ratio of all params.

    Attention is cut at the layers' own fraction (rounded to whole heads, at least one kept), the
    FFN channel count then chosen to land nearest the target.
    """
    layers = decoder_layers(model)
    total, L = n_params(model), len(layers)
    dense = _layer_params(layers[0], dims, dims.kv, dims.n_rep, dims.ffn)
    per_layer = dense - cfg.ratio * total / L  # parameters a layer keeps
    frac = per_layer / dense
    mode = cfg.attention if cfg.attention != "auto" else ("heads" if dims.n_rep > 1 else "groups")
    heads = max(1, round(dims.n_rep * frac)) if mode == "heads" else dims.n_rep
    kv = max(1, round(dims.kv * frac)) if mode == "groups" else dims.kv
    attn_only = _layer_params(layers[0], dims, kv, heads, 0)
    per_channel = _layer_params(layers[0], dims, kv, heads, 1) - attn_only
    ffn = min(dims.ffn, round((per_layer - attn_only) / per_channel))
    if ffn < 1:
        most = 1 - (L * _layer_params(layers[0], dims, 1 if mode == "groups" else dims.kv,
                                      1 if mode == "heads" else heads, 1) + total - L * dense) / total
        raise LlmlabError(f"llm_pruner cannot remove {cfg.ratio:.0%} of the parameters with attention={mode}: "
                          f"embeddings and norms are kept, so at most {most:.1%} can go; lower the ratio")
    return heads, kv, ffn


def group_importance(model, calib: Tensor | None, cfg: LLMPrunerConfig, dims: Dims) -> list[dict[str, Tensor]]:
    """Per layer: {"head": (kv·n_rep,) query-head scores, "kv": (kv,) KV-head-only scores, "channel": (ffn,)}.

    A query head's score is its q rows and o columns; a KV group's importance is "kv" plus the
    scores of its query heads (see `_pick_heads`). Each score is Σ over the group of `element(w)`.
    """
    if cfg.importance == "taylor":
        element = _taylor(model, calib, cfg.batch_size)
    elif cfg.importance == "magnitude":
        element = lambda m: m.weight.detach().abs(), lambda m: m.bias.detach().abs()  # noqa: E731
    else:
        gen = torch.Generator().manual_seed(cfg.seed)
        element = (lambda m: torch.rand(m.weight.shape, generator=gen).to(m.weight.device),
                   lambda m: torch.zeros_like(m.bias))
    weight, bias = element
    scores = []
    for layer in decoder_layers(model):
        a, m = layer.self_attn, layer.mlp
        rows = lambda lin: weight(lin).float().sum(1) + (bias(lin).float() if lin.bias is not None else 0)  # noqa: E731
        cols = lambda lin: weight(lin).float().sum(0)  # noqa: E731
        head = (rows(a.q_proj) + cols(a.o_proj)).view(-1, dims.d).sum(1)  # (kv·n_rep,)
        kv = (rows(a.k_proj) + rows(a.v_proj)).view(-1, dims.d).sum(1)  # (kv,)
        channel = rows(m.gate_proj) + rows(m.up_proj) + cols(m.down_proj)  # (ffn,)
        scores.append({"head": head, "kv": kv, "channel": channel})
    return scores


def _taylor(model, calib: Tensor, batch_size: int):
    """|w · ∂L/∂w| element-wise, L the mean next-token cross-entropy over the calibration windows."""
    if calib.ndim != 2 or calib.shape[1] < 2:
        raise LlmlabError(f"calibration ids must be (n_samples, seq_len >= 2), got shape {tuple(calib.shape)}")
    grads = calibration_gradients(model, calib, batch_size)
    return (lambda m: (m.weight.detach() * grads[id(m.weight)]).abs(),
            lambda m: (m.bias.detach() * grads[id(m.bias)]).abs())


def calibration_gradients(model, calib: Tensor, batch_size: int) -> dict[int, Tensor]:
    """∂L/∂p for every decoder-layer linear's weight and bias (keyed by id of the parameter), L averaged over batches."""
    targets = [p for layer in decoder_layers(model) for n in (*ATTN, *MLP)
               for lin in [layer.get_submodule(("self_attn." if n in ATTN else "mlp.") + n)]
               for p in (lin.weight, lin.bias) if p is not None]
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():  # embeddings and head need no gradient: a third of the memory
        p.requires_grad_(False)
    for p in targets:
        p.requires_grad_(True)
        p.grad = None
    device, batches = targets[0].device, calib.split(batch_size)
    try:
        with torch.enable_grad():
            for batch in tqdm(batches, desc="llm_pruner gradients", unit="batch", disable=None, leave=False):
                batch = batch.to(device)
                logits = model(input_ids=batch, use_cache=False).logits  # (B, T, V)
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten())
                (loss / len(batches)).backward()
        return {id(p): p.grad.detach() for p in targets}
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None


def _pick_heads(score: dict, keep_kv: int, keep_heads: int) -> list[int]:
    """Query heads kept: the best `keep_kv` KV groups (group score = its KV head + its query heads), and
    in each the `keep_heads` best query heads. Sorted, so kept head order follows the KV groups."""
    n_kv = score["kv"].numel()
    head = score["head"].view(n_kv, -1)  # (kv, n_rep)
    groups = (score["kv"] + head.sum(1)).topk(keep_kv).indices.sort().values
    n_rep = head.shape[1]
    return [int(g) * n_rep + int(r) for g in groups for r in head[g].topk(keep_heads).indices.sort().values]


@torch.no_grad()
def _shrink_layer(layer, dims: Dims, heads: list[int], kv: list[int], channels: Tensor) -> None:
    """Rebuild the layer's linears keeping only the given query heads, KV heads and FFN channels."""
    a, m, d = layer.self_attn, layer.mlp, dims.d
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
