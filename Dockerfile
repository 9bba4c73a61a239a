# The ingress as a container (the runtime proxy runs on hosts, next to dockerd).
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /opt/lukewarm
COPY pyproject.toml ./
COPY ingress ./ingress
COPY runtime_proxy ./runtime_proxy
COPY shared ./shared
COPY loadtests ./loadtests
RUN pip install --no-cache-dir . \
    && useradd --system --no-create-home lukewarm
USER lukewarm
EXPOSE 8080
CMD ["python", "-m", "ingress"]
