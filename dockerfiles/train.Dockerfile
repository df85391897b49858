# syntax=docker/dockerfile:1
# Pipeline image: the environment to run `dvc repro` / `dvc exp run` on CPU. It holds the dependencies only;
# the repository (code, params, dvc.lock, data cache) is mounted at /repo, so DVC versions exactly what is
# there and outputs (models/model.pt, models/model.onnx, metrics, plots) land in the mounted checkout.
#
# Build (from the repository root):   docker build -f dockerfiles/train.Dockerfile -t oracle-mnist-train .
# Run as your own user so the outputs belong to you:
#   docker run --rm --user "$(id -u):$(id -g)" -v "$PWD:/repo" oracle-mnist-train dvc repro
# With data.source at a local folder outside the checkout, mount that too (read-only) at the same path.
# The pins are requirements.txt's; torch comes from PyTorch's CPU index (the default wheels carry CUDA).

FROM python:3.11.14-slim-bookworm
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# git: DVC needs the repository's SCM for dvc.lock, experiments and `dvc plots diff`. Debian drops old
# package versions from its mirrors, so an exact apt pin would break the build; the base image tag pins it.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/*
COPY requirements.txt /tmp/requirements.txt
# `-e .` is dropped: the code is imported from the mounted checkout (PYTHONPATH), not from the image.
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu \
        torch==2.14.1 torchvision==0.29.1 \
    && grep -v '^-e ' /tmp/requirements.txt > /tmp/requirements-env.txt \
    && pip install --no-cache-dir -r /tmp/requirements-env.txt \
    && rm /tmp/requirements.txt /tmp/requirements-env.txt
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin trainer \
    && git config --system --add safe.directory /repo
ENV PYTHONPATH=/repo/src \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp/home \
    DVC_NO_ANALYTICS=1
USER 10001
WORKDIR /repo
CMD ["dvc", "repro"]
