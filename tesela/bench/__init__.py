"""Benchmarks behind `tesela bench`: one module per subcommand (prefill, decode, latency, serve,
serve_prefix). `python -m tesela.bench OUT.json IN.json...` merges per-column prefill JSONs."""
