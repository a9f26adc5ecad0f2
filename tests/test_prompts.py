import pytest
import torch

from sdxl_fast import PromptTruncatedWarning
from sdxl_fast.pipeline.prompts import encode_prompts, tokenize


def test_embeddings_use_both_encoders_penultimate_layer(tiny_models):
    enc = tiny_models.quality.encoders
    emb = encode_prompts(enc, ["a red fox", "a blue bird"], torch.device("cpu"))
    assert emb.hidden_1.shape == (2, 77, 32) and emb.hidden_2.shape == (2, 77, 48)
    assert emb.pooled.shape == (2, 40) and emb.base_context.shape == (2, 77, 80)
    ids = enc.tokenizer_2(["a red fox"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    out = enc.text_encoder_2(ids, output_hidden_states=True)
    torch.testing.assert_close(emb.hidden_2[:1], out.hidden_states[-2])
    assert not torch.allclose(emb.hidden_2[:1], out.last_hidden_state)
    torch.testing.assert_close(emb.pooled[:1], out.text_embeds)


def test_a_10000_character_prompt_is_truncated_with_a_warning(tiny_models):
    enc = tiny_models.quality.encoders
    long_prompt = ("a very detailed castle on a hill " * 400)[:10_000]
    with pytest.warns(PromptTruncatedWarning, match="77"):
        long = encode_prompts(enc, [long_prompt], torch.device("cpu"))
    first_77 = enc.tokenizer.decode(enc.tokenizer(long_prompt).input_ids[1:76])
    short = encode_prompts(enc, [first_77], torch.device("cpu"))
    torch.testing.assert_close(long.hidden_1, short.hidden_1)


def test_tokenize_pads_and_cuts_as_the_tokenizers_own_options_do(tiny_models):
    enc = tiny_models.quality.encoders
    prompts = ["a red fox", "", "a very detailed castle on a hill " * 20, "tower"]
    ids_1, ids_2, warning = tokenize(enc, prompts)
    for tokenizer, ids in ((enc.tokenizer, ids_1), (enc.tokenizer_2, ids_2)):  # end-token and "!" padding
        want = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        assert torch.equal(ids, want.input_ids)
    assert warning.startswith("Prompt has 142 tokens") and "castle" in warning
    assert tokenize(enc, ["a red fox"])[2] is None


def test_cache_returns_the_same_embeddings_rewarns_and_forgets_the_oldest(tiny_models, monkeypatch):
    from sdxl_fast.pipeline import prompts

    enc = tiny_models.quality.encoders
    enc.cache.clear()
    monkeypatch.setattr(prompts, "PROMPT_CACHE_SIZE", 2)
    calls = []

    def encode(ids_1, ids_2):
        calls.append(1)
        return prompts.encode_tokens(enc, ids_1, ids_2)

    cpu = torch.device("cpu")
    first = prompts.encode_prompt_cached(enc, "a red fox", cpu, encode)
    torch.testing.assert_close(first.base_context, encode_prompts(enc, ["a red fox"], cpu).base_context)
    assert prompts.encode_prompt_cached(enc, "a red fox", cpu, encode) is first and len(calls) == 1
    long_prompt = "a castle on a hill " * 30
    for _ in range(2):  # the warning comes on a cache hit too: the app shows it for every generation
        with pytest.warns(PromptTruncatedWarning):
            prompts.encode_prompt_cached(enc, long_prompt, cpu, encode)
    prompts.encode_prompt_cached(enc, "a blue bird", cpu, encode)  # third prompt: "a red fox" is evicted
    assert len(calls) == 3
    assert prompts.encode_prompt_cached(enc, "a red fox", cpu, encode) is not first and len(calls) == 4
    enc.cache.clear()
