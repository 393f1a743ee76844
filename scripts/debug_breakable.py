"""Bisect a breakable replay failure: capture the ladder, replay sizes, check vs eager."""

import os, sys, traceback
import torch
from tesela.engine.llm_engine import make_engine_config
from tesela.executor.model_runner import ModelRunner
from tesela.executor.forward_batch import ForwardBatch
from tesela.executor.piecewise.runner import PiecewiseRunner
from tesela.config import GraphConfig, default_capture_sizes

max_n = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
config, path = make_engine_config(
    "qwen3-0.6b", disable_cuda_graph=True, num_kv_tokens=max_n + 64, max_num_batched_tokens=max_n
)
runner = ModelRunner(config, path)


def batch(n):
    g = torch.Generator().manual_seed(n)
    return ForwardBatch.build(
        token_ids=[torch.randint(0, 151936, (n,), generator=g).tolist()],
        prefix_lens=[0],
        block_tables=[list(range(1, n // 16 + 2))],
        block_size=16,
        device="cuda",
    )


pw = PiecewiseRunner(
    runner, GraphConfig(capture_sizes=default_capture_sizes(max_n), max_capture_tokens=max_n)
)
rep = pw.capture()
print(os.environ.get("TESELA_ALIAS"), rep.summary(), flush=True)
for n in [16, 64, 256, 1024, max_n, 5, 300]:
    try:
        exp = pw.run_eager_padded(batch(n))
        got = pw.run(batch(n)).clone()
        torch.cuda.synchronize()
        print(
            n,
            "equal"
            if torch.equal(got, exp)
            else f"DIFF {(got.float() - exp.float()).abs().max().item()}",
            flush=True,
        )
    except Exception as e:
        print(n, "ERROR", type(e).__name__, str(e)[:200])
        traceback.print_exc(limit=6)
        break
