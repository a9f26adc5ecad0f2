"""The fused text-encoder attention computes what transformers' CLIPAttention does, without adding weights."""

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from sdxl_fast.accel import text_qkv


@torch.no_grad()
def test_fused_encoder_gives_the_same_states_and_shares_the_weights():
    torch.manual_seed(0)
    config = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                            projection_dim=16, vocab_size=1000)
    encoder = CLIPTextModelWithProjection(config).eval()
    ids = torch.randint(0, 1000, (2, 77))
    want = encoder(ids, output_hidden_states=True)

    assert text_qkv.fuse(encoder) == 3
    assert text_qkv.fuse(encoder) == 0  # already fused: nothing left to do
    got = encoder(ids, output_hidden_states=True)
    for a, b in zip(got.hidden_states, want.hidden_states):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)
    assert torch.allclose(got.text_embeds, want.text_embeds, atol=1e-5, rtol=0)
    attention = encoder.text_model.encoder.layers[0].self_attn
    assert attention.qkv_proj.weight.shape == (96, 32)
    for i, name in enumerate(("q_proj", "k_proj", "v_proj")):  # views into the fused weight
        part = getattr(attention, name).weight
        assert part.data_ptr() == attention.qkv_proj.weight[32 * i:].data_ptr()


@torch.no_grad()
def test_fused_encoder_refuses_a_padding_mask_it_would_not_apply():
    config = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                            vocab_size=1000)
    encoder = CLIPTextModelWithProjection(config).eval()
    text_qkv.fuse(encoder)
    ids, mask = torch.randint(0, 1000, (1, 77)), torch.ones(1, 77, dtype=torch.long)
    for call in (lambda: encoder(ids, attention_mask=mask), lambda: encoder(ids, mask)):
        with pytest.raises(ValueError, match="padding mask"):
            call()
    assert encoder(ids).text_embeds.shape == (1, 512)
