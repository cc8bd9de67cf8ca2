"""Fusion of experts: the summarizer, an adapter that grounds several experts' drafts in one answer.

- `summarizer.py`  the prompt, synthetic training cases from the shards, generation, scoring
- `stage.py`       the `summarizer` build stage (one Ray Train job, the experts' train loop)
"""
