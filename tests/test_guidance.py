"""Classifier-free guidance wrapper: scale 1 is the conditional model, 0 the unconditional, linear in between."""
import pytest
import torch
from diffusers import UNet2DModel

from fastsample import sample
from fastsample.guidance.cfg import ClassifierFreeGuidance


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, num_class_embeds=4).eval()


def test_cfg_is_the_guided_combination(unet):
    x, t, labels = torch.randn(3, 1, 8, 8), torch.tensor(500), torch.tensor([0, 1, 2])
    with torch.no_grad():
        cond = unet(x, t, class_labels=labels).sample
        uncond = unet(x, t, class_labels=torch.full_like(labels, 3)).sample
        assert torch.allclose(ClassifierFreeGuidance(unet, labels, 1.0, 3)(x, t), cond)
        assert torch.allclose(ClassifierFreeGuidance(unet, labels, 0.0, 3)(x, t), uncond, atol=1e-6)
        assert torch.allclose(ClassifierFreeGuidance(unet, labels, 3.0, 3)(x, t), uncond + 3 * (cond - uncond), atol=1e-5)
        x0, nfe = sample(ClassifierFreeGuidance(unet, labels, 2.0, 3), x, "unipc", 4, progress=False)
    assert nfe == 4 and torch.isfinite(x0).all()


def test_cfg_bad_input(unet):
    with pytest.raises(ValueError, match="scale must be a finite number"):
        ClassifierFreeGuidance(unet, torch.tensor([0]), float("nan"), 3)
    with pytest.raises(ValueError, match="labels has 1 entries for a batch of 2"):
        ClassifierFreeGuidance(unet, torch.tensor([0]), 2.0, 3)(torch.randn(2, 1, 8, 8), 10)
