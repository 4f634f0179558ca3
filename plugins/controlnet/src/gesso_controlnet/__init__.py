"""ControlNet for gesso: the ``ControlNetModel`` and a conditioner for the SD1.5 and SDXL loops."""

__all__ = ["ControlNetModel", "MultiControlNetModel"]


def __getattr__(name: str) -> object:
    if name in __all__:
        from gesso_controlnet import model

        return getattr(model, name)
    raise AttributeError(f"module 'gesso_controlnet' has no attribute {name!r}")
