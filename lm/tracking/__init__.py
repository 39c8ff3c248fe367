"""Tracking and the registry, every MLflow call of lmforge: the client of a tracking URI and its
errors (``client``), runs and metrics (``runs``), the training's metric sender (``metric_sender``),
the model registry and promotion (``registry``, ``pyfunc_model``: the models-from-code entry), the
pipeline run's summary on its parent run (``summary``, rendered by ``report``), the comparison of
pipeline runs (``report``) and the figures the stages log (``figures``).

May import the ground floor, lm.pipeline.stage, lm.models.folder and lm.finetune (by name); never
training, generation or serving code (the training child reads only its settings).
"""
