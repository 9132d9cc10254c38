"""The engine-core process: loads the model and steps it in continuous batches.

`core.EngineCore` is the logic (add, abort, step); `process` wraps it with ZeroMQ sockets,
IO threads and the busy loop. It never sees text: only token ids cross its socket.
"""

import os

# OpenBLAS's idle threads spin for 2^28 cycles (a tenth of a second) after each call before they
# sleep; between a step's BLAS calls run the kernels' own OpenMP threads, and the two pools then
# fight over the same cores: SmolLM2 at batch 64 on two threads, 87-109 tok/s with the kernels'
# threads spinning briefly (kernels/__init__.py) against 133-167 with OpenBLAS's sleeping after
# 2^4 cycles (one thread: 152). Read when numpy loads OpenBLAS, so set before numpy is imported.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
