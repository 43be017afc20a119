"""Output: scores to Parquet. Build result rows, decide what earlier runs already did, write
crash-safe parts and finish the output atomically under a lock."""
