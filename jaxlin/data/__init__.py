"""Data: directory resolution, tokenizer, token shards, Grain pipeline."""
