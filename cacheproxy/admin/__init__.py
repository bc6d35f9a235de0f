"""For operators: the admin API, prefetch jobs and the status page (SPEC section 7)."""
