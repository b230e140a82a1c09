"""Inference: checkpoints or ensembles -> grades and probabilities, with flip TTA and an ONNX backend."""
