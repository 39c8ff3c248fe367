"""Serving a model over HTTP (``lmforge serve``): the engine that batches every request (``engine``,
in its own process: ``process``), the model served and the alias it follows (``served_model``),
OpenAI's bodies and routes with their limits (``protocol``, ``app``), ``/metrics`` (``metrics``), the
port and uvicorn (``server``).

May import everything below the stage table (models, generation, finetune's predictors, tracking's
registry lookups); nothing imports serving but the CLI.
"""
