"""Model registry: the proposed multi-scale attention network and the baselines it is compared with."""

from klgrade.models.registry import create_model, features_and_logits, gradcam_layers, list_models, ordinal_head
from klgrade.models.weights import load_checkpoint, save_checkpoint

__all__ = ["create_model", "features_and_logits", "gradcam_layers", "list_models", "load_checkpoint", "ordinal_head", "save_checkpoint"]
