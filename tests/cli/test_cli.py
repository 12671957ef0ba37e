"""The CLI end to end on tiny random models: fit, validate, test, predict, export, links, configs."""

import json
import re
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch

from topk_lightning.cli import build_cli, main

from cli_helpers import REPO, tiny_qa_args

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


def test_console_scripts_point_to_the_same_main():
    names = ("lightning", "topk-lightning")
    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts") if ep.name in names}
    assert scripts == {"lightning": "topk_lightning.cli:main", "topk-lightning": "topk_lightning.cli:main"}


def test_fit_validate_test_predict_and_export(tmp_path, tiny_bert, qa_files):
    args = tiny_qa_args(tiny_bert, qa_files, tmp_path)
    cli = build_cli(["fit", *args, "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                     "--trainer.callbacks.monitor=val/f1", "--trainer.callbacks.mode=max",
                     f"--export_dir={tmp_path / 'export'}"])
    model = cli.model
    assert model.hparams.max_positions == 96 and model.hparams.tokenizer == tiny_bert  # linked from data
    assert model.backbone.config._attn_implementation == "topk"
    metrics = cli.trainer.callback_metrics
    for name in ("val/em", "val/f1", "val/has_ans_f1", "val/no_ans_f1", "train/loss"):
        assert name in metrics
    best = cli.trainer.checkpoint_callback.best_model_path
    assert best and Path(best).is_file()
    config_file = Path(cli.trainer.log_dir) / "config.yaml"
    assert config_file.is_file()

    # the saved config reproduces the run; validate/test from the best checkpoint give the same F1
    validate = build_cli(["validate", "--config", str(config_file), f"--ckpt_path={best}", "--export_dir=null"])
    f1 = float(validate.trainer.callback_metrics["val/f1"])
    assert f1 == pytest.approx(float(cli.trainer.checkpoint_callback.best_model_score), abs=1e-4)
    test = build_cli(["test", *args, f"--data.test_file={qa_files['validation']}", f"--ckpt_path={best}"])
    assert float(test.trainer.callback_metrics["test/f1"]) == pytest.approx(f1, abs=1e-4)

    predictions_file = tmp_path / "predictions.json"
    predict = build_cli(["predict", *args, f"--data.predict_file={qa_files['validation']}", f"--ckpt_path={best}",
                         f"--model.predictions_file={predictions_file}"])
    predictions = json.loads(predictions_file.read_text())
    ids = [q["id"] for a in json.loads(Path(qa_files["validation"]).read_text())["data"]
           for p in a["paragraphs"] for q in p["qas"]]
    assert sorted(predictions) == sorted(ids)
    assert predictions == validate.model.predictions  # same checkpoint, same decoding
    # without --model.predictions_file the answers go to the run directory (and the path is printed)
    default = build_cli(["predict", *args, f"--data.predict_file={qa_files['validation']}", f"--ckpt_path={best}"])
    written = Path(default.trainer.log_dir) / "predictions.json"
    assert json.loads(written.read_text()) == predictions

    # --export_dir saved the best checkpoint for plain transformers
    from transformers import AutoModelForQuestionAnswering

    exported = AutoModelForQuestionAnswering.from_pretrained(tmp_path / "export")
    loaded = type(model).load_from_checkpoint(best)
    torch.testing.assert_close(exported.qa_outputs.weight, loaded.head.weight)


def test_vanilla_attention_from_a_config_preset(tmp_path, tiny_bert, qa_files):
    args = tiny_qa_args(tiny_bert, qa_files, tmp_path)
    cli = build_cli(["fit", *args, "--model", str(REPO / "configs/model/vanilla.yaml"),
                     "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1"])
    assert cli.model.hparams.attention == "sdpa"
    assert cli.model.backbone.config._attn_implementation == "sdpa"


