"""Ray job entry point for the encode batch job.

    ray job submit --working-dir . -- python jobs/encode.py --config configs/debug.yaml

Same arguments as `vaedist encode`; joins the cluster in RAY_ADDRESS (set by `ray job submit`).
"""

import sys

from vaedist.cli import main

if __name__ == "__main__":
    main(["encode", *sys.argv[1:]])
