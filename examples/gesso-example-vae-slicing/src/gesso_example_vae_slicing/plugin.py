"""The gesso entry point: registers the optimization."""

from gesso import hookimpl
from gesso.contract import OptimizationSpec


@hookimpl
def register_optimizations(register):
    register(
        OptimizationSpec(
            name="vae_slicing",
            apply="gesso_example_vae_slicing.slicing:vae_slicing",
            description="decode a batch one image at a time (peak memory of one image)",
            devices=("cuda", "cpu"),
            order=45,
        )
    )
