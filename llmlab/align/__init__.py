"""Alignment from preferences: DPO and its family (one file each), trained on the one loop with the losses of
llmlab.train.losses. The verb is `llmlab align` (llmlab/stages/align.py)."""
