# The HPO server (and `hpo migrate`, `hpo scheduler`): FastAPI + Optuna, no torch.
# Build from the repository root:  docker build -f docker/server.Dockerfile -t vae-hpo-server .
# Secrets (database password, API tokens) are never baked in: they come at run time from the
# environment or from files (HPO_DATABASE_PASSWORD_FILE, HPO_TOKENS_FILE; see the README).

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Only the server package: the server image carries neither torch nor the trainers.
COPY pyproject.toml README.md ./
COPY hpo_service ./hpo_service
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install ".[server]" \
    && /opt/venv/bin/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)"

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 hpo \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/hpo hpo
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HPO_HOST=0.0.0.0 \
    HPO_PORT=8000 \
    HPO_LOG_FORMAT=json
USER 10001:10001
WORKDIR /home/hpo
EXPOSE 8000
# The process answers (compose checks /readyz, which also needs the database and its schema).
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
CMD ["hpo", "serve"]
