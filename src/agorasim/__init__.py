"""agorasim: long-horizon simulations of recommendation marketplaces."""

__version__ = "0.1.0"
