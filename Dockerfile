# One image for every relevans service; the command picks which one runs.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY protos ./protos
COPY relevans ./relevans
COPY services ./services
# The runtime only: the `local` extra (embedded servers, SMTP sink) stays on developers' machines.
RUN pip install --no-cache-dir -c constraints.txt .
USER nobody
ENTRYPOINT ["relevans"]
