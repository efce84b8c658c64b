"""Run the mobilenetv2 CLI with torchvision's CIFAR-10 download replaced by a slow local one.

``download()`` waits two seconds, as a real download takes a while, then writes a tiny
CIFAR-10 in its on-disk format under ``--data-dir`` and notes this process's rank in the file
``DOWNLOAD_LOG``. The fixture files cannot have the official MD5 sums, so ``check_integrity``
only asks that each file exists. Under torchrun, a process that looked for the data before
process 0 had written it would find none.
"""

import os
import pickle
import sys
import time

import numpy as np
from torchvision.datasets import cifar

from mobilenetv2.cli import main

cifar.check_integrity = lambda path, md5=None: os.path.isfile(path)


def _download(self) -> None:
    if self._check_integrity():
        return
    with open(os.environ["DOWNLOAD_LOG"], "a") as log:
        log.write(os.environ.get("RANK", "0") + "\n")
    time.sleep(2)
    folder = os.path.join(self.root, self.base_folder)
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for filename, _ in self.train_list + self.test_list:
        entry = {"data": rng.integers(0, 256, (32, 3072), dtype=np.uint8),
                 "labels": rng.integers(0, 10, 32).tolist()}
        with open(os.path.join(folder, filename), "wb") as f:
            pickle.dump(entry, f)
    with open(os.path.join(folder, self.meta["filename"]), "wb") as f:
        pickle.dump({self.meta["key"]: [f"class{i}" for i in range(10)]}, f)


cifar.CIFAR10.download = _download

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
