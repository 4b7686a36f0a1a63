"""Losses for Slice VAE training: patch discriminators, hinge GAN loss, VQGAN adaptive weight, LPIPS.

EasyAnimate (arXiv 2405.18991, Sec. 2.2) trains its VAE with L1 + KL + perceptual + adversarial terms, the
adversarial part from a 2D (per-frame) and a 3D discriminator. The discriminators here follow the PatchGAN of
pix2pix/VQGAN; the adaptive weight is VQGAN's ratio of gradient norms at the decoder's last layer.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "PatchDiscriminator2d",
    "PatchDiscriminator3d",
    "VideoDiscriminator",
    "hinge_d_loss",
    "hinge_g_loss",
    "adaptive_weight",
    "LPIPS",
    "kl_per_sample",
]


def _norm(channels: int) -> nn.Module:
    # GroupNorm instead of BatchNorm: batches are tiny and mix images with videos.
    return nn.GroupNorm(min(32, channels // 4) or 1, channels)


class PatchDiscriminator2d(nn.Module):
    """PatchGAN on single frames: a video is judged frame by frame (frames folded into the batch)."""

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        c = channels
        for i in range(1, layers + 1):
            nc = channels * min(2**i, 8)
            mods += [nn.Conv2d(c, nc, 4, 2 if i < layers else 1, 1), _norm(nc), nn.LeakyReLU(0.2)]
            c = nc
        mods.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        return self.net(x.transpose(1, 2).reshape(b * t, c, h, w))


class PatchDiscriminator3d(nn.Module):
    """PatchGAN over space-time: judges motion, which a per-frame critic cannot see. Needs >= 2 frames."""

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv3d(in_channels, channels, 3, (1, 2, 2), 1), nn.LeakyReLU(0.2)]
        c = channels
        for i in range(1, layers + 1):
            nc = channels * min(2**i, 8)
            stride = (2, 2, 2) if i < layers else (1, 1, 1)
            mods += [nn.Conv3d(c, nc, 3, stride, 1), _norm(nc), nn.LeakyReLU(0.2)]
            c = nc
        mods.append(nn.Conv3d(c, 1, 3, 1, 1))
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class VideoDiscriminator(nn.Module):
    """The 2D and 3D critics together; images (T == 1) only meet the 2D one."""

    def __init__(
        self, in_channels: int = 3, channels: int = 64, layers: int = 3, use_2d: bool = True, use_3d: bool = True
    ):
        super().__init__()
        if not (use_2d or use_3d):
            raise ValueError("a discriminator needs the 2D or the 3D critic (or both)")
        self.d2 = PatchDiscriminator2d(in_channels, channels, layers) if use_2d else None
        self.d3 = PatchDiscriminator3d(in_channels, channels, layers) if use_3d else None

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        logits = []
        if self.d2 is not None:
            logits.append(self.d2(x))
        if self.d3 is not None and x.shape[2] > 1:
            logits.append(self.d3(x))
        if not logits:
            # 3D-only critic on an image batch: fall back to nothing rather than a bogus score.
            return []
        return logits


def hinge_d_loss(real_logits: list[torch.Tensor], fake_logits: list[torch.Tensor]) -> torch.Tensor:
    terms = [0.5 * (F.relu(1.0 - r).mean() + F.relu(1.0 + f).mean()) for r, f in zip(real_logits, fake_logits)]
    return torch.stack(terms).mean()


def hinge_g_loss(fake_logits: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([-f.mean() for f in fake_logits]).mean()


def adaptive_weight(
    rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, max_weight: float, eps: float = 1e-4
) -> torch.Tensor:
    """VQGAN: scale the GAN term so its gradient at the decoder's last layer matches the reconstruction's."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (g_grad.norm() + eps)
    return weight.clamp(0.0, max_weight).detach()


def kl_per_sample(posterior) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) summed over a sample's latent, averaged over the batch."""
    kl = 0.5 * (posterior.mean.pow(2) + posterior.var - 1.0 - posterior.logvar)
    return kl.flatten(1).sum(dim=1).mean()


class LPIPS(nn.Module):
    """LPIPS (Zhang et al. 2018) with the VGG16 backbone; weights come only from a local file.

    The file (safetensors, or a torch state dict) holds torchvision's ``vgg16().features`` weights under
    ``net.`` and the five 1x1 calibration layers under ``lin0.weight`` .. ``lin4.weight``.
    """

    _SLICES = (4, 9, 16, 23, 30)  # ends of VGG16's relu1_2 .. relu5_3 blocks
    _CHANNELS = (64, 128, 256, 512, 512)

    def __init__(self):
        super().__init__()
        from torchvision.models import vgg16

        self.net = vgg16(weights=None).features[: self._SLICES[-1]]
        for i, c in enumerate(self._CHANNELS):
            self.register_module(f"lin{i}", nn.Conv2d(c, 1, 1, bias=False))
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_file(cls, path: str | Path) -> "LPIPS":
        path = Path(path)
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        model = cls()
        model.load_state_dict(state, strict=True)
        return model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean LPIPS distance of (B, 3, H, W) or (B, 3, T, H, W) inputs in [-1, 1]."""
        if x.ndim == 5:
            b, c, t, h, w = x.shape
            x = x.transpose(1, 2).reshape(b * t, c, h, w)
            y = y.transpose(1, 2).reshape(b * t, c, h, w)
        fx, fy = (x - self.shift) / self.scale, (y - self.shift) / self.scale
        total = x.new_zeros(())
        start = 0
        for i, end in enumerate(self._SLICES):
            block = self.net[start:end]
            fx, fy = block(fx), block(fy)
            start = end
            nx = fx / (fx.norm(dim=1, keepdim=True) + 1e-10)
            ny = fy / (fy.norm(dim=1, keepdim=True) + 1e-10)
            total = total + getattr(self, f"lin{i}")((nx - ny) ** 2).mean()
        return total
