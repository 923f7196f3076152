# adapterd on a GPU: one base model, many adapters, over gRPC.
#
#   docker build -t adapterd .
#   docker run --gpus all -p 50051:50051 -p 9400:9400 \
#     -v /models/Llama-2-7b-hf:/models/base:ro -v adapters:/srv/adapters -v runs:/srv/runs adapterd
#
# The install is the README's GPU set-up (`pip install '.[server]'` into an environment with a CUDA torch),
# with every version pinned by deploy/constraints-gpu.txt.
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1 \
    PATH=/opt/adapterd/bin:$PATH
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml README.md ./
COPY adapterd ./adapterd
COPY proto ./proto
COPY server ./server
COPY trainer ./trainer
COPY clients ./clients
COPY deploy/constraints-gpu.txt ./deploy/constraints-gpu.txt
RUN python3 -m venv /opt/adapterd \
 && pip install --constraint deploy/constraints-gpu.txt torch '.[server]' \
 && python3 -c "import adapterd.server.app, adapterd.trainer.loop"

RUN useradd --system --create-home --uid 10001 adapterd \
 && mkdir -p /srv/adapters /srv/runs /models \
 && chown adapterd:adapterd /srv/adapters /srv/runs
USER adapterd
VOLUME ["/srv/adapters", "/srv/runs"]
EXPOSE 50051 9400

HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
  CMD ["adapterd", "health", "--target", "127.0.0.1:50051"]

ENTRYPOINT ["adapterd", "serve"]
CMD ["--base", "/models/base", "--adapters", "/srv/adapters", "--runs", "/srv/runs", \
     "--host", "0.0.0.0", "--port", "50051", "--metrics-port", "9400"]
