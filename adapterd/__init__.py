"""adapterd: one base causal LM in memory, many MB-sized adapters chosen per request, over gRPC.

The import root. Sub-packages: ``adapterd.server`` (daemon), ``adapterd.trainer``, ``adapterd.clients``
(no torch), ``adapterd.v1`` (generated stubs).
"""

__version__ = "0.1.0"
