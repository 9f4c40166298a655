"""Conversion of released records (parquet, JSONL) into webdataset shards; one module per record kind."""
