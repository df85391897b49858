# syntax=docker/dockerfile:1
# HTTP API image: `uvicorn oracle_mnist.api:app` on port 8000, CPU only, no training or test stack.
#
# Build (from the repository root):   docker build -f dockerfiles/api.Dockerfile -t oracle-mnist-api .
# The model is not baked in: mount the trained files read-only and name one of them.
#   docker run --rm -p 8000:8000 -v "$PWD/models:/models:ro" oracle-mnist-api
#   docker run --rm -p 8000:8000 -v "$PWD/models:/models:ro" \
#     -e ORACLE_MNIST_BACKEND=onnx -e ORACLE_MNIST_MODEL=/models/model.onnx oracle-mnist-api
# To ship a self-contained image instead, derive one: `FROM oracle-mnist-api` + `COPY model.pt /models/`.
# The pins below are the versions the test suite ran with (tests/test_dockerfiles.py checks they match).

FROM python:3.11.14-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# CPU wheels from PyTorch's own index: the default PyPI wheels pull in gigabytes of CUDA libraries.
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu \
        torch==2.14.1 torchvision==0.29.1 \
    && pip install --no-cache-dir \
        timm==1.0.31 numpy==2.4.6 pillow==12.3.0 pyyaml==6.0.3 tqdm==4.70.1 \
        fastapi==0.165.0 uvicorn==0.54.0 httptools==0.9.0 uvloop==0.23.0 \
        python-multipart==0.0.34 onnxruntime==1.32.0
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
CMD ["uvicorn", "oracle_mnist.api:app", "--host", "0.0.0.0", "--port", "8000"]
