"""The router: a hashed n-gram fast path in front of a DACT early-exit classifier (see router.py)."""
