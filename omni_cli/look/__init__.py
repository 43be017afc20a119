"""Look: Parquet to a person. A self-contained HTML report and search over stored embeddings."""
