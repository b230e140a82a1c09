"""Facts of the domain, in one place: the grading scale and the default image geometry."""

NUM_GRADES = 5
"""Kellgren-Lawrence grades 0 (no OA) to 4 (severe OA)."""

GRADE_NAMES = ("Normal", "Doubtful", "Minimal", "Moderate", "Severe")
"""Names used by common datasets for folders `0Normal` ... `4Severe`."""

IMAGE_SIZE = 224
"""Default side length (pixels) of the square network input."""

MAIN_METRIC = "qwk"
"""Validation metric that selects checkpoints: quadratic weighted kappa, the field's standard for KL grading."""

REPORT_METRICS = ("accuracy", "precision_macro", "recall_macro", "f1_macro", "mcc", "qwk", "mae")
"""The metrics every table of klgrade shows (evaluate, cv, reproduce), in this order."""
HEATMAP_MARK = ("klgrade", "Grad-CAM overlay, not a radiograph")
"""The PNG text chunk (keyword, text) of every heatmap overlay klgrade writes: read back as input (an overlay saved
into the folder graded next, a downloaded one uploaded), such a file is refused, not graded as a knee."""
