"""Commands: the `edgert` CLI, `info`, `bench` (offline and against a server), `eval`."""
