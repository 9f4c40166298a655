"""M3T pretraining records: K-turn records about one image, drawn turns, mined negatives, collation."""
