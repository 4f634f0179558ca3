"""gesso-kandinsky: the Kandinsky 2.2 family (unCLIP prior, image-conditioned UNet, MoVQ)."""

__version__ = "0.1.0"
