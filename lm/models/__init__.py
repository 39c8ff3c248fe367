"""Model families: how a Hugging Face checkpoint of each family we support becomes one of our
networks (its config.json read into ``ModelArgs`` switches, its weight names mapped), and back.

May import ``lm.model``, ``lm.bert`` and the small shared modules (errors, fileio); nothing above
them (no training, generation, pipeline or serving code).
"""
