"""The OpenAI-compatible HTTP server over the serving engine (`python -m af2_jax.serve`; docs/serving.md):
`protocol` (the API's requests, responses and errors), `clips` (audio parts read into windows), `runner` (the thread
driving the engine), `metrics` (Prometheus), `app` (the routes). Needs the `serve` extra."""

from af2_jax.server.app import ServerOptions, create_app
from af2_jax.server.runner import EngineRunner

__all__ = ["EngineRunner", "ServerOptions", "create_app"]
