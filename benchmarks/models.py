"""polymodal vs transformers on identical converted weights; the same as ``polymodal bench models [options]``.

python benchmarks/models.py                       # ViT-B/16, CLIP ViT-B/16 towers, ViT-S/16 train step, ImageGPT-S
python benchmarks/models.py --quick               # tiny configs, seconds
python benchmarks/models.py --models vit-b16 --batches 1,32
python benchmarks/models.py --help
"""

import sys

from bench import main  # benchmarks/bench.py, beside this script

if __name__ == "__main__":
    sys.exit(main(["models", *sys.argv[1:]]))
