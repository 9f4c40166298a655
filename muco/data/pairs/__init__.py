"""Fine-tuning pair records: query/positive/negatives, masked counterparts, collation."""
