"""Agents' jobs on the served experts: durable records, a priority scheduler with fairness between
agents, and preemption at a token boundary (plain Python; `serve_apps/job_queue.py` wraps it)."""
