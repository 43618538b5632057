"""PFJet-SSD client: SDK and CLI for the jetssd gateway (docs/client.md).

Light by design: httpx, numpy, h5py, rich, typer and the core ``jetssd`` package's event readers — never torch,
onnxruntime or the service code::

    from jetssd.io import open_events
    from jetssd_client import Client

    with Client("http://127.0.0.1:8080") as client, open_events("tt_0000.h5") as f:
        for result in client.detect_many((f[i] for i in range(len(f))), batch_size=16):
            print(result.id, result.jets[:1])

``jetssd-client hlt | reprocess | monitor`` are the command-line tools (``jetssd-client --help``).
"""

from jetssd_client.client import DEFAULT_URL, AsyncClient, Client, RetryNotice
from jetssd_client.encode import batched, encode_event, request_body
from jetssd_client.errors import (
    ApiError,
    JetSSDClientError,
    ProtocolError,
    ServiceTimeoutError,
    ServiceUnreachableError,
)
from jetssd_client.results import LABELS, DetectResponse, EventResult, Jet
from jetssd_client.retry import RetryPolicy

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_URL",
    "LABELS",
    "ApiError",
    "AsyncClient",
    "Client",
    "DetectResponse",
    "EventResult",
    "Jet",
    "JetSSDClientError",
    "ProtocolError",
    "RetryNotice",
    "RetryPolicy",
    "ServiceTimeoutError",
    "ServiceUnreachableError",
    "__version__",
    "batched",
    "encode_event",
    "request_body",
]
