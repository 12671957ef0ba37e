"""ExtractiveQAModule: loss, evaluation bookkeeping, checkpoint round trip, export, predictions file."""

import json
import os

import lightning.pytorch as pl
import pytest
import torch

from topk_lightning.modules import ExtractiveQAModule
from topk_lightning.modules.qa import write_predictions

EXAMPLES = [
    ("q1", "Where did the cat sit?", "The cat sat on the mat near the door.", ["the mat"]),
    ("q2", "What is the capital of France?", "Paris is the capital of France and its largest city.", ["Paris"]),
    ("q3", "Who wrote the letter?", "Nobody knows anything about the letter.", []),
]


def qa_batch(tokenizer, examples):
    """A collated eval batch following docs/CONTRACTS.md, one window per example."""
    ids, questions, contexts, answers = zip(*examples)
    enc = tokenizer(list(questions), list(contexts), padding=True, return_offsets_mapping=True, return_tensors="pt")
    offsets = enc.pop("offset_mapping")
    starts, ends = [], []
    for i, (context, gold) in enumerate(zip(contexts, answers)):
        sequence_ids = enc.sequence_ids(i)
        for t, s in enumerate(sequence_ids):
            if s != 1:
                offsets[i, t] = -1
        start = end = 0
        if gold:
            char_start = context.index(gold[0])
            char_end = char_start + len(gold[0])
            tokens = [t for t, s in enumerate(sequence_ids) if s == 1]
            start = next(t for t in tokens if offsets[i, t, 0] <= char_start < offsets[i, t, 1])
            end = next(t for t in tokens if offsets[i, t, 0] < char_end <= offsets[i, t, 1])
        starts.append(start)
        ends.append(end)
    return {
        **{k: v for k, v in enc.items()},
        "start_positions": torch.tensor(starts),
        "end_positions": torch.tensor(ends),
        "example_id": list(ids),
        "offset_mapping": offsets,
        "context": list(contexts),
        "answers": [list(a) for a in answers],
    }


@pytest.fixture(scope="module")
def batches(tiny_bert):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    return [qa_batch(tokenizer, EXAMPLES[:2]), qa_batch(tokenizer, EXAMPLES[2:])]


def loader(batches):
    """A DataLoader that yields the ready-made batches (a bare list would mean several dataloaders)."""
    return torch.utils.data.DataLoader(batches, batch_size=None, collate_fn=lambda b: b)


def trainer(tmp_path, **kwargs):
    options = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    options.update(kwargs)
    return pl.Trainer(**options)


def test_span_loss_is_mean_of_start_and_end_cross_entropy():
    start = torch.tensor([[2.0, 0.0, 1.0]])
    end = torch.tensor([[0.0, 3.0, 0.0]])
    loss = ExtractiveQAModule.span_loss(start, end, torch.tensor([2]), torch.tensor([1]))
    expected = (torch.nn.functional.cross_entropy(start, torch.tensor([2]))
                + torch.nn.functional.cross_entropy(end, torch.tensor([1]))) / 2
    torch.testing.assert_close(loss, expected)


def test_validation_scores_squad_v2_and_sanity_check_does_not_leak(tmp_path, tiny_bert, batches):
    module = ExtractiveQAModule(backbone=tiny_bert, attention="topk", topk=4, query_chunk_size=8,
                                version_2_with_negative=True)
    seen = []

    class Spy(pl.Callback):  # callbacks run before the module's on_validation_epoch_end
        def on_validation_epoch_end(self, trainer, pl_module):
            seen.append((trainer.sanity_checking, len(pl_module._results)))

    t = trainer(tmp_path, max_epochs=1, limit_train_batches=1, num_sanity_val_steps=1, callbacks=[Spy()])
    t.fit(module, train_dataloaders=loader(batches), val_dataloaders=loader(batches))
    assert seen == [(True, 2), (False, 3)]  # the sanity check's first batch is not in the epoch's windows
    metrics = t.callback_metrics
    for name in ("em", "f1", "has_ans_em", "has_ans_f1", "no_ans_em", "no_ans_f1", "loss"):
        assert f"val/{name}" in metrics
    assert set(module.predictions) == {"q1", "q2", "q3"}
    assert 0.0 <= float(metrics["val/f1"]) <= 100.0


