"""T5 encoders as backbones of the task modules: loading a seq2seq checkpoint's encoder, top-k on it, export."""

import pytest
import torch
from transformers import AutoTokenizer, T5EncoderModel

from topk_lightning.modules import ExtractiveQAModule, SequenceClassificationModule

from test_qa_module import EXAMPLES, qa_batch


@pytest.fixture(scope="module")
def batch(tiny_t5):
    return qa_batch(AutoTokenizer.from_pretrained(tiny_t5), EXAMPLES)


def _reference_logits(path, head, batch):
    """Plain transformers: the checkpoint's encoder under eager attention, then the module's head."""
    encoder = T5EncoderModel.from_pretrained(path, attn_implementation="eager").eval()
    states = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    return head(states).unbind(-1)


def test_qa_module_runs_the_encoder_of_a_t5_checkpoint_with_topk(tiny_t5, batch):
    # topk >= every length: top-k must equal eager T5 exactly (fp32 rounding)
    module = ExtractiveQAModule(backbone=tiny_t5, topk=64, query_chunk_size=8, ff_chunk_size=4).eval()
    assert isinstance(module.backbone, T5EncoderModel) and not hasattr(module.backbone, "decoder")
    assert module.backbone.config._attn_implementation == "topk"
    start, end = module(batch)
    ref_start, ref_end = _reference_logits(tiny_t5, module.head, batch)
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(start[keep], ref_start[keep], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(end[keep], ref_end[keep], atol=1e-5, rtol=1e-4)

    module.train()
    module.span_loss(*module(batch), batch["start_positions"], batch["end_positions"]).backward()
    bias = module.backbone.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
    assert bias.grad is not None and bias.grad.abs().sum() > 0


def test_t5_qa_export_is_the_encoder_and_the_head_beside_it(tiny_t5, batch, tmp_path):
    from safetensors.torch import load_file

    module = ExtractiveQAModule(backbone=tiny_t5, topk=64, query_chunk_size=8).eval()  # exact: topk >= lengths
    with torch.no_grad():
        module.head.bias.copy_(torch.tensor([0.5, -0.5]))  # not the initial head
    path = module.export(tmp_path / "export")
    assert T5EncoderModel.from_pretrained(path).config._attn_implementation != "topk"
    head = torch.nn.Linear(module.backbone.config.d_model, 2)
    head.load_state_dict(load_file(str(path / "qa_head.safetensors")))
    start, end = _reference_logits(path, head, batch)  # plain transformers, eager
    module_start, module_end = module(batch)
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(start[keep], module_start[keep], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(end[keep], module_end[keep], atol=1e-5, rtol=1e-4)


def test_classification_pools_t5_encoder_states_and_refuses_the_seq2seq_head(tiny_t5, batch):
    module = SequenceClassificationModule(backbone=tiny_t5, num_labels=3, pooling="mean", topk=4).eval()
    assert isinstance(module.backbone, T5EncoderModel)
    assert module(batch).shape == (3, 3)
    with pytest.raises(ValueError, match="pooling='model' is not available for t5 backbones"):
        SequenceClassificationModule(backbone=tiny_t5, num_labels=3, pooling="model")
