"""LightningModule for grading: cross-entropy (weighted, smoothed), knowledge distillation, EMA, on-device augmentation.

Distillation (Hinton et al., "Distilling the Knowledge in a Neural Network", 2015,
https://arxiv.org/abs/1503.02531): loss = (1 - a) * CE(y) + a * T^2 * KL(p_teacher^T || p_student^T), with
the teacher seeing the same augmented batch; several teachers form an ensemble by averaging their softened
probabilities.

Consistency (Hendrycks et al., "AugMix", ICLR 2020, https://arxiv.org/abs/1912.02781): with `consistency` > 0
each image is seen twice in the batch, as stored and after the domain augmentation, under the same warp and
intensity jitter; the loss adds `consistency` * JSD(p_stored, p_processed), so the grade learns not to depend
on the upstream processing rather than only to tolerate it. Teachers then see each image as stored only, and
their answer is the target for both copies: the processed copy should be graded as the stored one is.
"""

from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from klgrade.constants import MAIN_METRIC, NUM_GRADES
from klgrade.data.augment import AugmentConfig, DomainConfig, domain_augment, random_augment
from klgrade.data.preprocess import normalize
from klgrade.errors import KLGradeError
from klgrade.metrics import confusion_metrics
from klgrade.train.config import TrainConfig


