# The ingress as a container image (runtime proxies run on the model hosts themselves, next to dockerd:
# deploy/lukewarm-proxy.service).
#
#   scripts/wheelhouse.sh     # once, on a host that reaches PyPI: fills build/wheelhouse/
#   docker build -t lukewarm/ingress .
#   docker run -d -p 8080:8080 --read-only --cap-drop ALL --security-opt no-new-privileges --stop-timeout 45 \
#       -e LUKEWARM_REDIS_URL=redis://… -e LUKEWARM_ADMIN_TOKEN_FILE=… -e LUKEWARM_PROXY_SECRET_FILE=… lukewarm/ingress
#
# Offline: FROM the local base image (`lukewarm image build-base`), no registry, no index, no network in the
# build. The classic builder and BuildKit both build it (no BuildKit-only syntax).

ARG BASE_IMAGE=lukewarm/python:bookworm

# Stage 1: the dependencies. The base image has python3 but no pip; a wheel is a zip file, so each one is
# unpacked into one site directory (binary manylinux wheels too: scripts/wheelhouse.sh picked those that fit
# this image's CPython, CPU and glibc), then byte-compiled.
FROM ${BASE_IMAGE} AS deps
COPY build/wheelhouse/ /tmp/wheelhouse/
RUN set -eu; \
    site=/opt/lukewarm/site; \
    mkdir -p "$site"; \
    ls /tmp/wheelhouse/*.whl >/dev/null || { echo "build/wheelhouse/ holds no wheels: run scripts/wheelhouse.sh" >&2; exit 1; }; \
    for whl in /tmp/wheelhouse/*.whl; do python3 -m zipfile -e "$whl" "$site"; done; \
    for data in "$site"/*.data; do \
        [ -d "$data" ] || continue; \
        for lib in purelib platlib; do if [ -d "$data/$lib" ]; then cp -a "$data/$lib/." "$site/"; fi; done; \
        rm -rf "$data"; \
    done; \
    chmod -R a+rX,go-w "$site"; \
    python3 -m compileall -q -j 0 "$site"

# Stage 2: the code — only what `python -m ingress` imports (ingress/ and shared/; .dockerignore keeps
# everything else out of the build context), owned by root and read-only to the user it runs as.
FROM ${BASE_IMAGE}
ENV PYTHONPATH=/app:/opt/lukewarm/site \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONNOUSERSITE=1 \
    LUKEWARM_INGRESS_HOST=0.0.0.0 \
    LUKEWARM_INGRESS_PORT=8080
COPY --from=deps /opt/lukewarm/site /opt/lukewarm/site
WORKDIR /app
COPY ingress /app/ingress
COPY shared /app/shared
# Byte-compiled as root (the user cannot write here), and a failed import fails the build, not the start.
RUN python3 -m compileall -q /app \
    && python3 -c "import ingress.__main__, ingress.app"
# nobody:nogroup (numeric, so that runAsNonRoot-style checks can tell).
USER 65534:65534
EXPOSE 8080
# Liveness on the ingress's own port (HTTPS when LUKEWARM_TLS_CERT is set; set the port by environment,
# not by flag, for this to find it). No curl in the image: python3's http.client.
HEALTHCHECK --interval=10s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python3", "-c", "import http.client as c, os, ssl, sys; e = os.environ.get; h = e('LUKEWARM_INGRESS_HOST') or '0.0.0.0'; h = '127.0.0.1' if h in ('0.0.0.0', '::') else h; p = int(e('LUKEWARM_INGRESS_PORT') or 8080); k = c.HTTPSConnection(h, p, timeout=4, context=ssl._create_unverified_context()) if e('LUKEWARM_TLS_CERT') else c.HTTPConnection(h, p, timeout=4); k.request('GET', '/healthz'); sys.exit(k.getresponse().status != 200)"]
# SIGTERM drains (LUKEWARM_DRAIN_TIMEOUT_S, 30 s): give `docker stop` / the orchestrator longer than that
# (--stop-timeout 45, stop_grace_period: 45s, terminationGracePeriodSeconds: 45).
STOPSIGNAL SIGTERM
ENTRYPOINT ["python3", "-m", "ingress"]
