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
    heads.eval()  # no spectral-norm power iteration between the calls compared
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


# --- issue 27: StyleGAN-T heads, BatchNormLocal, DiffAugment ------------------------------------------------

from sdxl_fast.distill import augment  # noqa: E402
from sdxl_fast.distill.discriminator import (BatchNormLocal, DiscriminatorHeads, StyleGANTHead,  # noqa: E402
                                             discriminate_real_fake)


def _sigma(weight: torch.Tensor) -> float:
    return torch.linalg.matrix_norm(weight.detach().flatten(1), 2).item()


@pytest.mark.parametrize("kind", ["stylegan_t", "plain"])
def test_each_head_gives_one_logit_per_token_and_full_width_by_default(kind):
    torch.manual_seed(0)
    heads = DiscriminatorHeads(2, feature_dim=24, channels=0, cond_dim=8, cond_in=10, kind=kind, virtual_batch=2)
    tokens = [torch.randn(5, 16, 24), torch.randn(5, 16, 24)]
    logits = heads(tokens, torch.randn(5, 10))
    assert logits.shape == (5, 32)
    first = heads.heads[0]
    width = first.inp.conv.out_channels if kind == "stylegan_t" else first.inp.out_channels
    assert width == 24  # channels 0: the feature width, as StyleGAN-T
    assert DiscriminatorHeads(1, 24, 16, 8, 10, kind=kind).heads[0](tokens[0], torch.randn(5, 10)).shape == (5, 16)


def test_stylegan_t_heads_are_spectrally_normalised_and_the_plain_ones_are_not():
    torch.manual_seed(0)
    head = StyleGANTHead(24, 32, cond_dim=8, cond_in=10, virtual_batch=4)
    for _ in range(20):  # one power iteration per training forward
        head(torch.randn(8, 16, 24), torch.randn(8, 10))
    convs = [head.inp.conv, head.mix.conv, head.out]
    for conv in convs:
        assert conv.parametrizations.weight.original.shape == conv.weight.shape
        assert _sigma(conv.weight) == pytest.approx(1.0, abs=0.02)  # the normalised weight
        assert _sigma(conv.parametrizations.weight.original) != pytest.approx(1.0, abs=0.05)  # the raw one
    plain = DiscriminatorHeads(1, 24, 32, 8, 10, kind="plain").heads[0]
    assert not hasattr(plain.mix, "parametrizations")
    with pytest.raises(ValueError, match="disc_head"):
        DiscriminatorHeads(1, 24, 32, 8, 10, kind="mlp")


def test_stylegan_t_residual_is_scaled_by_one_over_sqrt2():
    torch.manual_seed(0)
    head = StyleGANTHead(8, 8, cond_dim=4, cond_in=3).eval()
    x = torch.randn(4, 8, 12)
    block = head.mix
    h = torch.nn.functional.leaky_relu(block.norm(block.conv(x)), 0.2)
    assert torch.allclose(block(x), (x + h) / 2**0.5, atol=1e-6)


def test_batch_norm_local_normalises_each_virtual_batch_and_each_part_alone():
    torch.manual_seed(0)
    norm = BatchNormLocal(3, virtual_batch=2)
    x = torch.randn(4, 3, 5) * 3 + 7
    y = norm(x)
    for group in (y[:2], y[2:]):  # groups of virtual_batch samples: mean 0, variance 1 per channel
        assert torch.allclose(group.mean(dim=(0, 2)), torch.zeros(3), atol=1e-5)
        assert torch.allclose(group.var(dim=(0, 2), unbiased=False), torch.ones(3), atol=1e-3)
    # 5 samples, virtual batch 2: 3 groups of sizes 2, 2, 1 (the output exists and is finite)
    assert torch.isfinite(BatchNormLocal(3, 2)(torch.randn(5, 3, 4))).all()
    # parts: a batch of [a; b] with a virtual batch covering both is still normalised per half
    big = BatchNormLocal(3, virtual_batch=8)
    a, b = torch.randn(4, 3, 5), torch.randn(4, 3, 5) + 10
    assert torch.allclose(big(torch.cat([a, b]), parts=2), torch.cat([big(a), big(b)]), atol=1e-5)


