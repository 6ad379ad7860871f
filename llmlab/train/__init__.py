"""The one training loop every stage shares, its schedule and its checkpoints."""

from llmlab.train.checkpoint import (latest_checkpoint, list_checkpoints, load_checkpoint, resume_source,
                                     save_checkpoint)
from llmlab.train.loop import (TrainConfig, accumulate, count_tokens, evaluate, fit, make_optimizer, memory_stats,
                               seed_everything)
from llmlab.train.schedule import lr_at

__all__ = ["TrainConfig", "accumulate", "count_tokens", "evaluate", "fit", "latest_checkpoint", "list_checkpoints",
           "load_checkpoint", "lr_at", "make_optimizer", "memory_stats", "resume_source", "save_checkpoint",
           "seed_everything"]
