"""Tracking and the registry, every MLflow call of lmforge: runs and metrics (``runs``), the model
registry and promotion (``registry``, ``pyfunc_model``: the models-from-code entry), the pipeline
report (``report``) and the figures the stages log (``figures``).

May import the ground floor, lm.pipeline.stage, lm.models.folder and lm.finetune (by name); never
training, generation or serving code (the training child reads only its settings).
"""
