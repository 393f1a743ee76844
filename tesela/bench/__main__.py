"""`python -m tesela.bench OUT.json IN.json...`: merge prefill JSONs (one per column) into one,
write it with its plot, and print the table (scripts/gpu_check.sh runs a column per process)."""

import sys

from tesela.bench.prefill import main_merge

if __name__ == "__main__":
    sys.exit(main_merge(sys.argv[1:]))
