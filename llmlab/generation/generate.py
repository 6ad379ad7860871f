"""llmlab's own decoding loop: prefill a left-padded batch once, then one token per step from a KV cache.

The model is any transformers causal LM; only its forward pass is used, with its cache argument
(a `DynamicCache`, passed as `cache` or `past_key_values`: see forward.py) carrying the keys and
values of everything seen so far, so each step feeds one new token per sequence. transformers'
`model.generate` is the oracle in the tests and the peer in `benchmarks/bench_generate.py`.

Left padding keeps every sequence's last token in the last column, so one step serves the whole
batch; the attention mask hides the pads and the position ids count real tokens only,
    position_t = (Σ_{s ≤ t} mask_s) - 1,
so a padded prompt sees exactly what it would see alone.
"""

import re
from dataclasses import dataclass

import torch

from llmlab.config import field
from llmlab.errors import LlmlabError
from llmlab.generation import sampling
from llmlab.generation.beam import beam_search
from llmlab.generation.forward import forward_step, room


@dataclass
class SamplingConfig:
    max_new_tokens: int = field(128, help="the most tokens to generate per prompt")
    temperature: float = field(0.0, help="softmax temperature; 0 = greedy")
    top_k: int = field(0, help="sample only from the k most likely tokens; 0 = off")
    top_p: float = field(1.0, help="sample only from the smallest set of tokens with this probability mass")
    repetition_penalty: float = field(1.0, help="CTRL penalty for tokens already in the sequence; 1 = off")
    num_beams: int = field(1, help="beam search with this many beams; 1 = off")
    length_penalty: float = field(1.0, help="beam search: score = log p / length**length_penalty")
    stop: list[str] = field([], help="stop strings (comma-separated); the output ends before the first one")
    seed: int = field(0, help="seed of the sampling RNG")
    ignore_eos: bool = field(False, help="keep going past the end-of-sequence token (benchmarks)")

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise LlmlabError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise LlmlabError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise LlmlabError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise LlmlabError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise LlmlabError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        if self.num_beams < 1:
            raise LlmlabError(f"num_beams must be at least 1, got {self.num_beams}")
        if self.num_beams > 1 and self.temperature > 0:
            raise LlmlabError("beam search is deterministic: use --temperature 0 with --num-beams "
                              f"{self.num_beams}, or --num-beams 1 to sample")
        if any(not s for s in self.stop):
            raise LlmlabError("stop strings must not be empty")


@dataclass
class Generation:
    text: str
    new_tokens: int


# ---- the Python API ----

def generate(model, tokenizer, prompts: str | list[str], cfg: SamplingConfig | None = None, *,
             chat: bool = False, system: str | None = None, batch_size: int = 8, on_text=None):
    """The new text for each prompt (a str for a str). `on_text(piece)` streams a single prompt's reply.

    With several adapters loaded, pick one for a call with `llmlab.peft.using_adapter(model, name)`.
    """
    cfg = cfg or SamplingConfig()
    single = isinstance(prompts, str)
    items = [prompts] if single else list(prompts)
    if on_text is not None and len(items) != 1:
        raise LlmlabError("on_text streams one prompt at a time; pass a single prompt")
    ids = [encode(tokenizer, p, chat=chat, system=system) for p in items]
    texts = []
    for start in range(0, len(ids), batch_size):
        texts += [g.text for g in generate_batch(model, tokenizer, ids[start:start + batch_size], cfg, on_text)]
    return texts[0] if single else texts


def encode(tokenizer, prompt: str | list[dict], *, chat: bool, system: str | None = None) -> list[int]:
    """Token ids of a raw prompt, or of a conversation (a user message or a list of messages) ready for a reply."""
    if not chat:
        return tokenizer(prompt).input_ids
    if not getattr(tokenizer, "chat_template", None):
        raise LlmlabError("this model's tokenizer has no chat template; use --chat false for raw text")
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system is not None:
        messages = [{"role": "system", "content": system}, *messages]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids  # the template already holds BOS, if any


