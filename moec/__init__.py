"""moec: compile Mixture-of-Experts models ahead of time, then serve them."""

__version__ = "0.1.0"
