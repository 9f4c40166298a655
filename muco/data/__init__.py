"""Data: records, shards, templates, collation, the streaming DataModule."""