def test_validate_squad_v1_metrics_from_torchmetrics(tmp_path, tiny_bert, batches):
    module = ExtractiveQAModule(backbone=tiny_bert, attention="sdpa")
    result = trainer(tmp_path).validate(module, dataloaders=loader(batches[:1]), verbose=False)[0]
    assert set(result) == {"val/em", "val/f1", "val/loss"}
    assert all(v != "" for v in module.predictions.values())  # v1: never the null answer


def test_checkpoint_round_trip_keeps_topk_settings_and_predictions(tmp_path, tiny_bert, batches):
    module = ExtractiveQAModule(backbone=tiny_bert, attention="topk", topk=3, query_chunk_size=5, ff_chunk_size=7,
                                max_positions=200, learning_rate=1e-3)
    t = trainer(tmp_path, max_steps=2)
    t.fit(module, train_dataloaders=loader(batches))
    path = tmp_path / "model.ckpt"
    t.save_checkpoint(path)
    loaded = ExtractiveQAModule.load_from_checkpoint(path)
    assert dict(loaded.hparams) == dict(module.hparams)
    assert loaded.backbone.config._attn_implementation == "topk"
    assert loaded.backbone.embeddings.position_embeddings.num_embeddings == 200
    module.eval()
    loaded.eval()
    with torch.no_grad():
        for batch in batches:
            for a, b in zip(module(batch), loaded(batch)):
                torch.testing.assert_close(a, b, atol=0, rtol=0)
    # top-k with k=3 really differs from dense attention on these ~20-token inputs
    dense = ExtractiveQAModule.load_from_checkpoint(path, attention="sdpa").eval()
    with torch.no_grad():
        assert not torch.allclose(dense(batches[0])[0], module(batches[0])[0], atol=1e-4)


