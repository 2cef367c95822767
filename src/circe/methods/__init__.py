"""CIR methods, registered by name. Importing this package registers all of them."""

from circe.methods import zeroshot  # noqa: F401  (registers the baselines)
from circe.methods.base import Batch, CIRMethod, create_method, list_methods, register_method

__all__ = ["Batch", "CIRMethod", "create_method", "list_methods", "register_method"]
