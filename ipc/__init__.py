"""The contract between the frontend and the engine-core processes: messages, config, sockets,
start-up notifications (`messages.py`, `config.py`, `sockets.py`, `notify.py`).

`frontend` and `engine_core` never import each other; both import this package. `ipc.shared`
holds the code both run that is not the contract (the vocabulary reader, the structured output
compiler).
"""
