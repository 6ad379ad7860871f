"""Beam search over a KV cache, with transformers' scoring and stopping rules.

Keep the k best partial sequences by their summed log-probability; a sequence that ends (EOS,
or the length limit) becomes a finished hypothesis scored with a length penalty α,
    score(y) = Σ_t log p(y_t | y_<t, x) / |y|^α,
and the best finished hypothesis wins. As in transformers (with its default
`early_stopping=False`), each step considers the best max(2, 1 + #EOS)·k continuations so
that k live beams remain even when several end, only the top k of them may finish, and the
search stops once the best live beam, scored at its current length, cannot beat the worst
of k finished hypotheses.

One prompt at a time: the cache holds k rows, one per beam, and is re-ordered every step so
that row i follows the beam that live beam i continues.
"""

import torch

from llmlab.generation import sampling
from llmlab.generation.forward import forward_step, room

DEAD = -1.0e9  # transformers' stand-in for -inf: keeps the arithmetic finite


@torch.inference_mode()
def beam_search(model, prompt: list[int], cfg, eos: list[int]) -> list[int]:
    """New token ids of the best hypothesis for one prompt, EOS excluded."""
    k, T, device = cfg.num_beams, len(prompt), model.device
    n_max = room(model, T, cfg.max_new_tokens)
    ids = torch.tensor([prompt], device=device)
    logits, cache = forward_step(model, ids, None, torch.arange(T, device=device)[None], None)
    cache.batch_repeat_interleave(k)  # the k beams share the prompt's keys and values
    logits = logits.expand(k, -1)
    # Only beam 0 is live at first: the others are copies and would repeat its choices.
    scores = torch.full((k,), DEAD, device=device)
    scores[0] = 0.0
    seqs = ids.expand(k, -1)  # (k, T + generated)
    eos_t = torch.tensor(eos, dtype=torch.long, device=device)
    n_candidates = max(2, 1 + len(eos)) * k
    finished: list[tuple[float, list[int]]] = []  # (score, new ids), best first, at most k

    for step in range(n_max):
        logp = torch.log_softmax(logits.float(), dim=-1)  # (k, V)
        logp = sampling.repetition_penalty(logp, seqs, cfg.repetition_penalty)
        vocab = logp.shape[-1]
        top, flat = torch.topk((logp + scores[:, None]).view(-1), n_candidates)
        source, token = flat // vocab, flat % vocab
        candidates = torch.cat([seqs[source], token[:, None]], dim=1)
        last = step + 1 == n_max
        ends = torch.ones_like(token, dtype=torch.bool) if last else torch.isin(token, eos_t)
        finished = _add_finished(finished, top, candidates[:, T:], ends, k, (step + 1) ** cfg.length_penalty)
        if last:
            break
        going_on = top + ends.float() * DEAD  # an ended candidate cannot continue
        live = torch.topk(going_on, k).indices
        seqs, scores, source = candidates[live], going_on[live], source[live]
        if not _can_improve(scores[0], finished, k, (step + 1) ** cfg.length_penalty):
            break
        cache.reorder_cache(source)
        positions = torch.full((k, 1), T + step, device=device)
        logits, cache = forward_step(model, seqs[:, -1:], None, positions, cache)
    best = finished[0][1]
    return best[:-1] if best and best[-1] in eos else best


def _add_finished(finished, top, new_ids, ends, k: int, norm: float):
    """Merge the candidates that just ended, among the top k only, into the k best finished hypotheses."""
    ended = ends[:k].nonzero().flatten().tolist()
    if not ended:
        return finished
    normed = (top[:k] / norm).tolist()  # float32 division, as transformers does it
    finished = finished + [(normed[i], new_ids[i].tolist()) for i in ended]
    return sorted(finished, key=lambda h: -h[0])[:k]


def _can_improve(best_live: torch.Tensor, finished, k: int, norm: float) -> bool:
    """transformers' `early_stopping=False` heuristic: score the best live beam at its current length."""
    if len(finished) < k:
        return True
    return (best_live / norm).item() > finished[-1][0]
