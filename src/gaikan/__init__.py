"""gaikan (外観): automated visual inspection on a CPU."""

__version__ = "0.1.0"
