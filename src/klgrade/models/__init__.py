"""Model registry: the proposed multi-scale attention network and the baselines it is compared with."""

from klgrade.models.registry import create_model, gradcam_layer, list_models
from klgrade.models.weights import load_checkpoint, save_checkpoint

__all__ = ["create_model", "gradcam_layer", "list_models", "load_checkpoint", "save_checkpoint"]
