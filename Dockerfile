# histimport's container image: small (python slim, no compiler, no cache), runs as a user
# of its own, every version pinned (the base image's tag, docker/requirements.txt).
#
#   docker build -t histimport:0.1.0 .
#   docker run --rm -v "$PWD:/work" -e HISTIMPORT_USERNAME -e HISTIMPORT_PASSWORD \
#       histimport:0.1.0 load export.jsonl.gz --base-url https://api.example.com/communications
FROM python:3.12.8-slim-bookworm AS build
WORKDIR /src
COPY docker/requirements.txt ./requirements.txt
RUN pip install --no-cache-dir --no-compile --prefix=/install -r requirements.txt
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir --no-compile --no-deps --prefix=/install .

FROM python:3.12.8-slim-bookworm
COPY --from=build /install /usr/local
RUN python -m compileall -q /usr/local/lib/python3.12/site-packages \
    && useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin histimport \
    && mkdir /work && chown histimport /work
USER 10001
WORKDIR /work
ENTRYPOINT ["histimport"]
CMD ["--help"]