def test_export_reloads_in_plain_transformers_and_with_topk(tmp_path, tiny_bert, batches):
    import topk_lightning  # noqa: F401  registers "topk"
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    module = ExtractiveQAModule(backbone=tiny_bert, attention="topk", max_positions=160).eval()
    torch.nn.init.normal_(module.head.weight)
    mask = os.umask(0o022)
    try:
        out = module.export(tmp_path / "export")
    finally:
        os.umask(mask)
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    # the tokenizer admits what the model admits (the pretrained tokenizer said 512)
    assert AutoTokenizer.from_pretrained(tiny_bert).model_max_length == 512
    assert AutoTokenizer.from_pretrained(out).model_max_length == 160
    # plain umask permissions everywhere (safetensors writes its file 0600, a temporary directory is 0700)
    assert out.stat().st_mode & 0o777 == 0o755
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == {p.name: 0o644 for p in out.iterdir()}
    batch = {k: batches[0][k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        start, end = module(batches[0])
        for implementation in ("sdpa", "topk"):  # default TopKConfig: k=64 covers these short inputs
            hf = AutoModelForQuestionAnswering.from_pretrained(out, attn_implementation=implementation).eval()
            assert hf.config.max_position_embeddings == 160
            outputs = hf(**batch)
            torch.testing.assert_close(outputs.start_logits, start, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(outputs.end_logits, end, atol=1e-5, rtol=1e-5)


def test_predict_writes_json(tmp_path, tiny_bert, batches):
    target = tmp_path / "out" / "predictions.json"
    module = ExtractiveQAModule(backbone=tiny_bert, attention="topk", topk=4, predictions_file=str(target))
    predict_batches = [{k: v for k, v in b.items() if k not in ("start_positions", "end_positions")} for b in batches]
    trainer(tmp_path).predict(module, dataloaders=loader(predict_batches))
    written = json.loads(target.read_text())
    assert set(written) == {"q1", "q2", "q3"} and written == module.predictions
    assert list(target.parent.iterdir()) == [target]  # no temporary file left behind
    write_predictions({"a": "b"}, target)
    assert json.loads(target.read_text()) == {"a": "b"}


def test_training_with_topk_learns_the_answers(tmp_path, tiny_bert, batches):
    """End to end: top-k attention (k=4 of ~20 keys: approximate), chunked FF and AdamW fit three questions, the
    decoded spans then match the gold answers (the no-answer question included)."""
    pl.seed_everything(0)
    module = ExtractiveQAModule(backbone=tiny_bert, attention="topk", topk=4, query_chunk_size=8, ff_chunk_size=5,
                                learning_rate=1e-3, warmup_ratio=0.0, version_2_with_negative=True)
    fit = trainer(tmp_path, max_steps=60, limit_val_batches=0)
    fit.fit(module, train_dataloaders=loader(batches))
    metrics = trainer(tmp_path).validate(module, dataloaders=loader(batches), verbose=False)[0]
    assert module.predictions == {"q1": "the mat", "q2": "Paris", "q3": ""}
    assert metrics["val/em"] == 100.0


class KnownLogitsQA(ExtractiveQAModule):
    """The real module, except that its logits are the ones the test put into the batch."""

    def forward(self, batch):
        return batch["known_start"], batch["known_end"]


def _span_tokens(batch, row, span):
    """(first, last) token of ``span`` in the context of ``batch`` row ``row``, found through the offsets."""
    context, offsets = batch["context"][row], batch["offset_mapping"][row].tolist()
    begin = context.index(span)
    end = begin + len(span)
    (first,) = [t for t, (s, _) in enumerate(offsets) if s == begin]
    (last,) = [t for t, (_, e) in enumerate(offsets) if e == end]
    return first, last


def _with_known_logits(batches):
    """q1: the span "the mat" (right); q2: "Paris is" (half right: F1 2/3); q3 (no answer): the span "Nobody" scores 6
    and the null answer 7, so the null answer wins unless null_score_threshold >= 1."""
    spans = {"q1": ("the mat", 5.0, -10.0), "q2": ("Paris is", 5.0, -10.0), "q3": ("Nobody", 3.0, 3.5)}
    out = []
    for batch in batches:
        start = torch.full(batch["input_ids"].shape, -10.0)
        end = torch.full(batch["input_ids"].shape, -10.0)
        for row, example_id in enumerate(batch["example_id"]):
            span, score, null = spans[example_id]
            first, last = _span_tokens(batch, row, span)
            start[row, first] = score
            end[row, last] = score
            start[row, 0] = end[row, 0] = null  # the CLS token: the null answer's score is their sum
        out.append({**batch, "known_start": start, "known_end": end})
    return out


@pytest.mark.parametrize(
    "threshold, expected",
    [
        # q1 right, q2 F1 2/3, q3 null (right): EM 2/3, F1 (1 + 2/3 + 1) / 3; HasAns = q1, q2; NoAns = q3
        (0.0, {"em": 200 / 3, "f1": 800 / 9, "has_ans_em": 50.0, "has_ans_f1": 250 / 3, "no_ans_em": 100.0,
               "no_ans_f1": 100.0}),
        # null 7 - span 6 = 1 is not above 2: q3 answers "Nobody" (wrong)
        (2.0, {"em": 100 / 3, "f1": 500 / 9, "has_ans_em": 50.0, "has_ans_f1": 250 / 3, "no_ans_em": 0.0,
               "no_ans_f1": 0.0}),
    ],
)
def test_squad_v2_metrics_through_the_epoch_end_equal_hand_computed_values(tmp_path, tiny_bert, batches, threshold,
                                                                          expected):
    module = KnownLogitsQA(backbone=tiny_bert, attention="sdpa", version_2_with_negative=True,
                           null_score_threshold=threshold)
    result = trainer(tmp_path).validate(module, dataloaders=loader(_with_known_logits(batches)), verbose=False)[0]
    answers = {"q1": "the mat", "q2": "Paris is", "q3": "" if threshold < 1 else "Nobody"}
    assert module.predictions == answers
    assert {name: result[f"val/{name}"] for name in expected} == pytest.approx(expected, abs=1e-4)


def test_squad_v1_metrics_through_the_epoch_end_equal_hand_computed_values(tmp_path, tiny_bert, batches):
    module = KnownLogitsQA(backbone=tiny_bert, attention="sdpa")
    result = trainer(tmp_path).validate(module, dataloaders=loader(_with_known_logits(batches[:1])), verbose=False)[0]
    assert module.predictions == {"q1": "the mat", "q2": "Paris is"}
    assert result["val/em"] == pytest.approx(50.0) and result["val/f1"] == pytest.approx(250 / 3)
