"""gesso: plugin-based text-to-image generation."""

__version__ = "0.1.0"

from gesso.hookspecs import hookimpl

__all__ = ["AutoPipelineForText2Image", "ControlNetModel", "PluginHost", "__version__", "batch", "hookimpl", "run"]

_LAZY = {
    "AutoPipelineForText2Image": "gesso.auto:AutoPipelineForText2Image",
    "ControlNetModel": "gesso.auto:ControlNetModel",
    "PluginHost": "gesso.plugins:PluginHost",
    "run": "gesso.runner:run",
    "batch": "gesso.batching:batch",
}


def __getattr__(name: str) -> object:
    """Import the heavy parts (torch and the models) only when they are first used."""
    if name not in _LAZY:
        raise AttributeError(f"module 'gesso' has no attribute {name!r}")
    from gesso.contract import load_object

    value = load_object(_LAZY[name])
    globals()[name] = value
    return value
