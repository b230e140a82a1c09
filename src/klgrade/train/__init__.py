"""Training: the Lightning module (losses, distillation, on-device augmentation), `fit`, and cross-validation."""
