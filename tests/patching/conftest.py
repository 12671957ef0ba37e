"""Offline hub settings and the `family` fixture (every supported model family)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest

from .tiny_models import FAMILIES


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param
