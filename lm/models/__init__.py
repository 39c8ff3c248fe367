"""The networks and everything that turns weights into them: our transformer (``transformer``: the
decoder with its family switches, the Llama-style encoder, the classifier head, the KV cache), the
BERT and ModernBERT encoders, model folders (``folder``: build, save, load), the family table
(``family``, ``families``, ``decoders``, ``encoders``) and Hugging Face interop (``hf``), where a base
model came from (``source``) and a decoder folder ready to generate (``load``).

May import lm.config, lm.errors, lm.fileio and lm.text.tokenizer/chat; nothing of training,
generation, the pipeline's stages, serving or tracking.
"""
