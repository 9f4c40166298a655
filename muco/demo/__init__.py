"""The offline demo: real handwritten-digit scans as M3T-shaped data, training, evaluation."""
