"""gesso-sd15: the Stable Diffusion 1.x family."""

__version__ = "0.1.0"
