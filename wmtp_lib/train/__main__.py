"""``python -m wmtp_lib.train --config runs/<run>/config.yaml``: the training entry (`wmtp_lib.train.loop`),
what ``accelerate launch`` runs on every process."""

import sys

from wmtp_lib.train.loop import main

if __name__ == "__main__":
    sys.exit(main())
