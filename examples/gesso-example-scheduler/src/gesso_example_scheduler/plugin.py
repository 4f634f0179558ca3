"""The gesso entry point: registers the scheduler class and its short names."""

from gesso import hookimpl
from gesso.contract import Scheduler


@hookimpl
def register_schedulers(register):
    register(
        Scheduler(
            target="gesso_example_scheduler.scheduler:EulerPolyExponentialScheduler",
            class_name="EulerPolyExponentialScheduler",
            short_names={"euler_polyexp": {}, "euler_polyexp_rho2": {"rho": 2.0}},
        )
    )
