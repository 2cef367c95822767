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
    CIRMethod,
    FrozenBackboneMethod,
    MethodInputs,
    create_method,
    list_methods,
    method_class,
    register_method,
    standalone_methods,
    variant_of,
)
from circe.methods.inputs import Batch

__all__ = [
    "Batch",
    "CIRMethod",
    "FrozenBackboneMethod",
    "MethodInputs",
    "RawQuery",
    "create_method",
    "list_methods",
    "method_class",
    "register_method",
    "standalone_methods",
    "variant_of",
]
