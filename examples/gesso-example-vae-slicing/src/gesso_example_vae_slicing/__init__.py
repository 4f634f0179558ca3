"""gesso-example-vae-slicing: decode a batch of latents one image at a time, as a gesso optimization."""

__version__ = "0.1.0"
