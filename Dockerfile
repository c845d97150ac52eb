# The pipeline's daemons in one image: cdc-producer (the default command) and cdc-consumer, from
# the project's wheel. docker-compose.yml runs both under the `pipeline` profile:
#
#   docker compose --profile pipeline up -d --build
#
# Settings come from the environment as for the daemons on a host (USAGE.md lists them). The
# image serves /metrics, /live, /ready and /health on 0.0.0.0:9100 (METRICS_PORT); the health
# check asks /live there, or on PRODUCER_METRICS_PORT / CONSUMER_METRICS_PORT where those are set.

# Build the wheel (the package with the setup SQL, the Kafka pom and the Prometheus config in it).
FROM python:3.11-slim AS build
WORKDIR /src
COPY . .
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    METRICS_HOST=0.0.0.0 \
    METRICS_PORT=9100
COPY --from=build /wheels /tmp/wheels
RUN pip install --no-cache-dir /tmp/wheels/*.whl \
    && rm -rf /tmp/wheels \
    && groupadd --gid 10001 cdc \
    && useradd --no-log-init --create-home --uid 10001 --gid cdc cdc
USER 10001:10001
WORKDIR /home/cdc
EXPOSE 9100
# Healthy while a daemon's loop turns: /live answers 200 on one of the metrics ports set.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request\ndef live(port):\n    try:\n        with urllib.request.urlopen(f'http://127.0.0.1:{port}/live', timeout=3) as reply:\n            return reply.status == 200\n    except OSError:\n        return False\nnames = ('PRODUCER_METRICS_PORT', 'CONSUMER_METRICS_PORT', 'METRICS_PORT')\nports = {os.environ.get(name, '').strip() for name in names} - {'', '0'}\nsys.exit(0 if any(live(port) for port in ports) else 1)"]
CMD ["cdc-producer"]
