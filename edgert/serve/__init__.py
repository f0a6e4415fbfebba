"""The service: the HTTP app over a Unix socket, its sockets and lifecycle, the OpenAI protocol
in and out, Prometheus metrics and systemd."""
