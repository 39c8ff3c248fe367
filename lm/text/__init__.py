"""Text as tokens: the tokenizer primitives (``tokenizer``: train, load, special ids), chat templates
(``chat``), the token files (``shards``) and the tokenize stage that writes them (``tokenize_stage``).

May import the ground floor (lm.config, errors, fileio, memory, pipeline.stage), lm.data and
lm.models.source (what a base model brings); nothing of networks, training, generation, serving or tracking.
"""
