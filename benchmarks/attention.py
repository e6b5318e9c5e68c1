"""Attention kernels benchmark; the same as ``polymodal bench attention [options]``.

python benchmarks/attention.py                    # CPU: the small grid (minutes); CUDA: the full grid
python benchmarks/attention.py --quick            # smoke run, seconds
python benchmarks/attention.py --compare benchmarks/results/attention-cpu-amd-epyc.json
python benchmarks/attention.py --help
"""

import sys

from bench import main  # benchmarks/bench.py, beside this script

if __name__ == "__main__":
    sys.exit(main(["attention", *sys.argv[1:]]))
