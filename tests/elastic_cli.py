"""The mobilenetv2 CLI with one fault injected, for the torchrun restart test.

With ``MOBILENETV2_TEST_KILL_RANK=R``, the process of rank R SIGKILLs itself as soon as the
run's first checkpoint exists, on the job's first attempt only (``TORCHELASTIC_RESTART_COUNT``
is 0), as a worker lost to the OOM killer or a failed node would be. ``torchrun
--max-restarts`` then restarts the whole job, which must resume from that checkpoint. The hook
lives here so that the library carries no test code.
"""

import os
import signal
import sys
import threading
import time
from pathlib import Path

from mobilenetv2.cli import main


def _kill_after_the_first_checkpoint(out: Path) -> None:
    while not (out / "checkpoint.pt").exists():
        time.sleep(0.01)
    print(f"rank {os.environ['RANK']} kills itself", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    args = sys.argv[1:]
    if (os.environ.get("MOBILENETV2_TEST_KILL_RANK") == os.environ.get("RANK")
            and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"):
        out = Path(args[args.index("--out") + 1])
        threading.Thread(target=_kill_after_the_first_checkpoint, args=(out,), daemon=True).start()
    sys.exit(main(args))
