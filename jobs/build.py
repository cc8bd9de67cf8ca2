"""The whole build as a Ray job; takes the options of `imoe build`.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python -m jobs.build --config my.yaml --store /shared/store
"""

import sys

from imoe_ray.cli import main

if __name__ == "__main__":
    sys.argv = ["imoe", "build", *sys.argv[1:]]
    main()
