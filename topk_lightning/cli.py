"""The command line: a LightningCLI over the project's modules and data modules.

``lightning <fit|validate|test|predict> --config recipes/qa.yaml`` and ``topk-lightning ...`` are the same program.
Model and data are chosen by ``class_path`` / ``init_args`` (any ``LightningModule`` / ``LightningDataModule``
subclass works, including your own). YAML files may use OmegaConf interpolation (``${...}``, resolved after the
command-line overrides). Every ``--trainer.*`` flag of Lightning works (``--trainer.strategy=ddp --trainer.devices=2``,
``--trainer.precision=bf16-mixed``, ...). Reusable fragments compose in Lightning's way: ``--trainer
configs/trainer/gpu.yaml`` and ``--model configs/model/vanilla.yaml`` merge one group's keys into the recipe.

Added on top of LightningCLI:

- links: the model's ``tokenizer`` (saved by ``export``) is the data module's ``tokenizer``; the model's
  ``max_positions`` follows the data's ``max_length`` (batches are never padded past it); the data module pads each
  batch to a multiple of the model's ``query_chunk_size``; a classification model's ``num_labels`` and
  ``class_names`` follow the data module's ``num_labels`` and ``label_names`` (read from the label column; exported
  as ``id2label``). ``--print_config`` lists the linked values as comments after the configuration;
- every ``fit`` ends with ``last.ckpt`` (also when interrupted; see `topk_lightning.callbacks.LastCheckpoint`) and,
  when training steps ran after the last validation, one final validation; its metrics and the checkpoints are
  printed. ``--ckpt_path=<last.ckpt>`` resumes a fit where it stopped;
- ``--export_dir DIR``: after the subcommand, save the model with ``save_pretrained`` (for ``fit``: the best checkpoint
  when a ``ModelCheckpoint`` kept one) -- see ``TopKTransformerModule.export``;
- a user's mistake (`topk_lightning.errors.InputError`: a missing or malformed file, a bad option value, an
  unsupported backbone, a missing ``--ckpt_path``) ends with one line on stderr and exit status 2, no traceback;
  ``TOPK_LIGHTNING_DEBUG=1`` shows the traceback as well.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_helpers import is_overridden

from topk_lightning.callbacks import LastCheckpoint
from topk_lightning.errors import InputError, MissingFileError

__all__ = ["TopKLightningCLI", "build_cli", "main"]

DEBUG_VARIABLE = "TOPK_LIGHTNING_DEBUG"
_CKPT_PATH_KEYWORDS = ("last", "best", "hpc", "registry")  # names Lightning resolves itself


class _ArgumentParser(LightningArgumentParser):
    """LightningArgumentParser whose ``--print_config`` also shows the values the CLI links, as YAML comments.

    Linked values are not options (setting one is an error), so they cannot be part of a config that is fed back
    with ``--config``; as comments they are visible without breaking that round trip.
    """

    def link_arguments(self, source: Any, target: str, compute_fn: Any = None, apply_on: str = "parse") -> None:
        super().link_arguments(source, target, compute_fn, apply_on)
        self.__dict__.setdefault("_shown_links", []).append((source, target, compute_fn, apply_on))

    def dump(self, cfg: Any, *args: Any, **kwargs: Any) -> str:
        text = super().dump(cfg, *args, **kwargs)
        links = self.__dict__.get("_shown_links")
        if not links or not _printing_config(self):
            return text
        lines = ["# Linked by the CLI (not options; change the source instead):"]
        for source, target, compute_fn, apply_on in links:
            if target not in cfg:
                continue  # the chosen class has no such argument (a QA model has no num_labels)
            if apply_on != "parse":
                lines.append(f"#   {_short(target)}: set from {_short(source)} when the classes are created")
                continue
            value = _get(cfg, source) if isinstance(source, str) else tuple(_get(cfg, s) for s in source)
            if compute_fn is not None:
                value = compute_fn(*value) if isinstance(source, (list, tuple)) else compute_fn(value)
            lines.append(f"#   {_short(target)}: {json.dumps(value)}  (= {_short(source)})")
        return text + "\n".join(lines) + "\n"


def _printing_config(parser: LightningArgumentParser) -> bool:
    """Whether this dump answers ``--print_config`` (jsonargparse marks the root parser while it prints)."""
    while hasattr(parser, "parent_parser"):
        parser = parser.parent_parser
    return hasattr(parser, "print_config")


def _get(cfg: Any, key: str) -> Any:
    try:
        return cfg.get(key)
    except (KeyError, AttributeError, TypeError):
        return None


def _short(key: Any) -> str:
    return str(key).replace(".init_args.", ".")


class TopKLightningCLI(LightningCLI):
    """LightningCLI with the project's links, ``last.ckpt`` and a final validation for ``fit``, ``--export_dir``,
    and an end-of-fit summary."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--export_dir",
            type=str | None,
            default=None,
            help="After the run, save the model with save_pretrained (+ tokenizer) into this directory.",
        )
        # Batches are at most max_length long (see PaddingCollator), so that is all the positions the model needs.
        parser.link_arguments("data.init_args.max_length", "model.init_args.max_positions")
        # Padded batches are whole query chunks: every top-k tile has the same shape.
        parser.link_arguments("model.init_args.query_chunk_size", "data.init_args.pad_to_multiple_of")
        # The exported model carries the tokenizer the data was tokenised with.
        parser.link_arguments("data.init_args.tokenizer", "model.init_args.tokenizer")
        parser.link_arguments("data.num_labels", "model.init_args.num_labels", apply_on="instantiate")
        parser.link_arguments("data.label_names", "model.init_args.class_names", apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if (isinstance(ckpt_path, str) and ckpt_path not in _CKPT_PATH_KEYWORDS and "://" not in ckpt_path
                and not Path(ckpt_path).expanduser().is_file()):
            raise MissingFileError(f"--ckpt_path: no checkpoint file at {ckpt_path}")

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        # Checkpointing on (Lightning then has a ModelCheckpoint): every fit also leaves its last state.
        wanted = self.subcommand == "fit" and trainer.checkpoint_callbacks
        if wanted and not any(isinstance(cb, LastCheckpoint) for cb in trainer.callbacks):
            trainer.callbacks.append(LastCheckpoint())
        return trainer

    # ------------------------------------------------------------------ after each subcommand
    def _export(self) -> None:
        export_dir = self.config[self.subcommand].get("export_dir")
        if not export_dir or not self.trainer.is_global_zero:
            return
        model = self.model
        if self.subcommand == "fit":
            checkpoints = [cb for cb in self.trainer.callbacks if isinstance(cb, ModelCheckpoint)]
            best = next((cb.best_model_path for cb in checkpoints if cb.best_model_path), "")
            if best:
                model = type(self.model).load_from_checkpoint(best, map_location="cpu")
                rank_zero_info(f"Exporting the best checkpoint {best}")
        if not hasattr(model, "export"):
            raise TypeError(f"--export_dir needs a model with an export(path) method; {type(model).__name__} has none")
        path = model.export(export_dir)
        rank_zero_info(f"Exported the model to {path}")

    def _final_validation(self) -> None:
        """Validate once more when training steps ran after the last validation (a run cut short by max_steps,
        a last epoch that check_val_every_n_epoch skips, ...), so every fit ends with metrics."""
        last = next((cb for cb in self.trainer.callbacks if isinstance(cb, LastCheckpoint)), None)
        if last is None or last.validated_last_step or self.trainer.limit_val_batches == 0:
            return
        if not is_overridden("validation_step", self.model):
            return
        rank_zero_info("Training stopped after the last validation: validating the last state")
        self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)

    def after_fit(self) -> None:
        self._final_validation()
        metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("val/")}
        if metrics:
            rank_zero_info("Final validation: " + "  ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
        for callback in self.trainer.callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.best_model_path:
                score = callback.best_model_score
                score_text = f" ({callback.monitor}={float(score):.4g})" if score is not None else ""
                rank_zero_info(f"Best checkpoint: {callback.best_model_path}{score_text}")
            if isinstance(callback, LastCheckpoint) and callback.path is not None and callback.path.is_file():
                rank_zero_info(f"Last checkpoint: {callback.path} (continue with --ckpt_path={callback.path})")
        self._export()

    def after_validate(self) -> None:
        self._export()

    def after_test(self) -> None:
        self._export()

    def after_predict(self) -> None:
        self._export()


def build_cli(args: list[str] | None = None, *, run: bool = True) -> TopKLightningCLI:
    """Build (and by default run) the CLI; returns it, so tests and notebooks can reach ``cli.model``/``cli.trainer``.

    Errors propagate as exceptions (see :func:`main` for the command line's one-line reports).

    Args:
        args: command-line arguments (``None`` = ``sys.argv[1:]``), e.g. ``["fit", "--config", "recipes/qa.yaml"]``.
        run: run the subcommand (``False`` only instantiates; then ``args`` has no subcommand).
    """
    from jsonargparse import set_parsing_settings

    import topk_lightning  # noqa: F401  (registers the "topk" attention implementation)

    # "omegaconf+" resolves ${...} once every file and command-line override is merged (so `--model.topk=32` reaches
    # a `${model.init_args.topk}` elsewhere); absolute paths in the YAML are made relative, because under a
    # subcommand the whole config sits below "fit."/"validate."/...
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)

    return TopKLightningCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        run=run,
        parser_class=_ArgumentParser,
        parser_kwargs={"parser_mode": "omegaconf+"},
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )


def input_error(error: BaseException) -> InputError | None:
    """The `InputError` behind ``error``: itself, or one it was raised from (jsonargparse wraps errors raised while
    it builds the classes), else ``None``."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, InputError):
            return current
        seen.add(id(current))
        current = current.__cause__
    return None


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lightning`` and ``topk-lightning`` console scripts (see :func:`build_cli`).

    An `InputError` ends the program with its message on one line of stderr and exit status 2; set
    ``TOPK_LIGHTNING_DEBUG=1`` for the traceback. Any other exception is a bug and keeps its traceback.
    """
    try:
        build_cli(args)
    except Exception as error:
        cause = input_error(error)
        if cause is None or os.environ.get(DEBUG_VARIABLE, "") not in ("", "0"):
            raise
        print(f"error: {cause}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
