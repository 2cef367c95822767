"""CIR methods, registered by name. Importing this package registers all of them."""

from circe.data.types import RawQuery
from circe.methods import (  # noqa: F401  (registers them)
    combiner,
    dafm,
    dqu_cir,
    dwc,
    far_net,
    tmcir,
    zeroshot,
)
from circe.methods.base import (
    Batch,
    CIRMethod,
    FrozenBackboneMethod,
    create_method,
    list_methods,
    method_class,
    register_method,
    standalone_methods,
    variant_of,
)

__all__ = [
    "Batch",
    "CIRMethod",
    "FrozenBackboneMethod",
    "RawQuery",
    "create_method",
    "list_methods",
    "method_class",
    "register_method",
    "standalone_methods",
    "variant_of",
]
