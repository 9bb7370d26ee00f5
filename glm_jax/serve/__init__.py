"""`glm-jax serve`: an OpenAI-compatible HTTP server (chat completions, completions) over the decode engine.

Needs the `serve` extra (fastapi, uvicorn). See `glm_jax.serve.app.create_app`.
"""

from glm_jax.serve.app import create_app

__all__ = ["create_app"]
