# syntax=docker/dockerfile:1
# Pipeline image: the environment to run `dvc repro` / `dvc exp run` on CPU. It holds the dependencies only;
# the repository (code, params, dvc.lock, data cache) is mounted at /repo, so DVC versions exactly what is
# there and outputs (models/model.pt, models/model.onnx, metrics, plots) land in the mounted checkout.
#
# Build (from the repository root):   docker build -f dockerfiles/train.Dockerfile -t oracle-mnist-train .
# Run as your own user so the outputs belong to you:
#   docker run --rm --user "$(id -u):$(id -g)" -v "$PWD:/repo" oracle-mnist-train dvc repro
# With data.source at a local folder outside the checkout, mount that too (read-only) at the same path.
# Everything comes from the one lock file (requirements.txt), hashes checked; its torch is PyPI's build, so
# the same image trains on CPU hosts and, with the NVIDIA container toolkit, on GPUs (`docker run --gpus all`).

FROM python:3.11.14-slim-bookworm
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# git: DVC needs the repository's SCM for dvc.lock, experiments and `dvc plots diff`. Debian drops old
# package versions from its mirrors, so an exact apt pin would break the build; the base image tag pins it.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/*
COPY requirements.txt /tmp/requirements.txt
# The package itself is not installed: the code is imported from the mounted checkout (PYTHONPATH).
RUN pip install --no-cache-dir --require-hashes --no-deps -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin trainer \
    && git config --system --add safe.directory /repo
ENV PYTHONPATH=/repo/src \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp/home \
    DVC_NO_ANALYTICS=1
USER 10001
WORKDIR /repo
CMD ["dvc", "repro"]
