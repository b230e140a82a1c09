"""One registry: `create_model(name, ...)` for the proposed model and every baseline, all from timm."""

from __future__ import annotations

import inspect
import logging
import pickle
from pathlib import Path
from typing import Callable

import timm
import torch
import torch.nn as nn
from safetensors import SafetensorError

from klgrade.constants import NUM_GRADES
from klgrade.errors import CheckpointError, KLGradeError
from klgrade.models.msanet import MultiScaleAttentionNet
from klgrade.models.ordinal import CumulativeLogitHead
from klgrade.models.weights import require_weights_file

log = logging.getLogger(__name__)

_TIMM_BASELINES = {
    "resnet18": "resnet18",
    "resnet50": "resnet50",
    "mobilenet_v2": "mobilenetv2_100",
    "densenet121": "densenet121",
}


def _timm_builder(timm_name: str) -> Callable[..., nn.Module]:
    def build(num_classes: int, in_chans: int, pretrained: bool, **options) -> nn.Module:
        return timm.create_model(timm_name, num_classes=num_classes, in_chans=in_chans, pretrained=pretrained, **options)

    return build


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "msa_net": lambda num_classes, in_chans, pretrained, **options: MultiScaleAttentionNet(
        num_classes, in_chans, pretrained=pretrained, **options),
    **{name: _timm_builder(timm_name) for name, timm_name in _TIMM_BASELINES.items()},
}


def list_models() -> list[str]:
    return sorted(_BUILDERS)


def create_model(name: str, num_classes: int = NUM_GRADES, in_chans: int = 1, pretrained: str | None = None,
                 ordinal: bool = False, **options) -> nn.Module:
    """Build a grading model that maps (B, in_chans, H, W) images to (B, num_classes) logits.

    Args:
        name: one of `list_models()`.
        pretrained: None (train from scratch, the default), a local weights file (safetensors or a torch
            state dict), or "timm" to let timm fetch its ImageNet weights (needs a machine that is online).
        ordinal: replace the linear classifier by a cumulative-logit ordinal head (outputs log-probabilities).
        options: model options, e.g. `fpn=False`, `backbone="resnet34"`, `drop_rate=0.3`.

    Raises:
        KLGradeError: unknown name or option.
    """
    if name not in _BUILDERS:
        raise KLGradeError(f"unknown model '{name}'; choose one of: {', '.join(list_models())}")
    given = ", ".join(f"{key}={value!r}" for key, value in options.items())
    # msa_net's options are checked before it is built (a wrong type fails deep in torch, in words about something
    # else), a baseline's once timm has built it (its class is known then; a wrong drop rate fails only in training).
    problem = _option_problem(MultiScaleAttentionNet, options) if name == "msa_net" else None
    if problem is None:
        try:
            model = _BUILDERS[name](num_classes=num_classes, in_chans=in_chans, pretrained=pretrained == "timm",
                                    **options)
        except (TypeError, ValueError, RuntimeError) as exc:  # an unknown option, or a value the layers cannot take
            problem = str(exc)
        else:
            problem = _option_problem(type(model), options)
    if problem is not None:
        raise KLGradeError(f"bad option for model '{name}' ({given}): {problem}")
    if ordinal:
        classifier_name = "fc" if name == "msa_net" else model.default_cfg.get("classifier", "fc")
        in_features = getattr(model, "num_features")
        model_path, _, attr = classifier_name.rpartition(".")
        owner = model.get_submodule(model_path) if model_path else model
        setattr(owner, attr, CumulativeLogitHead(in_features, num_classes))
    if pretrained not in (None, "timm"):
        _load_pretrained(model, Path(pretrained))
    return model


def _option_problem(model_class: type, options: dict) -> str | None:
    """What is wrong with the first of `options` whose value does not fit `model_class`'s constructor: not of the type
    of its default (`width=abc`), or a `..._rate` outside [0, 1); None when all fit. Options it does not declare are
    left to the constructor to refuse."""
    defaults = {key: parameter.default for key, parameter in inspect.signature(model_class).parameters.items()}
    for key, value in options.items():
        expected = type(defaults.get(key))
        if expected not in NAMES_OF_TYPES:
            continue
        fits = isinstance(value, expected) or (expected is float and isinstance(value, int))
        if not fits or (expected is not bool and isinstance(value, bool)):
            return f"{key} takes {NAMES_OF_TYPES[expected]}, not {value!r}"
        if key.endswith("_rate") and not 0 <= value < 1:
            return f"{key} is a dropout probability, at least 0 and below 1, not {value!r}"
    return None


NAMES_OF_TYPES = {bool: "true or false", int: "a whole number", float: "a number", str: "a name"}
"""The types of model options klgrade checks, as an error names them."""


def _load_pretrained(model: nn.Module, path: Path) -> None:
    """Load matching tensors from a local file; classifier or stem shapes that differ are left as built."""
    require_weights_file(path, "pretrained weights file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, EOFError, pickle.UnpicklingError):  # a picture, an .onnx, cut
        raise CheckpointError(f"{path}: not a whole weights file (a .safetensors checkpoint or a torch state "
                              "dict)") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds no state dict of tensors (a whole pickled model?)")
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise CheckpointError(f"{path}: no tensor matches the model's parameters")
    model.load_state_dict(usable, strict=False)
    if len(usable) < len(own):  # e.g. another classifier; a silent partial load would pass for a full one
        log.warning("%s: loaded %d of the model's %d tensors; the rest start as built", path, len(usable), len(own))


def gradcam_layers(model: nn.Module) -> list[list[nn.Module]]:
    """Sets of layers Grad-CAM explains, tried in order until a set shows positive evidence (the signed maps of
    a set's layers are summed): the model's own choice, else its last stage alone.

    A baseline CNN is a chain: every path to its classifier passes its last stage.
    """
    if hasattr(model, "gradcam_layers"):
        return model.gradcam_layers()
    return [[model.get_submodule(model.feature_info[-1]["module"])]]


def features_and_logits(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass, two answers: the logits (B, K) and the pooled penultimate features (B, D) they come from.

    Every registered model (timm's and msa_net) has `forward_features`, `forward_head(pre_logits=True)` and
    `get_classifier()`.
    """
    features = model.forward_head(model.forward_features(x), pre_logits=True)
    return model.get_classifier()(features), features


def ordinal_head(model: nn.Module) -> CumulativeLogitHead | None:
    """The model's cumulative-logit head, or None for a plain classifier."""
    return next((m for m in model.modules() if isinstance(m, CumulativeLogitHead)), None)
