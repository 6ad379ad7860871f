"""Evaluation: how good is a model, measured the way the field measures it.

    perplexity.py       `llmlab eval ppl`: GPTQ-protocol or sliding-window perplexity of a text file
    exact_match.py      `llmlab eval em`: greedy answers against exact targets (the synthetic tasks)
    multiple_choice.py  log-likelihood scoring of choices (acc, acc_norm), shared by the exams below
    mmlu.py             `llmlab eval mmlu|cmmlu|ceval`: 5-shot exams, per subject, category and overall
    arc.py              `llmlab eval arc`: ARC-Easy and ARC-Challenge
    gsm8k.py            `llmlab eval gsm8k`: 8-shot chain of thought, exact match on the final number
    lm_eval_adapter.py  any llmlab model as an lm-evaluation-harness model ("llmlab")
    arena.py            `llmlab arena`: pairwise battles judged by a model or a person, Elo with bootstrap
    report.py           `llmlab report`: runs side by side, plots, Markdown and self-contained HTML
"""