def generate_batch(model, tokenizer, prompts: list[list[int]], cfg: SamplingConfig, on_text=None) -> list[Generation]:
    """Generate for prompts given as token ids, all in one batch (beam search: one prompt at a time)."""
    eos = [] if cfg.ignore_eos else eos_ids(model, tokenizer)
    if cfg.num_beams > 1:
        out = []
        for ids in prompts:
            new = beam_search(model, ids, cfg, eos)
            text = cut_at_stop(tokenizer.decode(new, skip_special_tokens=True), cfg.stop)
            if on_text is not None:
                on_text(text)  # the winning beam is known only at the end
            out.append(Generation(text, len(new)))
        return out
    trackers = None
    if cfg.stop or on_text is not None:
        trackers = [TextTracker(tokenizer, cfg.stop, on_text if len(prompts) == 1 else None) for _ in prompts]
    new_ids = decode(model, prompts, cfg, eos, pad_id(model, tokenizer), trackers)
    if trackers is None:
        return [Generation(tokenizer.decode(ids, skip_special_tokens=True), len(ids)) for ids in new_ids]
    return [Generation(t.finish(), len(ids)) for t, ids in zip(trackers, new_ids)]


def eos_ids(model, tokenizer) -> list[int]:
    """Every id that ends a reply: the tokenizer's EOS and the generation config's (an int or a list)."""
    ids = [tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)]
    flat = []
    for i in ids:
        flat += i if isinstance(i, (list, tuple)) else [i]
    return sorted({int(i) for i in flat if i is not None})


def pad_id(model, tokenizer) -> int:
    for i in (tokenizer.pad_token_id, getattr(model.generation_config, "pad_token_id", None), tokenizer.eos_token_id):
        if isinstance(i, int):
            return i
    return 0  # padded positions are masked out; any id does


# ---- the decoding loop ----

