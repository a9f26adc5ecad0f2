"""The discriminator: shapes, frozen backbone (no gradient, no optimiser state), weight sources."""

import pytest
import torch
from safetensors.torch import save_file

from sdxl_fast.distill import losses
from sdxl_fast.distill.config import TrainConfig
from sdxl_fast.distill.discriminator import (FeatureNetworkError, build_discriminator, discriminate, image_condition,
                                  load_backbone)

TINY_VIT = {"depth": 3, "embed_dim": 32, "num_heads": 2}


def tiny_cfg(**kw):
    return TrainConfig(disc_weights="random", disc_backbone_kwargs=TINY_VIT, disc_image_size=56, disc_blocks=(0, 2),
                       disc_head_channels=16, disc_cond_dim=8, **kw)


def test_logits_shape_and_frozen_backbone_gets_no_gradient_nor_optimizer_state():
    torch.manual_seed(0)
    features, heads = build_discriminator(tiny_cfg(), text_dim=10)
    opt = torch.optim.AdamW(heads.parameters(), lr=1e-3)
    real = torch.rand(2, 3, 64, 64, requires_grad=True) * 2 - 1
    real.retain_grad()
    fake = torch.rand(2, 3, 64, 64) * 2 - 1
    text = torch.randn(2, 10)
    img = features.image_embedding(real)
    assert img.shape == (2, 32)
    logits = discriminate(features, heads, torch.cat([real, fake]), text.repeat(2, 1), img.repeat(2, 1))
    n_tokens = (56 // 14) ** 2
    assert logits.shape == (4, 2 * n_tokens)
    real_logits, fake_logits = logits.chunk(2)
    r1 = losses.r1_penalty(real_logits, real)
    assert r1.item() > 0
    losses.discriminator_loss(real_logits, fake_logits, r1, 1.0).backward()
    opt.step()
    backbone_params = list(features.parameters())
    assert backbone_params and all(not p.requires_grad and p.grad is None for p in backbone_params)
    assert all(p.grad is not None for p in heads.parameters())
    state_ids = {id(p) for p in opt.state}
    assert state_ids == {id(p) for p in heads.parameters()}
    assert not state_ids & {id(p) for p in backbone_params}


def test_gradient_flows_through_the_frozen_backbone_to_fake_images():
    torch.manual_seed(0)
    features, heads = build_discriminator(tiny_cfg(), text_dim=4)
    fake = torch.zeros(1, 3, 64, 64, requires_grad=True)
    losses.generator_adv_loss(discriminate(features, heads, fake, torch.ones(1, 4), torch.ones(1, 32))).backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0


def test_weights_from_a_local_file_and_clear_errors(tmp_path):
    torch.manual_seed(1)
    source = load_backbone("vit_small_patch14_dinov2", "random", 56, **TINY_VIT)
    path = tmp_path / "dino.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    torch.manual_seed(2)
    loaded = load_backbone("vit_small_patch14_dinov2", str(path), 56, **TINY_VIT)
    for (k, a), b in zip(source.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(FeatureNetworkError, match="does not exist"):
        load_backbone("vit_small_patch14_dinov2", str(tmp_path / "missing.pth"), 56, **TINY_VIT)


def test_hub_weights_offline_give_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FeatureNetworkError, match="--disc_weights"):
        load_backbone("vit_small_patch14_dinov2", "hub", 56, **TINY_VIT)


def test_block_index_out_of_range():
    with pytest.raises(ValueError, match="out of range"):
        build_discriminator(tiny_cfg().__class__(**{**tiny_cfg().to_dict(), "disc_blocks": (0, 7)}), text_dim=4)


def test_noised_image_condition_hides_the_real_image_from_d_for_pure_noise_samples():
    torch.manual_seed(0)
    features, heads = build_discriminator(tiny_cfg(), text_dim=4)
    fake, text = torch.rand(2, 3, 64, 64) * 2 - 1, torch.randn(2, 4)
    saw_image = torch.tensor([True, False])  # sample 1's student input was pure noise
    emb_a, emb_b = torch.randn(2, 32), torch.randn(2, 32)

    def logits(emb, mode):
        return discriminate(features, heads, fake, text, image_condition(emb, saw_image, mode))

    noised_a, noised_b = logits(emb_a, "noised"), logits(emb_b, "noised")
    assert not torch.allclose(noised_a[0], noised_b[0])  # a sample that saw its image is judged against it
    assert torch.equal(noised_a[1], noised_b[1])  # a pure-noise one on the text alone
    all_a, all_b = logits(emb_a, "all"), logits(emb_b, "all")
    assert not torch.allclose(all_a[1], all_b[1])  # the paper's setting conditions every sample
    assert torch.equal(image_condition(emb_a, saw_image, "all"), emb_a)
    with pytest.raises(ValueError, match="disc_image_condition"):
        tiny_cfg(disc_image_condition="some").validate()
