"""Sharding: every chunk classified, one Parquet shard and one LanceDB table per category."""
