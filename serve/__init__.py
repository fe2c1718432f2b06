"""blockcache-serve: plans served over HTTP by Ray Serve (serve/README.md). Importing this package
imports no Ray: only `serve.app` and `serve.cli` do."""
