"""The contract between the frontend and the engine-core processes: messages, config, sockets.

`frontend` and `engine_core` never import each other; both import this package.
"""
