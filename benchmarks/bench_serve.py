"""Serving benchmark script: the same as `tesela bench serve` (see tesela/bench/serve.py).

python benchmarks/bench_serve.py --model tiny --concurrency 1,8,32 --num-prompts 64
python benchmarks/bench_serve.py --url http://127.0.0.1:8000 --request-rate 4,16,inf
"""

import sys

from tesela.bench.serve import main

if __name__ == "__main__":
    sys.exit(main())
