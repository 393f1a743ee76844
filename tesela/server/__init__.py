"""The OpenAI-compatible HTTP server (`tesela serve`).

app.py           entry points: create_process_app (default), create_app (engine in process),
                 add_serve_arguments / run_serve, ServerThread
routes.py        the Starlette routes, errors, SSE and disconnect handling
engine_core.py   the engine process: its busy loop, one message per step
core_client.py   the HTTP process's side of it: admission, per-request queues, death detection
async_engine.py  --engine-in-process: one thread owns the LLMEngine; RequestGroup
protocol.py      OpenAI request validation -> SamplingParams; logprob formats
serving.py       engine outputs -> JSON responses and SSE chunks
metrics.py       Prometheus text-format metrics
"""
