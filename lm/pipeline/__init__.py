"""The pipeline's stages: what a stage is and how its outputs reach disk (``stage``), where they live
and their cache keys (``workspace``), and the work of the stages that are not data or training:
``base_model``, ``evaluate``, ``export``, ``retrain`` (what a retrain is compared by).

``stage`` is on the ground floor (every stage's function imports it; it imports only lm.config,
errors and fileio); the other modules may import anything below the stage table (lm/stages.py).
"""
