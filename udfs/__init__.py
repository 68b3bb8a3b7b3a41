"""Endpoint protocols, the HTTP engine beneath them, and the pandas UDF that runs it on Spark.

`udfs.protocols`, `udfs.engine`, `udfs.limits`, `udfs.transport` and `udfs.auth` never import Spark;
`udfs.inference` is the one module that does.
"""

from udfs.auth import Secret
from udfs.engine import Engine, EngineSpec, Outcome, RetrySpec
from udfs.protocols import BadResponse, Parsed, make_protocol

__all__ = ["BadResponse", "Engine", "EngineSpec", "Outcome", "Parsed", "RetrySpec", "Secret", "make_protocol"]
