"""fastmcl: fast online knowledge distillation."""

__version__ = "0.1.0"
