"""`glm-jax serve`'s start-up: the listening socket, the model and its engine, logging, signals and
uvicorn; and, in a multi-host run, `jax.distributed` and the processes that only follow process 0."""

from __future__ import annotations

import logging
import signal
import socket
import sys
from collections.abc import Callable

import uvicorn

from glm_jax.options import MAX_BATCH, MAX_QUEUE, SERVE_MAX_MODEL_LEN, SERVE_STEPS_PER_CALL, SHUTDOWN_TIMEOUT
from glm_jax.serve.app import create_app


def join_distributed(*, coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None, mesh=None) -> int:
    """Joins a multi-process JAX run: at `coordinator` (HOST:PORT of process 0) with the other two,
    or, with no coordinator, as found from the environment (TPU pods, clusters); this process's index.
    The model's `mesh` must span the devices of every process."""
    import jax

    if coordinator and (num_processes is None or process_id is None):
        raise ValueError("--coordinator needs --num-processes and --process-id")
    if mesh is None:
        raise ValueError("several processes need a --mesh over all their devices")
    if jax.config.jax_platforms == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator:
        jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
    else:
        jax.distributed.initialize()
    return jax.process_index()


def serve_length(model, max_model_len: int | None) -> int:
    """Tokens per request: `max_model_len`, by default the model's context, at most SERVE_MAX_MODEL_LEN."""
    context = model.config.max_seq_len
    max_model_len = max_model_len or min(context, SERVE_MAX_MODEL_LEN)
    if max_model_len > context:
        raise ValueError(f"--max-model-len {max_model_len} exceeds the model's context length {context}")
    return max_model_len


def follow(load: Callable, *, max_batch: int = MAX_BATCH, max_model_len: int | None = None,
           steps_per_call: int = SERVE_STEPS_PER_CALL) -> int:
    """A process other than 0 of a multi-host server: runs the engine rounds process 0 plans until
    it stops; serves nothing. `load()` returns the model."""
    model = load()
    engine = model.engine(max_batch=max_batch, max_model_len=serve_length(model, max_model_len),
                          steps_per_call=steps_per_call)
    signal.signal(signal.SIGTERM, lambda signum, frame: None)   # process 0 decides when to stop
    engine.warm_up()
    engine.follow()
    return 0


def serve(load: Callable, *, host: str = "127.0.0.1", port: int = 8000, served_model_name: str | None = None,
          max_batch: int = MAX_BATCH, max_model_len: int | None = None, max_queue: int = MAX_QUEUE,
          steps_per_call: int = SERVE_STEPS_PER_CALL, shutdown_timeout: float = SHUTDOWN_TIMEOUT) -> int:
    """Serves the model `load()` returns on host:port until SIGTERM or Ctrl-C, then lets the requests
    in flight finish (up to `shutdown_timeout` seconds). The port is taken before the model loads,
    so a taken port fails at once; every program is compiled before the first request."""
    try:
        sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as e:
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    model = load()
    max_model_len = serve_length(model, max_model_len)
    engine = model.engine(max_batch=max_batch, max_model_len=max_model_len, steps_per_call=steps_per_call,
                          max_queue=max_queue)
    engine.warm_up()
    name = served_model_name or model.path.resolve().name
    app = create_app(model, engine, served_model_name=name, max_model_len=max_model_len)
    log = logging.getLogger("glm_jax.serve")
    log.setLevel(logging.INFO)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(handler)
    log.propagate = False
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                           timeout_graceful_shutdown=shutdown_timeout))
    # uvicorn handles SIGTERM (stops accepting, waits for the requests in flight), then raises it
    # again once it has shut down; this handler takes that second delivery, so the engine drains
    # and the command exits 0.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    bound_host, bound_port = sock.getsockname()[:2]
    engine.start()
    print(f"glm-jax serve: {name} on http://{bound_host}:{bound_port} (max_batch {max_batch}, "
          f"max_model_len {max_model_len})", file=sys.stderr, flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        engine.shutdown(timeout=shutdown_timeout)
    return 0
