"""Data layer: find samples, decode any input, preprocess, split by patient, cache for training."""
