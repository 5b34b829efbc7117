"""Ray job entry point for training.

    ray job submit --working-dir . -- python jobs/train.py --config configs/debug.yaml

Same arguments as `vaedist train`; joins the cluster in RAY_ADDRESS (set by `ray job submit`).
"""

import sys

from vaedist.cli import main

if __name__ == "__main__":
    main(["train", *sys.argv[1:]])
