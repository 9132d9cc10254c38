"""The engine-core process: loads the model and steps it in continuous batches.

`core.EngineCore` is the logic (add, abort, step); `process` wraps it with ZeroMQ sockets,
IO threads and the busy loop. It never sees text: only token ids cross its socket.
"""
