# syntax=docker/dockerfile:1
# HTTP API image: `uvicorn oracle_mnist.api:app` on port 8000 with the project's HTTP protocol (bounds on request
# heads and open connections, oracle_mnist/server.py), CPU only, no training or test stack.
#
# Build (from the repository root):   docker build -f dockerfiles/api.Dockerfile -t oracle-mnist-api .
# The model is not baked in: mount the trained files read-only and name one of them.
#   docker run --rm -p 8000:8000 -v "$PWD/models:/models:ro" oracle-mnist-api
#   docker run --rm -p 8000:8000 -v "$PWD/models:/models:ro" \
#     -e ORACLE_MNIST_BACKEND=onnx -e ORACLE_MNIST_MODEL=/models/model.onnx oracle-mnist-api
# To ship a self-contained image instead, derive one: `FROM oracle-mnist-api` + `COPY model.pt /models/`.
# Versions and hashes come from the one lock file (requirements.txt): only the part serving needs
# (dockerfiles/lock_subset.py follows the lock's own dependency annotations). torch is the lock's PyPI build,
# which runs on CPU hosts and on NVIDIA GPUs alike.

FROM python:3.11.14-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY requirements.txt dockerfiles/lock_subset.py /tmp/lock/
RUN python /tmp/lock/lock_subset.py /tmp/lock/requirements.txt \
        torch torchvision timm numpy pillow pyyaml pydantic tqdm \
        fastapi fastapi-offline uvicorn httptools uvloop python-multipart onnxruntime \
        > /tmp/lock/serving.txt \
    && pip install --no-cache-dir --require-hashes --no-deps -r /tmp/lock/serving.txt \
    && rm -r /tmp/lock
COPY pyproject.toml README.md /build/
COPY src /build/src
RUN pip install --no-cache-dir --no-deps /build

FROM python:3.11.14-slim-bookworm
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin app
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    ORACLE_MNIST_MODEL=/models/model.pt \
    ORACLE_MNIST_BACKEND=torch
USER 10001
WORKDIR /home/app
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
# 0.0.0.0 inside the container only: the port is published to the host by `docker run -p`.
# --http: plain uvicorn waits forever for a request head and parses one of any size (`oracle-mnist serve` is the
# same command; this form keeps uvicorn's own options at hand).
CMD ["uvicorn", "oracle_mnist.api:app", "--http", "oracle_mnist.server:HttpToolsProtocol", "--host", "0.0.0.0", "--port", "8000"]
