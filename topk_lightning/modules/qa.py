"""Extractive question answering: a start/end head on the encoder, SQuAD v1/v2 decoding and metrics.

Batches follow the QA batch contract in docs/CONTRACTS.md. Each validation/test/predict window is reduced to a small
:class:`~topk_lightning.modules.qa_decoding.FeatureResult` in the step; at epoch end the results of every process are
gathered, merged per example id (windows of one example may sit on different processes) and scored. The per-epoch
state is reset at epoch start, so Lightning's sanity-check validation never leaks into an epoch's metrics.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from topk_lightning.atomic import atomic_output
from topk_lightning.errors import InputError
from topk_lightning.modules.base import ENCODER_ONLY_CLASSES, TopKTransformerModule
from topk_lightning.modules.metrics import squad_v1_metrics, squad_v2_metrics
from topk_lightning.modules.qa_decoding import (
    FeatureResult,
    aggregate_predictions,
    batch_feature_results,
    gold_answers,
)
from topk_lightning.patching import plain_config

__all__ = ["ExtractiveQAModule", "write_predictions"]


def write_predictions(predictions: dict[str, str], path: str | os.PathLike) -> Path:
    """Write ``{id: answer}`` as JSON with `~topk_lightning.atomic.atomic_output` (complete or not at all)."""
    path = Path(path)
    with atomic_output(path) as partial:
        partial.write_text(json.dumps(predictions, ensure_ascii=False, indent=2), encoding="utf-8")
    return path


class ExtractiveQAModule(TopKTransformerModule):
    """Span-extraction QA (SQuAD-style) on a top-k (or vanilla) encoder.

    The head is one linear layer giving a start and an end logit per token (as Hugging Face's ``qa_outputs``); the
    loss is the mean of the start and end cross-entropies.

    Args:
        version_2_with_negative: SQuAD v2 mode: predict "no answer" (``""``) when the null score beats the best span
            by more than ``null_score_threshold``, and report overall/HasAns/NoAns EM and F1.
        null_score_threshold: margin for the null answer (SQuAD v2 only); higher = fewer empty answers.
        n_best_size: spans kept per window when decoding.
        max_answer_length: longest answer in tokens.
        predictions_file: where ``predict`` writes ``{id: answer}`` JSON; ``None`` = ``predictions.json`` in the
            run's log directory (``trainer.log_dir``). The path is printed. A run-time option: not saved with the
            hyperparameters, so a checkpoint never overrides it.
        **kwargs: the encoder and optimiser options (``backbone``, ``attention``, ``topk``, ``query_chunk_size``,
            ``learning_rate``, ...) of :class:`~topk_lightning.modules.base.TopKTransformerModule`.

    Logged metrics (percentages): ``val/em``, ``val/f1`` (SQuAD v1 via torchmetrics, or v2 overall), with
    ``version_2_with_negative`` also ``val/has_ans_em``, ``val/has_ans_f1``, ``val/no_ans_em``, ``val/no_ans_f1``;
    ``val/loss``; the same under ``test/``; ``train/loss`` per step.
    """

    runtime_arguments = ("predictions_file",)

    def __init__(
        self,
        *,
        version_2_with_negative: bool = False,
        null_score_threshold: float = 0.0,
        n_best_size: int = 20,
        max_answer_length: int = 30,
        predictions_file: str | None = None,
        **kwargs,
    ) -> None:
        if n_best_size < 1 or max_answer_length < 1:
            raise InputError(
                f"{type(self).__name__}: n_best_size and max_answer_length must be >= 1, got {n_best_size} and "
                f"{max_answer_length}"
            )
        super().__init__(**kwargs)
        self.predictions_file = predictions_file
        self.predictions: dict[str, str] = {}
        self._results: list[FeatureResult] = []

    def build_head(self, hidden_size: int) -> nn.Module:
        return nn.Linear(hidden_size, 2)

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Start and end logits, each (B, T)."""
        logits = self.head(self.encode(batch))
        start_logits, end_logits = logits.unbind(dim=-1)
        return start_logits.contiguous(), end_logits.contiguous()

    @staticmethod
    def span_loss(
        start_logits: torch.Tensor, end_logits: torch.Tensor, start_positions: torch.Tensor, end_positions: torch.Tensor
    ) -> torch.Tensor:
        """Mean of the start and end cross-entropies; positions outside the window are ignored (as transformers)."""
        ignored = start_logits.shape[1]
        start_positions = start_positions.clamp(0, ignored)
        end_positions = end_positions.clamp(0, ignored)
        start = F.cross_entropy(start_logits.float(), start_positions, ignore_index=ignored)
        end = F.cross_entropy(end_logits.float(), end_positions, ignore_index=ignored)
        return (start + end) / 2

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        start_logits, end_logits = self(batch)
        loss = self.span_loss(start_logits, end_logits, batch["start_positions"], batch["end_positions"])
        self.log("train/loss", loss, prog_bar=True, batch_size=start_logits.shape[0])
        return loss

    # ------------------------------------------------------------------ evaluation
    def _eval_step(self, batch: dict[str, Any], stage: str) -> None:
        start_logits, end_logits = self(batch)
        if "start_positions" in batch and "end_positions" in batch:
            loss = self.span_loss(start_logits, end_logits, batch["start_positions"], batch["end_positions"])
            self.log(f"{stage}/loss", loss, sync_dist=True, batch_size=start_logits.shape[0])
        self._results.extend(
            batch_feature_results(
                start_logits,
                end_logits,
                batch,
                n_best_size=self.hparams.n_best_size,
                max_answer_length=self.hparams.max_answer_length,
            )
        )

    def _gather_results(self) -> list[FeatureResult]:
        """The window results of every process (each process gets all of them)."""
        results = self._results
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[list[FeatureResult] | None] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, results)
            results = [r for part in gathered for r in (part or [])]
        return results

    def decode(self, results: list[FeatureResult]) -> dict[str, str]:
        """``{example id: answer}`` from window results, with this module's SQuAD v1/v2 settings."""
        return aggregate_predictions(
            results,
            version_2_with_negative=self.hparams.version_2_with_negative,
            null_score_threshold=self.hparams.null_score_threshold,
        )

    def score(self, predictions: dict[str, str], references: dict[str, tuple[str, ...]]) -> dict[str, float]:
        """EM/F1 (percentages): torchmetrics SQuAD for v1, the project's SQuAD v2 metric otherwise."""
        if self.hparams.version_2_with_negative:
            v2 = squad_v2_metrics(predictions, references)
            return {
                "em": v2["exact"],
                "f1": v2["f1"],
                "has_ans_em": v2["has_ans_exact"],
                "has_ans_f1": v2["has_ans_f1"],
                "no_ans_em": v2["no_ans_exact"],
                "no_ans_f1": v2["no_ans_f1"],
            }
        v1 = squad_v1_metrics(predictions, references)
        return {"em": v1["exact"], "f1": v1["f1"]}

    def _eval_epoch_end(self, stage: str) -> None:
        results = self._gather_results()
        self._results = []
        predictions = self.decode(results)
        references = gold_answers(results)
        metrics = self.score(predictions, references)
        self.predictions = predictions
        for name, value in metrics.items():
            # Every process holds the same gathered results, so the values agree; sync_dist only silences the
            # epoch-level DDP warning.
            self.log(f"{stage}/{name}", value, prog_bar=name in ("em", "f1"), sync_dist=True)
        if not self.trainer.sanity_checking:
            summary = "  ".join(f"{name}={value:.2f}" for name, value in metrics.items())
            rank_zero_info(f"[{stage}] step {self.global_step}: {len(predictions)} questions  {summary}")

    def on_validation_epoch_start(self) -> None:
        self._results = []

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_start(self) -> None:
        self._results = []

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    # ------------------------------------------------------------------ prediction
    def on_predict_epoch_start(self) -> None:
        self._results = []

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> list[FeatureResult]:
        start_logits, end_logits = self(batch)
        results = batch_feature_results(
            start_logits,
            end_logits,
            batch,
            n_best_size=self.hparams.n_best_size,
            max_answer_length=self.hparams.max_answer_length,
        )
        self._results.extend(results)
        return results

    def on_predict_epoch_end(self) -> None:
        results = self._gather_results()
        self._results = []
        self.predictions = self.decode(results)
        path = self.predictions_path()  # on every process: trainer.log_dir is a collective call under DDP
        if self.trainer.is_global_zero:
            write_predictions(self.predictions, path)
            rank_zero_info(f"Wrote {len(self.predictions)} predictions to {path}")

    def predictions_path(self) -> Path:
        """``predictions_file``, or ``predictions.json`` in the run's log directory."""
        if self.predictions_file:
            return Path(self.predictions_file)
        return Path(self.trainer.log_dir or self.trainer.default_root_dir) / "predictions.json"

    # ------------------------------------------------------------------ export
    def _head_beside_encoder(self) -> bool:
        # T5's AutoModelForQuestionAnswering runs its decoder too: an encoder-only span head has no class there.
        return self.backbone.config.model_type in ENCODER_ONLY_CLASSES

    def export_model(self) -> nn.Module:
        """An ``AutoModelForQuestionAnswering`` holding the encoder and this head as its ``qa_outputs``; for T5-family
        encoders, the encoder alone (``T5EncoderModel``), the head going beside it (:meth:`export_extra`)."""
        from transformers import AutoModelForQuestionAnswering

        if self._head_beside_encoder():
            return self._vanilla_copy(self.backbone)

        config = plain_config(self.backbone.config)
        model = AutoModelForQuestionAnswering.from_config(config, attn_implementation="sdpa")
        base = getattr(model, model.base_model_prefix)
        missing, unexpected = base.load_state_dict(self.backbone.state_dict(), strict=False)
        # QA models drop the pooler that AutoModel has; anything else missing means a layout we do not know.
        unexpected = [k for k in unexpected if not k.startswith("pooler.")]
        if missing or unexpected or not isinstance(getattr(model, "qa_outputs", None), nn.Linear):
            raise RuntimeError(
                f"cannot export {type(model).__name__}: missing {missing}, unexpected {unexpected}, "
                "or no linear qa_outputs head"
            )
        model.qa_outputs.load_state_dict(self.head.state_dict())
        return model

    def export_extra(self, path: Path) -> None:
        """T5-family encoders: the span head as ``qa_head.safetensors`` (``weight`` (2, d_model), ``bias`` (2,);
        start and end logits = ``hidden @ weight.T + bias``)."""
        if not self._head_beside_encoder():
            return
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous().cpu() for k, v in self.head.state_dict().items()},
                  str(path / "qa_head.safetensors"))