def test_real_and_fake_go_through_one_forward_with_their_own_batch_statistics():
    torch.manual_seed(0)
    features, heads = build_discriminator(tiny_cfg(disc_virtual_batch=8), text_dim=4)
    heads.eval()
    real, fake = torch.rand(2, 3, 64, 64) * 2 - 1, torch.rand(2, 3, 64, 64) * 2 - 1
    text, img = torch.randn(2, 4), torch.randn(2, 32)
    real_logits, fake_logits = discriminate_real_fake(features, heads, real, fake, text, img)
    assert torch.allclose(real_logits, discriminate(features, heads, real, text, img), atol=1e-5)
    assert torch.allclose(fake_logits, discriminate(features, heads, fake, text, img), atol=1e-5)


def test_diffaugment_keeps_gradients_and_gives_real_and_fake_the_same_draw():
    torch.manual_seed(0)
    d = augment.draw("color,translation,cutout", 3, "cpu")
    real = torch.rand(3, 3, 32, 32) * 2 - 1
    # The same draw on the same images gives the same output; on [real; fake] each half matches its own call.
    fake = (torch.rand(3, 3, 32, 32) * 2 - 1).requires_grad_(True)
    both = augment.apply(torch.cat([real, fake]), augment.repeat(d, 2))
    assert torch.equal(both[:3], augment.apply(real, d)) and torch.equal(both[3:], augment.apply(fake, d))
    assert torch.equal(augment.apply(real, d), augment.apply(real.clone(), d))
    # Real and fake image i got the same translation and hole: where a pixel is zeroed in one it is in the other
    # (images made of ones, so only the geometry shows).
    geometry = augment.Draw(shift=d.shift, hole=d.hole)
    ones_a = augment.apply(torch.ones(3, 3, 32, 32), geometry)
    assert torch.equal(ones_a, augment.apply(torch.full((3, 3, 32, 32), 2.0), geometry) / 2)
    assert (ones_a == 0).any() and (ones_a == 1).any()
    # Gradients reach the input through every policy; through the geometry only where a pixel survives.
    augment.apply(fake, d).sum().backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0
    fake.grad = None
    augment.apply(fake, geometry).sum().backward()
    assert ((fake.grad == 0) | (fake.grad == 1)).all() and (fake.grad == 0).any() and (fake.grad == 1).any()


def test_diffaugment_policies_one_by_one_and_off():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert augment.parse_policy("") == ()
    off = augment.draw("", 2, "cpu")
    assert torch.equal(augment.apply(x, off), x)
    # translation alone: a pure shift of the pixels (values preserved, some zeros filled in)
    t = augment.draw("translation", 2, "cpu")
    t.shift = torch.tensor([[1.0, 0.0], [0.0, -1.0]])  # 2 pixels down; 2 pixels left (0.125 · 16)
    shifted = augment.apply(x, t)
    assert torch.equal(shifted[0, :, 2:], x[0, :, :-2]) and (shifted[0, :, :2] == 0).all()
    assert torch.equal(shifted[1, :, :, :-2], x[1, :, :, 2:]) and (shifted[1, :, :, -2:] == 0).all()
    # cutout alone: an 8x8 hole centred at the drawn point, the rest untouched
    c = augment.Draw(hole=torch.tensor([[0.5, 0.5], [0.0, 0.0]]))
    cut = augment.apply(x, c)
    assert (cut[0, :, 4:12, 4:12] == 0).all() and torch.equal(cut[0, :, :4], x[0, :, :4])
    assert (cut[1, :, :4, :4] == 0).all() and torch.equal(cut[1, :, 4:], x[1, :, 4:])
    # color alone: brightness, saturation, contrast by hand
    col = augment.Draw(brightness=torch.tensor([0.1, 0.0]), saturation=torch.tensor([1.0, 0.0]),
                       contrast=torch.tensor([1.0, 1.0]))
    out = augment.apply(x, col)
    assert torch.allclose(out[0], x[0] + 0.1, atol=1e-6)
    assert torch.allclose(out[1], x[1].mean(dim=0, keepdim=True).expand(3, -1, -1), atol=1e-6)  # grey
    with pytest.raises(ValueError, match="policy"):
        augment.parse_policy("color,zoom")
