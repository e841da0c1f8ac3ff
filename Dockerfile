# Tuneyard API and worker image. The same image runs `tuneyard api` and `tuneyard worker`.
# TORCH_INDEX picks the torch build: CUDA wheels for GPU workers, CPU wheels for the API.
FROM python:3.11-slim-bookworm

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TUNEYARD_DATA_DIR=/data \
    TUNEYARD_STORAGE_DIR=/data/storage \
    TUNEYARD_BASE_MODELS_DIR=/data/models

RUN useradd --create-home --uid 1000 tuneyard
WORKDIR /srv/tuneyard

# torch first, from the chosen index, so the project's install keeps that build.
RUN pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"

COPY pyproject.toml README.md ./
COPY app ./app
COPY worker ./worker
COPY trainer_core ./trainer_core
COPY migrations ./migrations
COPY tuneyard_cli ./tuneyard_cli
RUN pip install .

USER tuneyard
EXPOSE 8000
CMD ["tuneyard", "api", "--host", "0.0.0.0", "--port", "8000"]
