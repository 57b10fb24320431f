# WattProxy on an NVIDIA GPU. The base is PyTorch's CUDA runtime image (Python 3.11, torch built for
# CUDA 12.8 with cuDNN 9), whose torch already satisfies the project's bound, so pip adds only the rest.
#   docker build -t wattproxy .
#   docker run --gpus all -p 8080:8080 wattproxy        (or deploy/docker-compose.yml, with Prometheus and Grafana)
# Serves the embedded tiny models by default; mount a TOML file and set WATTPROXY_CONFIG for real ones.
ARG BASE_IMAGE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

# Caches (built and downloaded models, Hugging Face hub) and data (the ledger) live under the service
# user's home, one volume: /var/lib/wattproxy. platformdirs follows the XDG variables.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/var/lib/wattproxy \
    XDG_CACHE_HOME=/var/lib/wattproxy/cache \
    XDG_DATA_HOME=/var/lib/wattproxy/data \
    HF_HOME=/var/lib/wattproxy/cache/huggingface

RUN groupadd --system --gid 10001 wattproxy \
    && useradd --system --uid 10001 --gid wattproxy --home-dir /var/lib/wattproxy \
        --no-create-home --shell /usr/sbin/nologin wattproxy \
    && mkdir -p /var/lib/wattproxy/cache /var/lib/wattproxy/data \
    && chown -R wattproxy:wattproxy /var/lib/wattproxy

WORKDIR /opt/wattproxy
COPY pyproject.toml README.md ./
COPY proxy/ proxy/
COPY backends/ backends/
# A non-editable install of this source tree; the import check fails the build if torch lost its CUDA build.
RUN pip install --no-cache-dir . \
    && python -c "import torch, proxy, backends; assert torch.version.cuda, 'torch without CUDA'"

USER 10001:10001
EXPOSE 8080

# Ready once every configured model is loaded (GET /readyz answers 503 before, and while draining).
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/readyz', timeout=4).status != 200)"]

# SIGTERM drains: new requests get 503 while in-flight ones finish (drain_timeout_s, 30 s by default).
STOPSIGNAL SIGTERM
ENTRYPOINT ["wattproxy"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8080"]
