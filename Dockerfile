# cacheproxy as a container: a caching forward proxy for build systems.
#   docker build -t cacheproxy .
#   docker run -d --name cacheproxy -p 3128:3128 -v /srv/cacheproxy:/var/cache/cacheproxy \
#       --stop-timeout 30 cacheproxy
# Configuration: /etc/cacheproxy/cacheproxy.yaml (mount your own over it, read-only), or the
# variables its default reads (CACHEPROXY_LISTEN, CACHEPROXY_MAX_SIZE, CACHEPROXY_LOG_LEVEL, …).
ARG PYTHON_IMAGE=python:3.11-slim

# -- build: the package and its dependencies into a virtual environment ---------------------------
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml setup.cfg README.md ./
COPY cacheproxy ./cacheproxy
RUN python -m venv /opt/cacheproxy \
 && /opt/cacheproxy/bin/pip install --no-cache-dir --disable-pip-version-check --no-compile . \
 && /opt/cacheproxy/bin/python -m compileall -q /opt/cacheproxy/lib \
 && /opt/cacheproxy/bin/pip uninstall -q -y pip

# -- runtime: the environment, a user, a volume -----------------------------------------------------
FROM ${PYTHON_IMAGE}
ARG VERSION=dev
LABEL org.opencontainers.image.title="cacheproxy" \
      org.opencontainers.image.description="A caching forward proxy for build systems (HTTP, HTTPS, FTP origins; local disk or OBS)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="MulanPSL-2.0" \
      org.opencontainers.image.documentation="README.md, section Deployment"
RUN groupadd --gid 10001 cacheproxy \
 && useradd --uid 10001 --gid cacheproxy --home-dir /var/cache/cacheproxy --no-create-home \
        --shell /usr/sbin/nologin cacheproxy \
 && install -d -o cacheproxy -g cacheproxy -m 0750 /var/cache/cacheproxy
COPY --from=build /opt/cacheproxy /opt/cacheproxy
COPY conf/container.yaml /etc/cacheproxy/cacheproxy.yaml
ENV PATH=/opt/cacheproxy/bin:$PATH \
    CACHEPROXY_CONFIG=/etc/cacheproxy/cacheproxy.yaml \
    PYTHONDONTWRITEBYTECODE=1
USER cacheproxy
WORKDIR /var/cache/cacheproxy
VOLUME ["/var/cache/cacheproxy"]
EXPOSE 3128
# SIGTERM: stop accepting, let running transfers finish for --grace, exit 0. Give the container
# more than that before it is killed: docker run --stop-timeout 30 / compose stop_grace_period: 30s.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=6s --start-period=60s --retries=3 \
    CMD ["python", "-m", "cacheproxy.ops.readycheck"]
ENTRYPOINT ["cacheproxy"]
CMD ["serve", "--grace", "25s"]
