"""TopKConfig validation."""

from __future__ import annotations

import pytest

from topk_lightning import TopKConfig
from topk_lightning.errors import InputError


def test_defaults():
    config = TopKConfig()
    assert (config.topk, config.query_chunk_size, config.ff_chunk_size, config.ff_topk, config.layers) == (
        64, 1024, None, None, None,
    )


def test_keyword_only():
    with pytest.raises(TypeError):
        TopKConfig(32)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"topk": 0}, r"TopKConfig.topk must be None or an int >= 1, got 0"),
        ({"topk": 2.5}, r"TopKConfig.topk must be None or an int >= 1, got 2.5"),
        ({"topk": True}, r"TopKConfig.topk must be None or an int >= 1, got True"),
        ({"query_chunk_size": -1}, r"TopKConfig.query_chunk_size must be an int >= 1, got -1"),
        ({"ff_chunk_size": 0}, r"TopKConfig.ff_chunk_size must be None or an int >= 1, got 0"),
        ({"ff_topk": "8"}, r"TopKConfig.ff_topk must be None or an int >= 1, got '8'"),
        ({"layers": 3}, r"TopKConfig.layers must be None or a list of layer indices, got 3"),
        ({"layers": [0, -1]}, r"TopKConfig.layers must hold ints >= 0 .* got -1"),
        ({"layers": [1, 1]}, r"TopKConfig.layers must not repeat an index, got \[1, 1\]"),
        ({"layers": []}, r"TopKConfig.layers must be None \(all layers\) or a non-empty list"),
        ({"backend": "cuda"}, r"TopKConfig.backend must be one of 'auto', 'torch', 'triton', got 'cuda'"),
    ],
)
def test_invalid_values_name_the_argument(kwargs, message):
    with pytest.raises(InputError, match=message):  # a ValueError the command line reports without a traceback
        TopKConfig(**kwargs)


def test_topk_none_means_attention_untouched():
    assert TopKConfig(topk=None, ff_chunk_size=8).topk is None


def test_layers_tuple_becomes_list():
    assert TopKConfig(layers=(2, 0)).layers == [2, 0]
