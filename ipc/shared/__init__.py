"""Code both processes run that is not the contract: nothing here crosses the socket.

- `vocabulary.py`: every token's bytes, read from the artifact on disk (GGUF metadata or
  tokenizer.json). The engine builds grammar masks from it; the frontend reads a GGUF's
  tokenizer metadata and spells logprob tokens with the same rules.
- `structured_output.py`: a `StructuredOutputSpec` (a contract message) compiled to an
  llguidance grammar. The frontend checks that a spec compiles (a 400 before generation); the
  engine compiles it against the vocabulary.

They live under `ipc` because `frontend` and `engine_core` never import each other, and this
is the one package both import; `ipc/*.py` beside this folder is the contract itself.
"""
