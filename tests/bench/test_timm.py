"""timm and torchvision models through the methods: a timm CNN and ViT (random init, no download) and a small
torchvision VisionTransformer, their CAMs on the token grid checked against the formula computed by hand."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision

from bench.zoo import timm_model
from methods import grad_cam, last_spatial_layer, saliency
from methods.cam import _activations, _layer
from metrics.checks import Unsupported

timm = pytest.importorskip("timm", reason="timm is in the test extra: pip install -e '.[test]'")


def _grad_cam_by_hand(model: torch.nn.Module, module: torch.nn.Module, x: torch.Tensor, target: torch.Tensor,
                      prefix: int | None) -> torch.Tensor:
    """ReLU(sum_k mean_ij(g_kij) A_kij) upsampled; a token layer's (B, p + h w, D) output less its `prefix` tokens
    reshaped row-major to (B, D, h, w), h = w."""
    store: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, out: store.append(out))
    out = model(x.detach().requires_grad_())
    handle.remove()
    A = store[0]
    g = torch.autograd.grad(out.gather(1, target[:, None]).sum(), A)[0]
    if prefix is not None:
        B, N, D = A.shape
        side = round((N - prefix) ** 0.5)
        A, g = (t[:, prefix:].transpose(1, 2).reshape(B, D, side, side) for t in (A, g))
    cam = (g.mean(dim=(2, 3), keepdim=True) * A).sum(dim=1, keepdim=True).clamp_min(0)
    return F.interpolate(cam.detach(), size=x.shape[2:], mode="bilinear", align_corners=False).expand_as(x)


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def test_timm_resnet_through_saliency_and_grad_cam(x):
    torch.manual_seed(0)
    model = timm_model(6, arch="resnet10t").eval()
    assert model.zoo_source["source"] == "timm" and model.zoo_source["head"].startswith("reset_classifier: 1000 -> 6")
    target = torch.tensor([1, 4])
    s = saliency(model, x, target)
    xg = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(model(xg).gather(1, target[:, None]).sum(), xg)
    torch.testing.assert_close(s, g.abs())
    layer = last_spatial_layer(model, x)
    assert layer == "layer4.0.act2"                                   # the last block's output, 2 x 2 at 64 px
    torch.testing.assert_close(grad_cam(model, x, target),
                               _grad_cam_by_hand(model, model.get_submodule(layer), x, target, None))


def test_timm_vit_grad_cam_on_its_patch_tokens(x):
    """vit_tiny at 64 px (a 4 x 4 patch grid, depth 2): the CAM layer is the last block's norm1, its class token
    dropped; Grad-CAM equals the formula on the reshaped tokens."""
    torch.manual_seed(0)
    model = timm_model(6, arch="vit_tiny_patch16_224", options={"img_size": 64, "depth": 2}).eval()
    target = torch.tensor([0, 5])
    assert last_spatial_layer(model, x) == "blocks.1.norm1" and model.num_prefix_tokens == 1
    a = grad_cam(model, x, target)
    assert a.shape == x.shape and (a > 0).any()
    torch.testing.assert_close(a, _grad_cam_by_hand(model, model.blocks[1].norm1, x, target, 1))
    assert saliency(model, x, target).shape == x.shape


def _torchvision_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=64, patch_size=16, num_layers=2, num_heads=2,
                                                 hidden_dim=16, mlp_dim=32, num_classes=6).eval()
    torch.nn.init.normal_(model.heads.head.weight)                    # torchvision zero-initialises the head
    return model


def test_torchvision_vit_grad_cam_on_its_token_grid(x):
    model = _torchvision_vit()
    target = torch.tensor([2, 3])
    assert last_spatial_layer(model, x) == "encoder.layers.encoder_layer_1.ln_1"
    layer = model.encoder.layers.encoder_layer_1.ln_1
    torch.testing.assert_close(grad_cam(model, x, target), _grad_cam_by_hand(model, layer, x, target, 1))
    # patch order: the encoder's input tokens, as a map, are the patch embedding plus the position embedding
    A, _ = _activations(model, _layer("grad_cam", model, x, "encoder.dropout"), x, target)     # (B, D, 4, 4)
    pos = model.encoder.pos_embedding[:, 1:].transpose(1, 2).reshape(1, 16, 4, 4)
    torch.testing.assert_close(A, model.conv_proj(x) + pos)
    with pytest.raises(Unsupported, match=r"grad_cam cannot run on VisionTransformer: layer 'heads.head' outputs "
                                          r"\(1, 6\), neither a map"):
        grad_cam(model, x, target, layer="heads.head")


def test_attention_tensors_are_not_image_maps(x):
    """timm's q_norm / k_norm run on (B, heads, tokens, head_dim) 4-d tensors: never the CAM layer, never the grid;
    a zero head (the output ignores the input) gives the last token LayerNorm."""
    model = _torchvision_vit()
    torch.nn.init.zeros_(model.heads.head.weight)
    assert last_spatial_layer(model, x) == "encoder.ln"
    torch.manual_seed(0)
    vit = timm_model(6, arch="vit_tiny_patch16_224", options={"img_size": 64, "depth": 1, "global_pool": "avg"})
    assert last_spatial_layer(vit.eval(), x) == "blocks.0.norm2"     # mean-pooled: every token reaches the output


def test_a_shared_relu_gives_its_last_call_as_captum(x):
    """torchvision's BasicBlock calls one ReLU twice; the CAM takes its last call (the block's output), as captum's
    LayerGradCam does."""
    import captum.attr
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=6).eval()
    target = torch.tensor([1, 4])
    assert last_spatial_layer(model, x) == "layer4.1.relu"
    cam = captum.attr.LayerGradCam(model, model.layer4[1].relu).attribute(x.clone().requires_grad_(), target=target,
                                                                           relu_attributions=True)
    expected = F.interpolate(cam.detach(), size=x.shape[2:], mode="bilinear", align_corners=False).expand_as(x)
    torch.testing.assert_close(grad_cam(model, x, target), expected)
