# The tuneloop image: API, cpu worker and gpu worker all run it (`tuneloop api`,
# `tuneloop worker --queue cpu|gpu`, `tuneloop db upgrade`).
#
#   docker build -f infra/docker/tuneloop.Dockerfile -t tuneloop:0.1.0 .                  # API, cpu worker
#   docker build -f infra/docker/tuneloop.Dockerfile -t tuneloop-gpu:0.1.0 \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .             # gpu worker
#
# torch is installed first and alone, from the index named by TORCH_INDEX_URL: the CPU build for
# the API and cpu workers (a CUDA build would add gigabytes they never use), a CUDA build for gpu
# workers. The project's pin (torch==2.13.0) then finds it already satisfied.
FROM python:3.11-slim-bookworm

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    # Nothing is ever fetched from a model hub at run time: base models come from /models.
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1

RUN pip install --index-url "${TORCH_INDEX_URL}" torch==2.13.0

WORKDIR /src
COPY pyproject.toml README.md alembic.ini ./
COPY core core
COPY api api
COPY serving serving
COPY trainer trainer
COPY workflows workflows
COPY migrations migrations
COPY tuneloop tuneloop
RUN pip install . && useradd --uid 10001 --create-home tuneloop && mkdir /data \
    && chown tuneloop /data

USER 10001
WORKDIR /data
ENV TUNELOOP_DATA_DIR=/data
EXPOSE 8000
ENTRYPOINT ["tuneloop"]
CMD ["api", "--host", "0.0.0.0", "--port", "8000"]
