"""The training-free baselines of the backbone are what their papers describe (issue 25): PromptEOL reads the last
layer at the template's last token, its chat variant at the assistant header's last token, Echo averages the last
layer over the second copy of the text. Each is checked against a hand computation from the tiny backbone's states."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from components.evaluation.encoders import ECHO, PROMPTEOL, PromptReadout, prompt_baselines, template_ids


@pytest.fixture
def backbone(tiny_backbones):
    return tiny_backbones["llama"]


def states(backbone, ids: list[int]) -> torch.Tensor:
    """The last hidden states (T, H) of one unpadded sequence."""
    with torch.inference_mode():
        return backbone.model.base_model(input_ids=torch.tensor([ids])).last_hidden_state[0]


def unit(vector) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float64)
    return vector / np.linalg.norm(vector)


TEXTS = ["A man is playing a guitar.", "Two dogs run across a field of snow while it gets dark"]


def test_template_ids_join_the_pieces_with_the_text_and_span_its_last_copy():
    ids, span = template_ids([[1, 2], [3], [4, 5]], [9, 9, 9])
    assert ids == [1, 2, 9, 9, 9, 3, 9, 9, 9, 4, 5] and span == (6, 9)
    assert template_ids([[1], [2]], [7]) == ([1, 7, 2], (1, 2))


def test_prompteol_is_the_last_layer_state_at_the_templates_last_token(backbone):
    readout = PromptReadout(backbone, 64, PROMPTEOL, "last", "prompteol")
    got = readout.embed(TEXTS, "", batch_size=2)  # one padded batch
    tokenizer = backbone.tokenizer
    for text, vector in zip(TEXTS, got, strict=True):
        prompt = f'This sentence : "{text}" means in one word:"'
        ids = tokenizer(prompt, add_special_tokens=False).input_ids
        assert readout.ids(text)[0] == ids  # the whole prompt, nothing before or after it
        assert tokenizer.decode(ids[-1:]) == '"'  # the token read is the closing quote the answer word follows
        np.testing.assert_allclose(vector, unit(states(backbone, ids)[-1]), atol=1e-5)
    # not the bare text's last token, and not a mean
    bare = tokenizer(TEXTS[0], add_special_tokens=False).input_ids
    assert np.abs(got[0] - unit(states(backbone, bare)[-1])).max() > 1e-3


def test_prompteol_chat_reads_the_assistant_headers_last_token(backbone):
    readout = PromptReadout(backbone, 64, PROMPTEOL, "last", "prompteol-chat", chat=True)
    got = readout.embed(TEXTS[:1], "", batch_size=1)
    tokenizer = backbone.tokenizer
    words = f'This sentence : "{TEXTS[0]}" means in one word:"'
    ids = tokenizer.apply_chat_template([{"role": "user", "content": words}], tokenize=True, add_generation_prompt=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    assert readout.ids(TEXTS[0])[0] == ids
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")
    np.testing.assert_allclose(got[0], unit(states(backbone, ids)[-1]), atol=1e-5)
    assert np.abs(got[0] - PromptReadout(backbone, 64, PROMPTEOL, "last", "p").embed(TEXTS[:1], "", 1)[0]).max() > 1e-3


def test_echo_is_the_mean_over_the_second_copy_of_the_text(backbone):
    readout = PromptReadout(backbone, 64, ECHO, "echo", "echo")
    got = readout.embed(TEXTS, "", batch_size=2)
    tokenizer = backbone.tokenizer
    for text, vector in zip(TEXTS, got, strict=True):
        first = tokenizer(f"Rewrite the sentence: {text}", add_special_tokens=False).input_ids
        whole = tokenizer(f"Rewrite the sentence: {text}, rewritten sentence: {text}", add_special_tokens=False).input_ids
        length = len(tokenizer(text, add_special_tokens=False).input_ids)
        assert readout.ids(text) == (whole, (len(whole) - length, len(whole)))  # the template ends with the text
        hidden = states(backbone, whole)
        np.testing.assert_allclose(vector, unit(hidden[-length:].mean(0)), atol=1e-5)
        # not the first copy's mean, nor the whole prompt's
        assert np.abs(vector - unit(hidden[len(first) - length : len(first)].mean(0))).max() > 1e-3
        assert np.abs(vector - unit(hidden.mean(0))).max() > 1e-3


def test_a_long_text_is_cut_inside_the_template_so_the_token_read_stays_the_prompts_end(backbone):
    readout = PromptReadout(backbone, 8, PROMPTEOL, "last", "prompteol")
    ids, _ = readout.ids("x" * 100)
    assert backbone.tokenizer.decode(ids) == 'This sentence : "xxxxxxxx" means in one word:"'
    echo_ids, (start, end) = PromptReadout(backbone, 8, ECHO, "echo", "echo").ids("y" * 100)
    assert end - start == 8 and backbone.tokenizer.decode(echo_ids[start:end]) == "y" * 8


def test_results_are_cached_by_text_and_a_bad_template_is_refused(backbone):
    readout = PromptReadout(backbone, 64, PROMPTEOL, "last", "prompteol")
    first = readout.embed(TEXTS, "", batch_size=1)
    assert set(readout._cache) == set(TEXTS)
    readout.encoder = None  # a second call must not run the backbone again
    np.testing.assert_array_equal(readout.embed(TEXTS[::-1], "", batch_size=1), first[::-1])
    with pytest.raises(ValueError, match="placeholder"):
        PromptReadout(backbone, 64, "no text here", "last", "bad")
    with pytest.raises(ValueError, match="twice"):
        PromptReadout(backbone, 64, PROMPTEOL, "echo", "bad")
    assert list(prompt_baselines(backbone, 64)) == ["prompteol", "prompteol-chat", "echo"]


def test_a_long_encode_reports_items_done_rate_and_time_left(caplog):
    from components.evaluation.progress import Progress, progress_line

    assert progress_line("encode echo T", 256, 1024, 8.0) == "encode echo T: 256/1,024 texts (25%), 32.0/s, 24s left"
    assert progress_line("oracle: generate", 96, 96, 22.0, "answers").endswith("96/96 answers (100%), 4.4/s, done in 22s")
    import logging

    with caplog.at_level(logging.INFO, logger="components.evaluation.progress"):
        quiet = Progress("short", 10, every=60.0)
        quiet.update(10)  # work shorter than `every` prints nothing
        loud = Progress("long", 4, every=0.0)
        loud.update(2)
        loud.update(2)
    assert [record.getMessage().split(":")[0] for record in caplog.records] == ["long", "long"]
    assert "2/4 texts (50%)" in caplog.records[0].getMessage() and "done in" in caplog.records[1].getMessage()
