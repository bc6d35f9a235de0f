"""Cache keys, index, single-flight fills, freshness, eviction."""
