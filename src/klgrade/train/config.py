"""Every training option in one typed object, filled from defaults, a YAML file and CLI overrides."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import yaml

from klgrade.constants import IMAGE_SIZE
from klgrade.data.augment import AugmentConfig, DomainConfig
from klgrade.data.preprocess import PreprocessConfig
from klgrade.errors import KLGradeError

OPTION_KINDS = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "dict": (dict,),
                "list[str]": (list,)}
"""The Python types a value of each option type may have (a YAML file gives them untyped)."""
MAX_CONFIG_BYTES = 1 << 20
"""A config of options is a few hundred bytes; more than this is some other file (read no further: /dev/zero is
endless)."""
MAX_IMAGE_SIZE = 1024
"""The largest --image-size: training holds every image decoded at this size (kneeKL224's 5778 at 1024 px: 6 GB);
--image-size 100000 stopped in numpy asking for 93 GiB."""
OPTION_RANGES = (("lr", lambda v: v > 0, "above 0"), ("weight_decay", lambda v: v >= 0, "at least 0"),
                 ("warmup_epochs", lambda v: v >= 0, "at least 0"),
                 ("label_smoothing", lambda v: 0 <= v < 1, "in [0, 1)"), ("ema", lambda v: 0 <= v < 1, "in [0, 1)"),
                 ("kd_alpha", lambda v: 0 <= v <= 1, "in [0, 1]"), ("kd_temperature", lambda v: v > 0, "above 0"),
                 ("consistency", lambda v: v >= 0, "at least 0"), ("patience", lambda v: v >= 0, "at least 0"),
                 ("threads", lambda v: v is None or v >= 1, "at least 1"),
                 ("seed", lambda v: 0 <= v < 2**32, "in [0, 2**32)"),
                 ("image_size", lambda v: 32 <= v <= MAX_IMAGE_SIZE, f"from 32 to {MAX_IMAGE_SIZE} px"))
"""Values an option may take beyond its type (NaN fails every test)."""
BALANCE_CHOICES = ("none", "sampler", "loss")
SCHEDULE_CHOICES = ("cosine", "onecycle")
DEFAULT_FOLDS = 5
PRECISION_CHOICES = ("auto", "bf16-mixed", "16-mixed", "32-true")


@dataclass
class TrainConfig:
    """Args (defaults in brackets):
    data: dataset folder or CSV manifest. out: run folder for checkpoints, logs and metrics.
    model [msa_net], model_options [{}]: registry name and its options; ordinal [False]: cumulative-logit head.
    epochs [30], batch_size [32], lr [1e-3], weight_decay [0.05], warmup_epochs [1], schedule [cosine|onecycle].
    label_smoothing [0.0]; balance [none|sampler|loss]: class-imbalance handling.
    ema [0.0]: decay of the exponential moving average of weights (0 = off); validation and export use it.
    patience [0]: early-stopping patience in epochs on the validation QWK (0 = off).
    teacher [[]]: checkpoints whose mean softened probabilities teach the student; kd_alpha [0.5], kd_temperature [4].
    fold [None], folds [5]: train on the other folds of the train split and validate on fold `fold`.
    seed [0]; limit [None]: use at most this many train and validation images (quick checks).
    init [None]: weights file to start from instead of random weights (fine-tuning, e.g. at a higher resolution).
    train_only [[]]: train only these submodules of the model (e.g. `normaliser`); the rest stays frozen, in
    eval mode (batch-norm statistics and dropout included). Empty = train everything.
    image_size [224], clahe [False], canonical_side [False]: preprocessing, stored in the checkpoint.
    augment: affine + intensity strengths (`AugmentConfig`); domain_augment [False]: also imitate upstream
    processing (CLAHE, softening, gamma, equalisation, JPEG, resampling, blur, noise) with the strengths in
    `domain` (`DomainConfig`). Both are recorded in the checkpoint (train_config) and never run at validation.
    consistency [0.0]: weight of the Jensen-Shannon divergence between the predictions for each image as stored
    and after the domain augmentation (same warp, AugMix-style); needs domain_augment, doubles the training batch.
    device [auto|cpu|cuda], devices [1], num_nodes [1], precision [auto|bf16-mixed|16-mixed|32-true]: auto is
    bf16-mixed where the device computes in bf16, else 32-true (`resolve_precision`).
    threads [None]: CPU threads for torch. cache_dir [None]: image cache location.
    """

    data: str = ""
    out: str = "runs/train"
    model: str = "msa_net"
    model_options: dict = field(default_factory=dict)
    ordinal: bool = False
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    schedule: str = "cosine"
    label_smoothing: float = 0.0
    balance: str = "none"
    ema: float = 0.0
    patience: int = 0
    teacher: list[str] = field(default_factory=list)
    kd_alpha: float = 0.5
    kd_temperature: float = 4.0
    fold: int | None = None
    folds: int = DEFAULT_FOLDS
    seed: int = 0
    limit: int | None = None
    init: str | None = None
    train_only: list[str] = field(default_factory=list)
    image_size: int = IMAGE_SIZE
    clahe: bool = False
    canonical_side: bool = False
    augment: dict = field(default_factory=lambda: AugmentConfig().to_dict())
    domain_augment: bool = False
    domain: dict = field(default_factory=lambda: DomainConfig().to_dict())
    consistency: float = 0.0
    device: str = "auto"
    devices: int = 1
    num_nodes: int = 1
    precision: str = "auto"
    threads: int | None = None
    cache_dir: str | None = None
    quiet: bool = False
    resume: bool = False

    def validate(self) -> "TrainConfig":
        check_option_types(self.to_dict())
        for name, allowed, wanted in OPTION_RANGES:
            if not allowed(getattr(self, name)):
                raise KLGradeError(f"--{name.replace('_', '-')} must be {wanted}, not {getattr(self, name)}")
        for name, kind in (("augment", AugmentConfig), ("domain", DomainConfig)):
            check_strengths(name, getattr(self, name), kind())
        if self.balance not in BALANCE_CHOICES:
            raise KLGradeError(f"--balance must be one of {BALANCE_CHOICES}, not '{self.balance}'")
        if self.schedule not in SCHEDULE_CHOICES:
            raise KLGradeError(f"--schedule must be one of {SCHEDULE_CHOICES}, not '{self.schedule}'")
        if self.device not in ("auto", "cpu", "cuda"):
            raise KLGradeError(f"--device must be auto, cpu or cuda, not '{self.device}'")
        for name in ("epochs", "batch_size", "devices", "num_nodes"):
            if getattr(self, name) < 1:
                raise KLGradeError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(self, name)}")
        if self.folds < 2:
            raise KLGradeError(f"--folds must be at least 2 (each fold is scored by a model trained on the others), "
                               f"not {self.folds}")
        if self.limit is not None and self.limit < 1:
            raise KLGradeError(f"--limit must be at least 1, not {self.limit}")
        if self.ordinal and self.label_smoothing > 0:
            raise KLGradeError("--label-smoothing cannot be used with --ordinal: smoothing every grade flattens the "
                               "cumulative-logit scale")
        if self.consistency > 0 and not self.domain_augment:
            raise KLGradeError("--consistency needs --domain-augment: it compares each image with its processed copy")
        if self.precision not in PRECISION_CHOICES:
            raise KLGradeError(f"--precision must be one of {PRECISION_CHOICES}, not '{self.precision}'")
        if self.fold is not None and not 0 <= self.fold < self.folds:
            raise KLGradeError(f"--fold must lie in 0-{self.folds - 1}")
        return self

    def preprocess(self) -> PreprocessConfig:
        """What every image the run's models see goes through (stored in their checkpoints)."""
        return PreprocessConfig(size=self.image_size, clahe=self.clahe, canonical_side=self.canonical_side)

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_precision(precision: str, device: str) -> str:
    """`precision`, with "auto" made bf16-mixed where the device computes in bf16 (a CUDA GPU that supports it, a
    CPU with AVX512-BF16 or AMX) and 32-true elsewhere: a CPU without them emulates bf16, 5-14x slower than fp32
    (msa_net, 160 px, batch 32, 2 AVX2 cores: 33 s against 2.4 s a training step)."""
    if precision != "auto":
        return precision
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true"
    native_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return "bf16-mixed" if native_bf16 else "32-true"


def check_option_types(values: dict) -> None:
    """KLGradeError unless every option in `values` has its type (`OPTION_KINDS`; a number finite, a list one of
    strings): a value of the wrong type would fail with a traceback deep inside training."""
    kinds = {f.name: f.type for f in fields(TrainConfig)}
    for name, value in values.items():
        kind = kinds[name].removesuffix(" | None")
        if value is None and kinds[name].endswith(" | None"):
            continue
        allowed = OPTION_KINDS[kind]
        fits = isinstance(value, allowed) and (bool in allowed or not isinstance(value, bool))
        if kind == "float" and fits:
            fits = math.isfinite(value)
        if kind == "list[str]" and fits:
            fits = all(isinstance(item, str) for item in value)
        if not fits:
            wanted = {"int": "a whole number", "float": "a finite number", "bool": "true or false", "str": "a text",
                      "dict": "a mapping", "list[str]": "a list of texts"}[kind]
            raise KLGradeError(f"option {name} must be {wanted}, not {value!r}")


def check_strengths(name: str, values: dict, defaults: AugmentConfig | DomainConfig) -> None:
    """KLGradeError unless every key of `values` is a field of `defaults` holding what the default holds: a finite
    number, or a list of them (a range, a set of choices)."""
    known = [f.name for f in fields(defaults)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise KLGradeError(f"{name}: unknown option(s) {unknown} (known: {known})")

    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    for key, value in values.items():
        several = isinstance(getattr(defaults, key), tuple)
        if not (all(map(number, value)) if several and isinstance(value, (list, tuple)) else
                not several and number(value)):
            raise KLGradeError(f"{name}: {key} must be {'a list of numbers' if several else 'a number'}, "
                               f"not {value!r}")


def _yaml_numbers(values: dict) -> dict:
    """`values` with the number options YAML 1.1 leaves as text (`lr: 1e-3`, without a decimal point) read as
    numbers."""
    reals = {f.name for f in fields(TrainConfig) if f.type.removesuffix(" | None") == "float"}
    read = dict(values)
    for name in reals & set(values):
        if isinstance(values[name], str):
            try:
                read[name] = float(values[name])
            except ValueError:
                pass  # reported as text by `check_option_types`
    return read


class _OptionsLoader(yaml.SafeLoader):
    """YAML's safe loader without aliases (`*name`): options need none, and aliases of aliases expand exponentially
    once the options are written out (a "billion laughs" config of 1 KB filled the memory)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not taken in klgrade options",
                                              self.peek_event().start_mark)
        return super().compose_node(parent, index)


def load_yaml(text: str):
    """The value a YAML text of options holds (the safe types, no aliases).

    Raises:
        yaml.YAMLError: no YAML, an alias, or nesting deeper than Python's recursion allows.
    """
    try:
        return yaml.load(text, Loader=_OptionsLoader)
    except RecursionError:  # `[[[[...` thousands deep
        raise yaml.YAMLError("nested too deeply") from None


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's complaint in one line, where it is: `found character '\\t' that cannot start any token at line 2,
    column 1` (its own message spans lines and quotes the line)."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(exc, 'problem', None) or exc}{where}"


def load_config(path: str | Path | None, overrides: dict) -> TrainConfig:
    """Defaults <- YAML file <- explicit overrides (None values in `overrides` mean 'not given')."""
    values: dict = {}
    if path is not None:
        try:
            with open(path, "rb") as handle:  # a pipe (`--config <(...)`) is read as a file is
                data = handle.read(MAX_CONFIG_BYTES + 1)
            if len(data) > MAX_CONFIG_BYTES:
                raise KLGradeError(f"{path}: larger than {MAX_CONFIG_BYTES >> 20} MiB: not a config of options")
            values = load_yaml(data.decode("utf-8")) or {}
        except OSError as exc:
            raise KLGradeError(f"{path}: cannot read config ({exc.strerror or exc})") from None
        except UnicodeDecodeError:
            raise KLGradeError(f"{path}: config is not UTF-8 text (a YAML file of option: value)") from None
        except yaml.YAMLError as exc:
            raise KLGradeError(f"{path}: not valid YAML ({_yaml_problem(exc)})") from None
        if not isinstance(values, dict):
            raise KLGradeError(f"{path}: config must be a mapping of option: value")
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise KLGradeError(f"{path}: unknown option(s) {unknown}")
    values = _yaml_numbers(values)
    values.update({k: v for k, v in overrides.items() if v is not None})
    config = TrainConfig(**values).validate()  # a partial augment or domain mapping is checked, then completed
    config.augment = {**AugmentConfig().to_dict(), **config.augment}
    config.domain = {**DomainConfig().to_dict(), **config.domain}
    return config
