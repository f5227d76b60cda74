"""Generation methods: one small module each, one uniform interface (see ``methods.base``)."""

from consistent_diffusion.methods.base import (
    GenerationContext,
    Method,
    available_methods,
    get_method,
    register,
    run,
)

__all__ = ["GenerationContext", "Method", "available_methods", "get_method", "register", "run"]
