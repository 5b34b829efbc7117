"""Ray job entry point for writing the WebDataset shards (to shared storage, e.g. s3://).

    ray job submit --working-dir . -- python jobs/prepare.py --config configs/debug.yaml

Same arguments as `vaedist data prepare`.
"""

import sys

from vaedist.cli import main

if __name__ == "__main__":
    main(["data", "prepare", *sys.argv[1:]])
