"""Evaluation: one metric suite for training and reporting, and the reports built from it."""