def js_divergence(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence between two batches of predictions (batch mean, nats)."""
    log_a, log_b = F.log_softmax(logits_a, dim=1), F.log_softmax(logits_b, dim=1)
    log_mean = torch.logsumexp(torch.stack([log_a, log_b]), dim=0) - math.log(2)
    kl_a = F.kl_div(log_mean, log_a, reduction="batchmean", log_target=True)
    kl_b = F.kl_div(log_mean, log_b, reduction="batchmean", log_target=True)
    return (kl_a + kl_b) / 2


def distillation_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(teacher || student) on temperature-softened distributions (batch mean)."""
    log_student = F.log_softmax(student_logits / temperature, dim=1)
    return F.kl_div(log_student, teacher_probs, reduction="batchmean") * temperature**2


class GradingModule(L.LightningModule):
    """Trains `model` on uint8 batches from the cache; validation uses the EMA weights when enabled."""

    def __init__(self, model: nn.Module, config: TrainConfig, steps_per_epoch: int,
                 class_weights: torch.Tensor | None = None, teachers: list[nn.Module] | None = None):
        super().__init__()
        self.steps_per_epoch = steps_per_epoch
        self.model = model.to(memory_format=torch.channels_last)
        if config.train_only:
            freeze_all_but(self.model, config.train_only)
        self.config = config
        self.augment_config = AugmentConfig(**config.augment)
        self.domain_config = DomainConfig.from_dict(config.domain) if config.domain_augment else None
        self.ema = (AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(config.ema), use_buffers=True)
                    if config.ema > 0 else None)
        if self.ema is not None:  # updated by copying, never by gradients (DDP refuses parameters without grads)
            self.ema.requires_grad_(False)
        self.register_buffer("class_weights", class_weights, persistent=False)
        self._teachers = [t.eval().requires_grad_(False) for t in (teachers or [])]  # not saved in checkpoints
        self._augment_generator = torch.Generator()
        self._val_logits: list[torch.Tensor] = []
        self._val_labels: list[torch.Tensor] = []
        self.history: list[dict] = []
        self.val_grades: list[list[int]] = []  # each epoch's grades of the validation images, in their order

    def eval_model(self) -> nn.Module:
        """The weights that are validated and exported."""
        return self.ema.module if self.ema is not None else self.model

    def _inputs(self, images: torch.Tensor, augment: bool) -> torch.Tensor:
        return normalize(images.unsqueeze(1), self._augment if augment else None).contiguous(
            memory_format=torch.channels_last)

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        """Training-only: upstream-processing changes (when on), then the affine and intensity augmentation.

        With consistency on, returns the batch twice (as stored, then processed) under the same random warp.
        """
        if self.domain_config is None:
            return random_augment(x, self.augment_config, self._augment_generator)
        processed = domain_augment(x, self.domain_config, self._augment_generator)
        if self.config.consistency == 0:
            return random_augment(processed, self.augment_config, self._augment_generator)
        warp_state = self._augment_generator.get_state()
        stored = random_augment(x, self.augment_config, self._augment_generator)
        self._augment_generator.set_state(warp_state)
        return torch.cat([stored, random_augment(processed, self.augment_config, self._augment_generator)])

    def on_fit_start(self) -> None:
        for teacher in self._teachers:
            teacher.to(self.device, memory_format=torch.channels_last)

    def on_train_epoch_start(self) -> None:
        if self.config.train_only:  # frozen parts keep their batch-norm statistics (Lightning restores modes after
            self.model.eval()       # validation, but never sets them when fitting starts)
            for name in self.config.train_only:
                self.model.get_submodule(name).train()
        # Randomness derived from (seed, epoch, rank): a run resumed at an epoch boundary repeats it exactly, and
        # DDP processes draw different augmentation and dropout for their different images.
        epoch_seed = (self.config.seed * 100_003 + self.current_epoch) * 1_009 + self.global_rank
        self._augment_generator.manual_seed(epoch_seed)
        torch.manual_seed(epoch_seed)

    def _teacher_probs(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            temperature = self.config.kd_temperature
            return torch.stack([F.softmax(t(x).float() / temperature, dim=1) for t in self._teachers]).mean(0)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        x = self._inputs(images, augment=True)
        logits = self.model(x).float()
        paired = len(logits) != len(labels)  # consistency: stored and processed copies of each image
        if paired:
            labels = labels.repeat(2)
        loss = F.cross_entropy(logits, labels, weight=self.class_weights, label_smoothing=self.config.label_smoothing)
        if self._teachers:
            targets = self._teacher_probs(x.chunk(2)[0]).repeat(2, 1) if paired else self._teacher_probs(x)
            kd = distillation_loss(logits, targets, self.config.kd_temperature)
            self.log("train/kd", kd, on_step=False, on_epoch=True, sync_dist=True)
            loss = (1 - self.config.kd_alpha) * loss + self.config.kd_alpha * kd
        if paired:  # after the label/teacher mix: its weight does not depend on kd_alpha
            consistency = js_divergence(*logits.chunk(2))
            self.log("train/consistency", consistency, on_step=False, on_epoch=True, sync_dist=True)
            loss = loss + self.config.consistency * consistency
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.ema is not None:
            self.ema.update_parameters(self.model)

    def validation_step(self, batch, batch_idx: int) -> None:
        images, labels = batch
        self._val_logits.append(self.eval_model()(self._inputs(images, augment=False)).float())
        self._val_labels.append(labels)

    def on_validation_epoch_end(self) -> None:
        # Every DDP process validates the whole (small) validation set, so metrics need no gathering.
        logits = torch.cat(self._val_logits)
        labels = torch.cat(self._val_labels)
        self._val_logits.clear()
        self._val_labels.clear()
        k = NUM_GRADES
        cm = torch.bincount(labels * k + logits.argmax(1), minlength=k * k).reshape(k, k).cpu().numpy()
        values = {name: float(v) for name, v in confusion_metrics(cm).items()}
        values["loss"] = float(F.cross_entropy(logits, labels))
        for name, value in values.items():
            self.log(f"val/{name}", value, prog_bar=name in ("accuracy", MAIN_METRIC), sync_dist=True)
        if not self.trainer.sanity_checking:
            self.history.append({"epoch": self.current_epoch, **values})
            self.val_grades.append(logits.argmax(1).tolist())

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["klgrade_history"] = self.history
        checkpoint["klgrade_val_grades"] = self.val_grades

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.history = checkpoint.get("klgrade_history", [])
        self.val_grades = checkpoint.get("klgrade_val_grades", [])

    def configure_optimizers(self):
        trained = [parameter for parameter in self.model.parameters() if parameter.requires_grad]
        optimizer = torch.optim.AdamW(trained, lr=self.config.lr, weight_decay=self.config.weight_decay)
        # Known in advance: asking Lightning to estimate it would build the data iterator before a resume restores
        # the epoch counter, and the resumed epoch would replay the first epoch's batch order.
        total = max(1, self.steps_per_epoch * self.config.epochs)
        if self.config.schedule == "onecycle":
            scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=self.config.lr, total_steps=total)
        else:
            warmup = min(total - 1, int(total * self.config.warmup_epochs / self.config.epochs))
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(warmup, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def freeze_all_but(model: nn.Module, names: list[str]) -> None:
    """Stop gradients to every parameter outside the named submodules.

    Raises:
        KLGradeError: a name is not a submodule with parameters (e.g. `normaliser` without `normaliser=true`).
    """
    model.requires_grad_(False)
    for name in names:
        try:
            part = model.get_submodule(name)
        except AttributeError:
            raise KLGradeError(f"--train-only: the model has no part '{name}'") from None
        parameters = list(part.parameters())
        if not parameters:
            raise KLGradeError(f"--train-only: the model's part '{name}' has nothing to train")
        for parameter in parameters:
            parameter.requires_grad_(True)


def _warmup_cosine(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor
