"""gesso-example-scheduler: an Euler sampler on a polyexponential noise schedule, as a gesso plugin."""

__version__ = "0.1.0"
