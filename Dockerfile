# syntax=docker/dockerfile:1
# referral-watch container image.
#   docker build -t referral-watch .
#   docker run -d --name referral-watch --env-file config/.env \
#     -v "$PWD/config/referral-watch.toml:/config/config.toml:ro" -v referral-watch-data:/data \
#     referral-watch
# Config: a TOML file mounted at /config/config.toml. Secrets: environment variables the config
# references as ${NAME}. State, lock and MSAL token cache: the /data volume.

# --- build: one wheel for referral-watch and one for each locked dependency -------------------
FROM python:3.12-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# The dependencies exactly as uv.lock has them (its runtime part, exported by `make lock`), each
# checked against its hash, as wheels, so the final stage installs offline and needs no compiler.
COPY requirements/runtime.txt ./requirements/runtime.txt
RUN pip wheel --require-hashes --wheel-dir /wheels -r requirements/runtime.txt
COPY pyproject.toml README.md ./
COPY referral_watch ./referral_watch
RUN pip wheel --no-deps --wheel-dir /wheels .

# --- runtime: the wheels installed into a clean interpreter, run by an unprivileged user --------
FROM python:3.12-slim

LABEL org.opencontainers.image.title="referral-watch" \
      org.opencontainers.image.description="Make sure no Microsoft Partner Center lead expires unanswered."

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    REFERRAL_WATCH_CONFIG=/config/config.toml \
    REFERRAL_WATCH_LISTEN=0.0.0.0:9464

# The wheels are bind-mounted from the build stage, so they never become a layer of this image.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels /wheels/referral_watch-*.whl \
    && referral-watch --version

# A fixed numeric uid/gid lets Kubernetes check runAsNonRoot. /var/lib/referral-watch (the
# default state directory, used by configs written for a host install) points at the volume.
RUN groupadd --system --gid 10001 referral-watch \
    && useradd --system --uid 10001 --gid referral-watch --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin referral-watch \
    && mkdir -p /data /config \
    && chown referral-watch:referral-watch /data \
    && chmod 0700 /data \
    && ln -s /data /var/lib/referral-watch

VOLUME ["/data"]
WORKDIR /data
USER 10001:10001

# /healthz, /livez, /metrics and the console, when the config has [server]. The example config's
# listen = "${REFERRAL_WATCH_LISTEN:-127.0.0.1:9464}" takes 0.0.0.0:9464 from the ENV above.
EXPOSE 9464

# Healthy while the last successful poll is younger than 3 x schedule.interval ("can it poll?":
# Docker only reports it; Kubernetes restarts on /livez, "is the process stuck?", instead).
HEALTHCHECK --interval=1m --timeout=15s --start-period=2m --retries=3 \
    CMD ["referral-watch", "status", "--check"]

ENTRYPOINT ["referral-watch"]
CMD ["run"]
