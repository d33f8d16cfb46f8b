# moescope service image: `moescope worker`, `moescope beat` and `moescope serve` share it.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    MOESCOPE_STORE=/data

# The CPU build of torch first, so resolving the project never pulls a multi-GB CUDA build.
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch>=2.4"

WORKDIR /app
COPY pyproject.toml setup.py README.md ./
COPY moescope ./moescope
COPY probe ./probe
COPY kernels ./kernels
COPY collector ./collector
COPY analysis ./analysis
COPY dashboard ./dashboard
RUN pip install ".[postgres]"

RUN useradd --create-home --uid 10001 moescope && mkdir -p /data && chown moescope /data
USER moescope
VOLUME ["/data"]
EXPOSE 8050

CMD ["moescope", "serve", "--host", "0.0.0.0", "--port", "8050"]
