"""Shared fixtures: tiny random backbones built in code (no downloads) and the real SmolLM2 for slow tests."""

from __future__ import annotations

import os

import pytest

# Ray must bind loopback only (see README); set before any test imports ray.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
# No test reaches for the hub: set before datasets / mteb are first imported (tests of the online paths patch it).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from components.backbone import Backbone, load_backbone  # noqa: E402
from components.model import LLM2VecGen  # noqa: E402
from components.spec import Spec, load_spec  # noqa: E402

ARCHITECTURES = ["llama", "qwen2", "qwen3"]


@pytest.fixture(scope="session")
def tiny_spec() -> Spec:
    return load_spec("specs/tiny.yaml")


def tiny_spec_for(architecture: str, *overrides: str) -> Spec:
    return load_spec("specs/tiny.yaml", [f"backbone.random.architecture={architecture}", *overrides])


@pytest.fixture(scope="session")
def tiny_backbones() -> dict[str, Backbone]:
    """One frozen tiny backbone per architecture, shared: tests must never change its weights."""
    return {arch: load_backbone(tiny_spec_for(arch).backbone) for arch in ARCHITECTURES}


@pytest.fixture
def make_tiny_model(tiny_backbones):
    def make(architecture: str = "llama", embedding_dim: int = 16, *overrides: str) -> LLM2VecGen:
        spec = tiny_spec_for(architecture, *overrides)
        return LLM2VecGen.from_spec(spec, embedding_dim=embedding_dim, backbone=tiny_backbones[architecture])

    return make


@pytest.fixture(scope="session")
def smollm2_spec() -> Spec:
    return load_spec("specs/smollm2-135m.yaml")


@pytest.fixture(scope="session")
def smollm2_backbone(smollm2_spec) -> Backbone:
    return load_backbone(smollm2_spec.backbone)


@pytest.fixture(autouse=True)
def _no_leaked_mlflow_uri():
    """mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI, which our specs honour: keep it per test."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before
