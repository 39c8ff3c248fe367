"""Serving a model over HTTP (``lmforge serve``).

- :mod:`lm.serving.engine`: one thread per model owns it and batches every request (continuous
  batching over the KV cache of :class:`lm.generation.sampling.GenerationBatch`; classifiers: one forward pass
  for the texts of every waiting request), streaming each request's text as it grows;
- :mod:`lm.serving.models`: loading what ``--model`` names (a folder or a registered model), the
  slot new requests read their model from, and the thread that follows a registry alias;
- :mod:`lm.serving.protocol`, :mod:`lm.serving.app`: OpenAI's request bodies, error shape and
  routes (FastAPI), the limits, the API key;
- :mod:`lm.serving.metrics`: what ``/metrics`` shows (prometheus-client);
- :mod:`lm.serving.server`: binding the port and running uvicorn.
"""
