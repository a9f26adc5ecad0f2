import open_clip

from sdxl_fast.testing.random_weights import clip_tokenizer

# No "!" in the text: it is tokenizer_2's pad token (as in SDXL's own tokenizer_2), so it is matched as a special token.
TEXT = "a photo of a cat, trending on artstation. Ünïcode 🐱 #1"


def test_tokenizer_matches_open_clip():
    expected = open_clip.tokenize([TEXT])[0].tolist()  # open_clip pads with 0, which is "!"
    second = clip_tokenizer(pad_token="!")(TEXT, padding="max_length", max_length=77).input_ids
    assert second == expected
    # SDXL's first tokenizer pads with the end-of-text token instead; the tokens before it are the same.
    first = clip_tokenizer()(TEXT, padding="max_length", max_length=77).input_ids
    n = expected.index(49407) + 1
    assert first[:n] == expected[:n] and set(first[n:]) == {49407}
