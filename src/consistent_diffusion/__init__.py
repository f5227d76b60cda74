"""consistent-diffusion: make, combine, measure and choose methods for consistent image series."""

__version__ = "0.1.0"

__all__ = ["__version__"]
