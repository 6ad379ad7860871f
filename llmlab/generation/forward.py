"""One forward step of the decoding loop, and where the KV cache goes in.

transformers 5.25 renamed the cache argument of every causal LM's `forward` from
`past_key_values` to `cache` and will drop the old name in 5.40; models written before the
rename (remote code, llmlab's own older folders) still take `past_key_values`. `cache_kwargs`
asks the model's signature which name it has, so the loop works on both sides of the rename.
"""

import functools
import inspect

from llmlab.errors import LlmlabError
from llmlab.models import context_length


def room(model, prompt_len: int, wanted: int) -> int:
    """How many of the `wanted` new tokens fit in the model's context after the prompt."""
    ctx = context_length(model)
    if ctx is not None and prompt_len >= ctx:
        raise LlmlabError(f"the prompt has {prompt_len} tokens but the model's context holds only {ctx}")
    return wanted if ctx is None else min(wanted, ctx - prompt_len)


def forward_step(model, ids, mask, positions, cache):
    """Logits of the last position (B, V) and the updated cache."""
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                **cache_kwargs(model, cache), **_keep_last(type(model)))
    return out.logits[:, -1], out.past_key_values


def cache_kwargs(model, cache) -> dict:
    """{"cache": cache} for transformers >= 5.25 models, {"past_key_values": cache} for older ones."""
    return {cache_argument(type(model)): cache}


@functools.cache
def cache_argument(model_class) -> str:
    params = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@functools.cache
def _keep_last(model_class) -> dict:
    """Ask for the last position's logits only, where the model can: the prompt's are never used."""
    accepts = "logits_to_keep" in inspect.signature(model_class.forward).parameters
    return {"logits_to_keep": 1} if accepts else {}
