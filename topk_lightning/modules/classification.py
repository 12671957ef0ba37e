"""Long-document sequence classification: the model family's own head (or a pooled linear one), accuracy and macro-F1
from torchmetrics."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from topk_lightning.errors import InputError
from topk_lightning.modules.base import ENCODER_ONLY_CLASSES, TopKTransformerModule

__all__ = ["HEAD_FILE", "POOLINGS", "SequenceClassificationModule"]

log = logging.getLogger(__name__)

#: The pooled heads' weights in an export, beside the encoder's (plain transformers has no class for them).
HEAD_FILE = "classification_head.safetensors"

POOLINGS = ("model", "cls", "mean", "first_segment")


class SequenceClassificationModule(TopKTransformerModule):
    """Classify whole (long) documents.

    Batches carry ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when the tokenizer makes them) and
    ``labels`` (B,) class indices (absent in predict batches).

    Args:
        num_labels: number of classes (>= 2); the CLI links it from the data module's ``num_labels``.
        class_names: class names, index = class id (the CLI links the data module's ``label_names``); saved in the
            exported config as ``id2label``. ``None`` = ``LABEL_0``, ``LABEL_1``, ...
        pooling: ``"model"`` (default): the family's own head from ``AutoModelForSequenceClassification`` (BERT: the
            pretrained pooler on ``[CLS]`` + a linear layer; RoBERTa/ELECTRA: their two-layer head on ``<s>``; ...).
            :meth:`export` then saves an ``AutoModelForSequenceClassification``. ``"cls"`` (the first token's state)
            or ``"mean"`` (mean over non-padding tokens, how sentence-embedding models such as MiniLM were trained):
            dropout + a linear layer of this module; the export then holds the encoder plus
            ``classification_head.safetensors``, and a module whose ``backbone`` is such an export starts from both.
            ``"first_segment"``: the mean over the first text of a pair (``[CLS] question [SEP]``, read from
            ``token_type_ids`` == 0), for pairs whose second text is long and mostly irrelevant (a question over a
            long document): a mean over every token would be dominated by the document. Needs a tokenizer that
            makes ``token_type_ids`` (BERT, MiniLM, ELECTRA; not RoBERTa).
        classifier_dropout: dropout before the classifier (``"model"``: set on the config as the family names it).
        **kwargs: the encoder and optimiser options (``backbone``, ``attention``, ``topk``, ``query_chunk_size``,
            ``learning_rate``, ...) of :class:`~topk_lightning.modules.base.TopKTransformerModule`.

    Logged metrics: ``train/loss``; ``val/loss``, ``val/acc``, ``val/f1`` (macro); the same under ``test/``.
    ``predict`` returns the predicted class indices per batch.
    """

    def __init__(
        self,
        *,
        num_labels: int = 2,
        class_names: list[str] | None = None,
        pooling: Literal["model", "cls", "mean", "first_segment"] = "model",
        classifier_dropout: float = 0.1,
        **kwargs,
    ) -> None:
        name = type(self).__name__
        if num_labels < 2:
            raise InputError(f"{name}: num_labels must be >= 2, got {num_labels}")
        if class_names is not None and len(class_names) != num_labels:
            raise InputError(f"{name}: class_names has {len(class_names)} names for num_labels={num_labels}: {class_names}")
        if pooling not in POOLINGS:
            raise InputError(f"{name}: pooling must be one of {', '.join(map(repr, POOLINGS))}, got {pooling!r}")
        super().__init__(**kwargs)
        self.metrics = nn.ModuleDict(
            {
                f"{stage}_{name}": metric
                for stage in ("val", "test")
                for name, metric in (
                    ("acc", MulticlassAccuracy(num_classes=num_labels, average="micro")),
                    ("f1", MulticlassF1Score(num_classes=num_labels, average="macro")),
                )
            }
        )

    # ------------------------------------------------------------------ model and head
    def load_pretrained(self, path: str, attn_implementation: str) -> nn.Module:
        """``pooling="model"``: an ``AutoModelForSequenceClassification`` (encoder + the family's head); else the
        bare encoder."""
        hp = self.hparams
        if hp.pooling != "model":
            return super().load_pretrained(path, attn_implementation)
        from transformers import AutoModelForSequenceClassification

        names = hp.class_names or [f"LABEL_{i}" for i in range(hp.num_labels)]
        config = self.pretrained_config(
            path,
            num_labels=hp.num_labels,
            id2label=dict(enumerate(names)),
            label2id={name: i for i, name in enumerate(names)},
            problem_type="single_label_classification",
        )
        if config.model_type in ENCODER_ONLY_CLASSES:
            raise InputError(
                f"pooling='model' is not available for {config.model_type} backbones: its "
                "AutoModelForSequenceClassification runs the decoder over the whole input too; use pooling='mean' or "
                "'cls' (a head on the encoder states)"
            )
        # Each family names its head dropout differently.
        for name in ("classifier_dropout", "classifier_dropout_prob", "seq_classif_dropout"):
            if hasattr(config, name):
                setattr(config, name, hp.classifier_dropout)
        # A backbone exported by another classification run may have another number of classes: its classifier is
        # then re-initialised (transformers logs which weights), the encoder is kept.
        return AutoModelForSequenceClassification.from_pretrained(
            path, config=config, attn_implementation=attn_implementation, ignore_mismatched_sizes=True
        )

    def unused_backbone_modules(self) -> list[str]:
        # The family's head (pooling="model") reads BERT's pooler; the pooled heads read only hidden states.
        return [] if self.hparams.pooling == "model" else super().unused_backbone_modules()

    def build_head(self, hidden_size: int) -> nn.Module:
        hp = self.hparams
        if hp.pooling == "model":
            return nn.Identity()  # the head is inside the backbone's task model
        head = nn.Sequential(nn.Dropout(hp.classifier_dropout), nn.Linear(hidden_size, hp.num_labels))
        self._load_exported_head(head)
        return head

    def _load_exported_head(self, head: nn.Module) -> None:
        """A backbone exported by a pooled-head run (``classification_head.safetensors`` beside its weights) brings
        its classifier along, so fine-tuning an export continues from it (e.g. short BoolQ, then long inputs). A head
        of another shape (another number of classes) is left freshly initialised, as ``pooling="model"`` does."""
        path = Path(self.backbone_path) / HEAD_FILE
        if not path.is_file():
            return
        from safetensors.torch import load_file

        saved = load_file(str(path))
        expected = {k: tuple(v.shape) for k, v in head.state_dict().items()}
        found = {k: tuple(v.shape) for k, v in saved.items()}
        if found != expected:
            log.warning("%s: %s holds a head of shapes %s, this module's is %s: the head is initialised afresh",
                        type(self).__name__, path, found, expected)
            return
        head.load_state_dict(saved)
        log.info("%s: classifier loaded from %s", type(self).__name__, path)

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None,
             token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, H) -> (B, H): the first token, or the mean over non-padding tokens (``"first_segment"``: over the
        non-padding tokens of the first text)."""
        pooling = self.hparams.pooling
        if pooling == "cls":
            return hidden[:, 0]
        mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        if attention_mask is not None:
            mask &= attention_mask.bool()
        if pooling == "first_segment":
            if token_type_ids is None:
                raise InputError(f"{type(self).__name__}: pooling='first_segment' reads the first text from "
                                 "token_type_ids, and this batch has none (the tokenizer does not make them: use "
                                 "pooling='mean' or 'cls')")
            mask &= token_type_ids == 0
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        """Class logits (B, num_labels)."""
        if self.hparams.pooling == "model":
            return self.backbone(**self.model_inputs(batch)).logits
        return self.head(self.pool(self.encode(batch), batch.get("attention_mask"), batch.get("token_type_ids")))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        logits = self(batch)
        loss = F.cross_entropy(logits.float(), batch["labels"])
        self.log("train/loss", loss, prog_bar=True, batch_size=logits.shape[0])
        return loss

    def _eval_step(self, batch: dict[str, Any], stage: str) -> None:
        logits = self(batch)
        labels = batch["labels"]
        size = logits.shape[0]
        self.log(f"{stage}/loss", F.cross_entropy(logits.float(), labels), sync_dist=True, batch_size=size)
        predictions = logits.argmax(dim=-1)
        for name in ("acc", "f1"):
            metric = self.metrics[f"{stage}_{name}"]
            metric.update(predictions, labels)
            # Passing the metric object lets torchmetrics sync across processes and reset at epoch end.
            self.log(f"{stage}/{name}", metric, prog_bar=True, on_step=False, on_epoch=True, batch_size=size)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        return self(batch).argmax(dim=-1)

    # ------------------------------------------------------------------ export
    def export_extra(self, path: Path) -> None:
        """Pooled heads (``pooling="cls"``/``"mean"``/``"first_segment"``): save the classifier beside the encoder as
        ``classification_head.safetensors`` (plain transformers has no class for them)."""
        if self.hparams.pooling == "model":
            return
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous().cpu() for k, v in self.head.state_dict().items()},
                  str(path / HEAD_FILE))