@torch.inference_mode()
def decode(model, prompts: list[list[int]], cfg: SamplingConfig, eos: list[int], pad: int,
           trackers: list["TextTracker"] | None = None, keep_eos: bool = False) -> list[list[int]]:
    """New token ids for each prompt, EOS excluded (kept with `keep_eos`: RL scores the step that ended the
    reply); `trackers` see each token and may stop their row."""
    device = model.device
    ids, mask = _left_pad(prompts, pad, device)  # (B, T)
    (B, T), n_max = ids.shape, room(model, ids.shape[1], cfg.max_new_tokens)
    padded = not bool(mask.all())
    full_mask = torch.cat([mask, mask.new_ones(B, n_max)], dim=1)  # grows by slicing, not by cat
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): pads take position 0, as in transformers
    history = _penalty_history(ids, mask, n_max) if cfg.repetition_penalty != 1.0 else None
    rng = sampling.make_generator(cfg.seed, device) if cfg.temperature > 0 else None
    eos_t = torch.tensor(eos, device=device, dtype=torch.long)
    out = torch.full((B, n_max), pad, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    stop_at = [n_max] * B

    logits, cache = forward_step(model, ids, full_mask[:, :T] if padded else None, positions, None)
    for step in range(n_max):
        seen = history[:, :T + step] if history is not None else None
        token = sampling.pick(sampling.process(logits, cfg, seen), cfg.temperature, rng)
        token = token.masked_fill(done, pad)  # (B,)
        out[:, step] = token
        if history is not None:
            history[:, T + step] = torch.where(done, history[:, T - 1], token)
        if eos:
            done |= torch.isin(token, eos_t)
        if trackers is not None:
            _watch(trackers, token.tolist(), done, stop_at, step)
        if step + 1 == n_max or bool(done.all()):
            break
        positions = positions[:, -1:] + 1
        step_mask = full_mask[:, :T + step + 1] if padded else None
        logits, cache = forward_step(model, token[:, None], step_mask, positions, cache)
    return [_cut(row, eos, stop, keep_eos) for row, stop in zip(out[:, :step + 1].tolist(), stop_at)]


def _left_pad(prompts: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    if any(len(p) == 0 for p in prompts):
        raise LlmlabError("cannot generate from an empty prompt")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def _penalty_history(ids, mask, n_max) -> torch.Tensor:
    """Prompt + generated ids for the repetition penalty; pads stand in as the row's last prompt token,
    which is in the sequence anyway, so padding never penalises the pad id."""
    filled = torch.where(mask.bool(), ids, ids[:, -1:])
    return torch.cat([filled, filled.new_zeros(ids.shape[0], n_max)], dim=1)


def _watch(trackers, tokens: list[int], done: torch.Tensor, stop_at: list[int], step: int):
    """Feed each live row's token to its tracker; a row whose text hit a stop string is done."""
    finished = done.tolist()
    for row, (tracker, token) in enumerate(zip(trackers, tokens)):
        if finished[row]:
            continue
        if tracker.push(token):
            done[row] = True
            stop_at[row] = step + 1


def _cut(row: list[int], eos: list[int], stop: int, keep_eos: bool = False) -> list[int]:
    row = row[:stop]
    ends = [row.index(e) for e in eos if e in row]
    return row[:min(ends) + keep_eos] if ends else row


# ---- text: incremental decoding and stop strings ----

class TextTracker:
    """One sequence's new text, decoded token by token, cut at the first stop string.

    Decoding only the tokens since the last complete piece keeps each step O(1). A piece that ends
    in U+FFFD is an incomplete UTF-8 character and waits for its next byte; text that could be the
    start of a stop string waits too, so that what `on_text` streamed is always the final text.
    """

    def __init__(self, tokenizer, stops: list[str], on_text=None):
        self.tokenizer, self.stops, self.on_text = tokenizer, stops, on_text
        self.ids, self.prefix, self.read = [], 0, 0  # ids[prefix:read] decode to the text's tail
        self.text, self.sent, self.stopped = "", 0, False

    def push(self, token: int) -> bool:
        """Add one token; True once the text holds a stop string (later tokens are ignored)."""
        if self.stopped:
            return True
        self.ids.append(token)
        before, after = self._decode(self.read), self._decode(len(self.ids))
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._append(after[len(before):])
            self.prefix, self.read = self.read, len(self.ids)
        return self.stopped

    def finish(self) -> str:
        """The final text; a dangling partial character is flushed as it is."""
        if not self.stopped and self.read < len(self.ids):
            before, after = self._decode(self.read), self._decode(len(self.ids))
            self._append(after[len(before):])
        self._send(len(self.text))
        return self.text

    def _decode(self, end: int) -> str:
        return self.tokenizer.decode(self.ids[self.prefix:end], skip_special_tokens=True)

    def _append(self, piece: str):
        start = max(0, len(self.text) - max((len(s) for s in self.stops), default=0))
        self.text += piece
        cut = cut_at_stop(self.text, self.stops, start)
        if len(cut) < len(self.text):
            self.text, self.stopped = cut, True
        self._send(len(self.text) if self.stopped else len(self.text) - _held(self.text, self.stops))

    def _send(self, end: int):
        if self.on_text is not None and end > self.sent:
            self.on_text(self.text[self.sent:end])
            self.sent = end


def cut_at_stop(text: str, stops: list[str], start: int = 0) -> str:
    """`text` up to the earliest stop string found at or after `start`."""
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return text[:min(hits)] if hits else text


def _held(text: str, stops: list[str]) -> int:
    """Length of the longest tail of `text` that a stop string starts with."""
    return max((k for s in stops for k in range(min(len(s) - 1, len(text)), 0, -1)
                if text.endswith(s[:k])), default=0)


# ---- the `llmlab generate` verb ----


def unescape(stops: list[str]) -> list[str]:
    """A shell passes `--stop "\\n\\n"` as backslash-n: the verbs read \\n, \\t, \\r and \\\\ as escapes."""
    table = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}
    return [re.sub(r"\\([ntr\\])", lambda m: table[m.group(1)], s) for s in stops]
