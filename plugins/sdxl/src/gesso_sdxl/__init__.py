"""gesso-sdxl: the Stable Diffusion XL family."""

__version__ = "0.1.0"
