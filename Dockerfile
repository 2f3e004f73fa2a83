# fanout as a one-shot job: slim, non-root, pinned dependencies. Run records also go to
# S3 next to the migrations; the local copy lives in /tmp, writable by the non-root user.
# The interpreter requirements.lock was resolved on.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FANOUT_RUNS_DIR=/tmp/fanout-runs
WORKDIR /app
COPY requirements.lock pyproject.toml README.md ./
COPY fanout ./fanout
RUN pip install -c requirements.lock . && useradd --system --uid 10001 fanout
COPY migrations ./migrations
COPY environments ./environments
USER fanout
ENTRYPOINT ["fanout"]
CMD ["--help"]
