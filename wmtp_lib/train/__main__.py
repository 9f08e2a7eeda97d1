"""``python -m wmtp_lib.train --config runs/<run>/config.yaml``: the training entry (`wmtp_lib.train.loop`),
what ``accelerate launch`` runs on every process."""

import sys

from wmtp_lib import freeze_heap_at_exit
from wmtp_lib.train.loop import main

if __name__ == "__main__":
    code = main()
    freeze_heap_at_exit()  # everything training writes is closed by now; each rank exits ~2 s sooner
    sys.exit(code)