def test_classification_links_num_labels(tmp_path, tiny_bert, classification_files):
    cli = build_cli([
        "fit",
        "--model=topk_lightning.modules.SequenceClassificationModule",
        f"--model.backbone={tiny_bert}",
        "--model.topk=4",
        "--model.query_chunk_size=16",
        "--data=topk_lightning.data.ClassificationDataModule",
        f"--data.tokenizer={tiny_bert}",
        f"--data.train_file={classification_files['train']}",
        f"--data.validation_file={classification_files['validation']}",
        "--data.max_length=200",
        "--data.batch_size=3",
        f"--data.cache_dir={tmp_path / 'cache'}",
        "--trainer.accelerator=cpu",
        "--trainer.max_epochs=1",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
    ])
    assert cli.model.hparams.num_labels == 3  # animal, finance, weather
    assert cli.model.hparams.class_names == ["animal", "finance", "weather"]
    assert cli.model.backbone.config.id2label == {0: "animal", 1: "finance", 2: "weather"}
    assert cli.model.hparams.max_positions == 200  # = data.max_length: batches never grow past it
    assert cli.model.backbone.base_model.embeddings.position_embeddings.num_embeddings == 200
    # batches are padded to a multiple of the model's query chunk (16), capped at max_length
    assert cli.datamodule.pad_to_multiple_of == 16
    for batch in cli.datamodule.train_dataloader():
        longest = int(batch["attention_mask"].sum(dim=1).max())
        expected = min(-(-longest // 16) * 16, 200)
        assert batch["input_ids"].shape[1] == expected
    assert {"val/acc", "val/f1", "val/loss"} <= set(cli.trainer.callback_metrics)


def test_help_lists_model_arguments(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--model.help", "topk_lightning.modules.ExtractiveQAModule"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--model.attention", "--model.topk", "--model.query_chunk_size",
                   "--model.ff_chunk_size", "--model.null_score_threshold",
                   "--model.gradient_checkpointing", "--model.predictions_file"):
        assert option in out
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "fit" in capsys.readouterr().out


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_parses(recipe, capsys):
    import yaml

    configs = ["--config", str(recipe)]
    text = recipe.read_text()
    if "class_path" not in (yaml.safe_load(text).get("model") or {}):
        # An overlay (qa-ddp.yaml, boolq-long-warm.yaml) goes on top of the recipe its documented command names.
        base = re.search(rf"--config (recipes/[\w.-]+\.yaml) --config recipes/{re.escape(recipe.name)}", text)
        assert base, f"{recipe.name}: an overlay whose header shows no 'lightning fit --config BASE --config' command"
        configs = ["--config", str(REPO / base.group(1)), *configs]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *configs, "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "class_path: topk_lightning.modules." in printed


@pytest.mark.parametrize("fragment", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_config_fragment_layers_on_the_main_recipe(fragment, capsys):
    """A fragment holds one group's keys and is given to that group (``--trainer FILE``), Lightning's composition."""
    import yaml

    group = fragment.parent.name  # configs/<group>/<name>.yaml
    recipe = yaml.safe_load((REPO / "recipes/qa.yaml").read_text())
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO / "recipes/qa.yaml"), f"--{group}", str(fragment), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    values = yaml.safe_load(fragment.read_text())
    target, untouched = printed[group], recipe[group]
    if group in ("model", "data"):
        assert target["class_path"] == recipe[group]["class_path"]  # the recipe's class is kept
        target, untouched, values = target["init_args"], untouched["init_args"], values["init_args"]
    for key, value in values.items():
        assert target[key] == value, (group, key)
    for key, value in untouched.items():  # merged over the recipe, not replacing it
        if key in values or key == "max_positions":
            continue
        if isinstance(value, list):  # callbacks and loggers print with their defaults filled in
            assert [item["class_path"] for item in target[key]] == [item["class_path"] for item in value]
        else:
            assert target[key] == value, (group, key)


def test_omegaconf_interpolation_resolves_after_command_line_overrides(tmp_path, capsys):
    config = tmp_path / "interp.yaml"
    config.write_text(
        "model:\n  class_path: topk_lightning.modules.ExtractiveQAModule\n  init_args:\n    topk: 48\n"
        "    query_chunk_size: ${model.init_args.topk}\n"
        "data:\n  class_path: topk_lightning.data.QADataModule\n  init_args:\n    batch_size: 3\n"
        "    eval_batch_size: ${data.init_args.batch_size}\n"
    )
    import yaml

    with pytest.raises(SystemExit):
        main(["fit", "--config", str(config), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["init_args"]["query_chunk_size"] == 48
    assert printed["data"]["init_args"]["eval_batch_size"] == 3
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(config), "--model.topk=20", "--data.batch_size=5", "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["init_args"]["query_chunk_size"] == 20
    assert printed["data"]["init_args"]["eval_batch_size"] == 5


def test_precision_and_accumulation_flags(tmp_path, tiny_bert, qa_files, monkeypatch):
    import topk_lightning

    dtypes = []
    original = topk_lightning.ops.topk_attention

    def spy(query, key, value, **kwargs):
        dtypes.append((query.dtype, torch.is_grad_enabled()))
        return original(query, key, value, **kwargs)

    monkeypatch.setattr(topk_lightning.ops, "topk_attention", spy)
    cli = build_cli(["fit", *tiny_qa_args(tiny_bert, qa_files, tmp_path), "--trainer.precision=bf16-mixed",
                     "--trainer.accumulate_grad_batches=2", "--trainer.limit_val_batches=1"])
    assert cli.trainer.precision == "bf16-mixed"
    # the flag has its effect: top-k attention ran on bf16 projections, in training and in validation
    assert set(dtypes) == {(torch.bfloat16, True), (torch.bfloat16, False)}
    assert all(p.dtype == torch.float32 for p in cli.model.parameters())  # mixed: fp32 master weights
    assert cli.trainer.global_step == 1  # 2 batches accumulated into one optimiser step
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])


TASK_CLASSES = {
    "model": ["topk_lightning.modules.ExtractiveQAModule", "topk_lightning.modules.SequenceClassificationModule"],
    "data": ["topk_lightning.data.QADataModule", "topk_lightning.data.ClassificationDataModule"],
}


def _all_parameters(class_path):
    """Every __init__ parameter of the class and of the base it forwards **kwargs to, with its default."""
    import importlib
    import inspect

    module, name = class_path.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    parameters = {}
    for klass in reversed(cls.__mro__):
        if "__init__" in vars(klass) and klass.__module__.startswith("topk_lightning"):
            for parameter in inspect.signature(klass.__init__).parameters.values():
                if parameter.kind == parameter.KEYWORD_ONLY:
                    parameters[parameter.name] = parameter.default
    return parameters


@pytest.mark.parametrize("group, class_path", [(g, c) for g, paths in TASK_CLASSES.items() for c in paths])
def test_task_classes_forward_kwargs_yet_show_every_option_with_type_and_default(group, class_path, capsys):
    """Task classes declare their own arguments and forward **kwargs to the base; jsonargparse follows the call, so
    --help and --print_config still show the base's options, typed, with the base's defaults."""
    import inspect

    import yaml

    parameters = _all_parameters(class_path)
    assert "kwargs" in inspect.signature(__import__("pydoc").locate(class_path).__init__).parameters
    with pytest.raises(SystemExit):
        main(["fit", f"--{group}.help", class_path])
    help_text = capsys.readouterr().out
    blocks = {m.group(1): m.group(0) for m in re.finditer(rf"^  --{group}\.(\w+)\b.*?(?=^  --|\Z)", help_text, re.S | re.M)}
    for name, default in parameters.items():
        assert name in blocks, f"--{group}.{name} missing from --help"
        block = " ".join(blocks[name].split())
        shown = "null" if default is None else " ".join(str(default).split())  # help wraps and collapses spaces
        if default is inspect.Parameter.empty:
            assert "(required, type: " in block, block
        else:
            assert re.search(rf"\(type: .+, default: ?{re.escape(shown)}\)", block), block

    other = "data" if group == "model" else "model"
    partner = {"model": "topk_lightning.data.QADataModule", "data": "topk_lightning.modules.ExtractiveQAModule"}
    with pytest.raises(SystemExit):
        main(["fit", f"--{group}={class_path}", f"--{other}={partner[group]}", f"--{group}.batch_size=3"
              if group == "data" else "--model.topk=64", "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)[group]["init_args"]
    for name, default in parameters.items():
        if name in ("max_positions", "tokenizer", "num_labels", "class_names", "pad_to_multiple_of"):
            continue  # linked from the other group
        assert name in printed, f"{name} missing from --print_config"
        if default is not inspect.Parameter.empty and name != "batch_size":
            assert printed[name] == default, name


def test_print_config_shows_the_linked_values_and_still_feeds_back(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(REPO / "recipes/qa.yaml"), "--model.query_chunk_size=256", "--print_config"])
    printed = capsys.readouterr().out
    assert "#   model.max_positions: 2176  (= data.max_length)" in printed
    assert "#   data.pad_to_multiple_of: 256  (= model.query_chunk_size)" in printed
    assert "#   model.tokenizer: null  (= data.tokenizer)" in printed
    assert "num_labels" not in printed  # a QA model has no such argument
    (tmp_path / "printed.yaml").write_text(printed)  # comments, so the printed config is still a valid --config
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(tmp_path / "printed.yaml"), "--print_config"])
    assert capsys.readouterr().out == printed
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(REPO / "recipes/classification.yaml"), "--print_config"])
    assert "#   model.num_labels: set from data.num_labels when the classes are created" in capsys.readouterr().out
