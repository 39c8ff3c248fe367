"""Training: the training child (``child``: ``python -m lm.training.child``), its Lightning modules
(``modules``), the pretraining data (``pretrain_data``), checkpoint files (``checkpoint``), and the
pipeline's side of it (``launch``: the command line and the files the child leaves).

May import the ground floor, lm.text, lm.models and lm.finetune (by name); nothing of the pipeline's
stages, serving or tracking. ``launch`` imports nothing of training, so a stage can read a result.
"""
