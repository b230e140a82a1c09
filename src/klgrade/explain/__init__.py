"""Explanations: Grad-CAM heatmaps (captum) and overlays a person can read."""
