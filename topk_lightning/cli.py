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
  as ``id2label``);
- ``--export_dir DIR``: after the subcommand, save the model with ``save_pretrained`` (for ``fit``: the best checkpoint
  when a ``ModelCheckpoint`` kept one) -- see ``TopKTransformerModule.export``;
- after ``fit``, the final validation metrics and the best checkpoint are printed.
"""

from __future__ import annotations

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info

__all__ = ["TopKLightningCLI", "build_cli", "main"]


class TopKLightningCLI(LightningCLI):
    """LightningCLI with the project's links, ``--export_dir`` and an end-of-fit summary."""

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

    def after_fit(self) -> None:
        metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("val/")}
        if metrics:
            rank_zero_info("Final validation: " + "  ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
        for callback in self.trainer.callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.best_model_path:
                score = callback.best_model_score
                score_text = f" ({callback.monitor}={float(score):.4g})" if score is not None else ""
                rank_zero_info(f"Best checkpoint: {callback.best_model_path}{score_text}")
        self._export()

    def after_validate(self) -> None:
        self._export()

    def after_test(self) -> None:
        self._export()

    def after_predict(self) -> None:
        self._export()


def build_cli(args: list[str] | None = None, *, run: bool = True) -> TopKLightningCLI:
    """Build (and by default run) the CLI; returns it, so tests and notebooks can reach ``cli.model``/``cli.trainer``.

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
        parser_kwargs={"parser_mode": "omegaconf+"},
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lightning`` and ``topk-lightning`` console scripts (see :func:`build_cli`)."""
    build_cli(args)


if __name__ == "__main__":
    main()
