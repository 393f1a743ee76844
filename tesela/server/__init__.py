"""The OpenAI-compatible HTTP server (`tesela serve`).

app.py           entry points: create_app, add_serve_arguments / run_serve, ServerThread
routes.py        the Starlette routes, errors, SSE and disconnect handling
async_engine.py  one thread owns the LLMEngine; bounded admission; per-request queues
protocol.py      OpenAI request validation -> SamplingParams; logprob formats
serving.py       engine outputs -> JSON responses and SSE chunks
metrics.py       Prometheus text-format metrics
"""
