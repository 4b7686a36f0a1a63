"""Video VAEs."""

from easyanimate.models.vae.slice_vae import SliceVAE

__all__ = ["SliceVAE"]
