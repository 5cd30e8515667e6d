# docker build -t claude-proxy . && docker run --rm -p 8080:8080 -e PROVIDER_BASE_URL=http://host.docker.internal:11434 -e PROXY_AUTH_TOKEN=change-me claude-proxy
FROM python:3.11-slim
RUN pip install --no-cache-dir "aiohttp>=3.9" && useradd --create-home --uid 10001 proxy
WORKDIR /app
COPY claude_proxy.py model_map.example.json ./
USER proxy
EXPOSE 8080
# Inside a container the proxy must listen on all interfaces; set PROXY_AUTH_TOKEN when the port is reachable by others.
ENV HOST=0.0.0.0 PORT=8080
CMD ["python", "claude_proxy.py"]
