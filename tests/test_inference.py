"""answer_questions: an exported QA model answers like the module it came from, over contexts of many windows."""

import json

import lightning.pytorch as pl
import pytest
import torch

from topk_lightning.data import QADataModule
from topk_lightning.errors import InputError
from topk_lightning.inference import answer_questions
from topk_lightning.modules import ExtractiveQAModule


def test_exported_model_answers_like_the_module_over_many_windows(tmp_path, tiny_bert):
    import topk_lightning  # noqa: F401  registers "topk"
    from topk_lightning.data.needle import generate_needle_squad
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    data = generate_needle_squad(num_examples=6, document_words=150, num_distractors=2, unanswerable_fraction=0.3,
                                 split="validation")
    path = tmp_path / "dev.json"
    path.write_text(json.dumps(data))
    options = dict(max_length=64, doc_stride=16, max_question_length=24)
    torch.manual_seed(1)
    module = ExtractiveQAModule(backbone=tiny_bert, attention="topk", topk=8, query_chunk_size=16,
                                version_2_with_negative=True)
    torch.nn.init.normal_(module.head.weight, std=2.0)
    dm = QADataModule(tokenizer=tiny_bert, validation_file=str(path), batch_size=2, cache_dir=str(tmp_path / "c"),
                      **options)
    pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
               default_root_dir=tmp_path).validate(module, datamodule=dm, verbose=False)
    assert len(dm.splits["validation"]) > 3 * 6  # every context spans several windows
    expected = module.predictions
    assert len(expected) == 6 and len(set(expected.values())) > 1

    module.export(tmp_path / "export")
    model = AutoModelForQuestionAnswering.from_pretrained(tmp_path / "export", attn_implementation="topk")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "export")
    qas = [(q["id"], q["question"], p["context"]) for a in data["data"] for p in a["paragraphs"] for q in p["qas"]]
    answers = answer_questions(model, tokenizer, [q for _, q, _ in qas], [c for _, _, c in qas], **options,
                               version_2_with_negative=True, batch_size=3)
    assert dict(zip([i for i, _, _ in qas], answers)) == expected
    assert model.training is False


def test_window_length_defaults_to_the_tokenizers_and_errors_are_input_errors(tiny_bert):
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    model = AutoModelForQuestionAnswering.from_pretrained(tiny_bert)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    tokenizer.model_max_length = 128  # what an export of this model writes
    context = " ".join(["word"] * 700)  # several windows of 128 tokens
    assert len(answer_questions(model, tokenizer, ["what?"], [context], doc_stride=32)) == 1
    with pytest.raises(InputError, match="2 questions but 1 contexts"):
        answer_questions(model, tokenizer, ["a", "b"], ["c"])
    tokenizer.model_max_length = int(1e30)
    with pytest.raises(InputError, match="pass max_length"):
        answer_questions(model, tokenizer, ["a"], ["c"])
