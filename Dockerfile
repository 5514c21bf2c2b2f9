# One image for every fanout service in compose.yaml (worker, flower, demo vendor, producer).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY workers ./workers
COPY producers ./producers
COPY demo_vendor ./demo_vendor
RUN pip install --no-cache-dir '.[postgres]'
ENV FANOUT_HOME=/data
CMD ["fanout", "worker"]
