"""Ray job entry point for the whole pipeline (shards -> train -> encode -> summary -> report).

    ray job submit --working-dir . -- python jobs/pipeline.py --config configs/debug.yaml

Same arguments as `vaedist run`; joins the cluster in RAY_ADDRESS (set by `ray job submit`).
"""

import sys

from vaedist.cli import main

if __name__ == "__main__":
    main(["run", *sys.argv[1:]])
