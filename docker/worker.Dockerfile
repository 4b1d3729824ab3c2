# A GPU worker: pulls trials from the server over HTTP and trains them; no database access.
# Build from the repository root:  docker build -f docker/worker.Dockerfile -t vae-hpo-worker .
# The base image's CUDA build of torch must be the release the `trainer` extra pins
# (torch==2.13.0): the install below is constrained to the torch already in the image, so a
# mismatch fails the build instead of downloading another multi-GB torch.

ARG PYTORCH_IMAGE=pytorch/pytorch:2.13.0-cuda13.0-cudnn9-runtime

FROM ${PYTORCH_IMAGE}
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY hpo_service ./hpo_service
COPY trainers ./trainers
RUN python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > /tmp/torch-constraint.txt \
    && pip install --constraint /tmp/torch-constraint.txt ".[trainer]" \
    && rm /tmp/torch-constraint.txt \
    && groupadd --system --gid 10001 hpo \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/hpo hpo
ENV PYTHONUNBUFFERED=1 \
    HPO_LOG_FORMAT=json \
    HPO_CACHE_DIR=/home/hpo/.cache/vae-hpo
USER 10001:10001
WORKDIR /home/hpo
# HPO_SERVER_URL, HPO_WORKER_TOKEN or HPO_WORKER_TOKEN_FILE, HPO_WORKER_DEVICE come at run time.
# SIGTERM: the worker finishes its epoch and hands the trial back for a retry.
STOPSIGNAL SIGTERM
ENTRYPOINT ["hpo-worker"]
