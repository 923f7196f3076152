"""An OpenAI-compatible HTTP front end of the daemon (``adapterd serve --http-port N``).

requests.py   OpenAI request bodies -> GenerateRequest (then the gRPC path's validation)
responses.py  OpenAI response, chunk and error objects; gRPC codes -> HTTP statuses
routes.py     the Starlette endpoints: auth, budget, metrics, streaming with server-sent events
server.py     uvicorn on the daemon's event loop, its port bound at start-up
"""

from .routes import HttpApi
from .server import HttpFrontEnd

__all__ = ["HttpApi", "HttpFrontEnd"]
