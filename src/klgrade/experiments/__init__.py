"""The research protocol: cross-validation, the paper's comparison and its report (uses train, infer and evaluate)."""
