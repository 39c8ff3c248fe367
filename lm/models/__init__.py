"""The networks and everything that turns weights into them: our transformer (``transformer``: the
decoder with its family switches, the Llama-style encoder, the classifier head), the BERT and
ModernBERT encoders, model folders (``folder``: build, save, load), the family table (``family``:
what a family is; ``family_table``: the table; ``decoders``, ``encoders``: its rows), Hugging Face
interop (``hf``), where a base model came from (``source``) and a decoder folder ready to generate
(``load_for_generation``).

May import the ground floor (lm.config, errors, fileio, generation.kv_cache) and lm.text; nothing of
training, the sampler, the pipeline's stages, serving or tracking.
"""
