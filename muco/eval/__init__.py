"""MMEB-format evaluation."""
