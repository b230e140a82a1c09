"""klgrade: Kellgren-Lawrence grading of knee radiographs, with Grad-CAM evidence.

The public Python API is `load_model` and `grade`; the `klgrade` command and the HTTP service are thin
shells over the same functions.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "load_model", "grade"]


def load_model(*args, **kwargs):
    """Load a grading model (the shipped one by default). See `klgrade.infer.predictor.load_model`."""
    from klgrade.infer.predictor import load_model as _load_model

    return _load_model(*args, **kwargs)


def grade(image, *args, **kwargs):
    """Grade one radiograph (path or array). See `klgrade.infer.predictor.grade`."""
    from klgrade.infer.predictor import grade as _grade

    return _grade(image, *args, **kwargs)
