"""Evaluation of each stage against held-out labels or text."""
