"""What a run shows and leaves behind: the progress display, metrics.csv, curves.png, TensorBoard.

Only rank 0 makes these; the other processes get no-op versions.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger("mobilenetv2")


class PrintableFormatter(logging.Formatter):
    """Log lines with what is not :func:`~mobilenetv2.runtime.printable` escaped, line breaks
    kept: the paths and class names they quote (a data folder's, a weights file's) may hold
    terminal escapes."""

    def format(self, record: logging.LogRecord) -> str:
        from .runtime import printable

        return "\n".join(map(printable, super().format(record).split("\n")))


@contextlib.contextmanager
def stderr_log_lines(logger: logging.Logger, *, replace: bool) -> Iterator[None]:
    """``logger``'s records of INFO and above on stderr, as bare escaped messages, for the
    length of the block; with ``replace``, its own handlers are set aside meanwhile. Its
    handlers (unclosed) and level are put back afterwards."""
    handlers, level = list(logger.handlers) if replace else [], logger.level
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(PrintableFormatter("%(message)s"))
    for old in handlers:
        logger.removeHandler(old)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()
        for old in handlers:
            logger.addHandler(old)
        logger.setLevel(level)


@contextlib.contextmanager
def log_to_stderr_unless_configured() -> Iterator[None]:
    """The run's INFO lines on stderr when nothing else would show them (a notebook, a script
    without ``logging.basicConfig``); a caller's own logging set-up is left to decide."""
    logger = logging.getLogger("mobilenetv2")
    with contextlib.nullcontext() if logger.hasHandlers() else stderr_log_lines(logger, replace=False):
        yield


def environment() -> dict[str, Any]:
    """The software a run or a bug report ran on: this package's version, torch's,
    torchvision's, Python's, the platform, and ``git_commit``, the commit of the checkout the
    package runs from (``-dirty`` added when tracked files differ from it; None when it is
    installed from a wheel or git is not there)."""
    import torch
    import torchvision

    from . import __version__

    return {"mobilenetv2": __version__, "torch": str(torch.__version__),  # (not TorchVersion)
            "torchvision": torchvision.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "git_commit": source_commit()}


def source_commit() -> str | None:
    """The git commit of this project's checkout the package runs from (``src/mobilenetv2``
    at the top of a git work tree), or None."""
    package = Path(__file__).resolve().parent
    # git obeys the repository's own config, and some of it runs commands (core.fsmonitor, on
    # any command that reads the index; a clean filter, on git status). A repository around
    # an installed copy (a .venv made inside a folder someone else prepared, with its .git)
    # could so run anything; the checkout whose src/ holds the code running here cannot do
    # more than that code already does. So git runs in the latter only.
    if package.parent.name != "src" or not (package.parent.parent / ".git").exists():
        return None

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(package), *args], capture_output=True,
                                  text=True, timeout=10, check=False)
        except (OSError, subprocess.SubprocessError):  # no git, or a hung file system
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    # Tracked, not merely inside a work tree: a virtual environment in a project's checkout
    # holds an installed copy that the project's commit says nothing about.
    if git("ls-files", "--error-unmatch", Path(__file__).name) is None:
        return None
    commit = git("rev-parse", "HEAD")
    if not commit:
        return None
    return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def version_text() -> str:
    """``mobilenetv2 --version``: the version on the first line, then what a bug report needs."""
    env = environment()
    lines = [f"mobilenetv2 {env['mobilenetv2']}",
             f"torch {env['torch']}, torchvision {env['torchvision']}, Python {env['python']}",
             f"platform {env['platform']}"]
    if env["git_commit"]:
        lines.append(f"git commit {env['git_commit']}")
    return "\n".join(lines)


METRIC_FIELDS = ["epoch", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "lr",
                 "images_per_second", "seconds", "wall_seconds"]
# Columns added since the first checkpoints: the rows of an older run's history lack them.
LATER_METRIC_FIELDS = ("wall_seconds",)


def animated_terminal() -> bool:
    """Whether stderr is a terminal that can redraw a bar in place.

    ``TERM=dumb`` (Emacs' shell, some screen-reader setups, CI runners that give a pty)
    cannot: each redraw would be one more line to read, so it gets the plain lines of a log.
    """
    return sys.stderr.isatty() and os.environ.get("TERM") != "dumb"


class Progress:
    """A tqdm bar on a terminal, plain log lines elsewhere (CI logs, files, pipes, TERM=dumb).

    ``due()`` says when a refresh is wanted (a few times a second on a terminal, every
    ``log_every`` steps otherwise), so callers read device values back only then.
    """

    def __init__(self, total: int, description: str, enabled: bool = True,
                 log_every: int = 50, initial: int = 0) -> None:
        self.enabled = enabled
        self.tty = enabled and animated_terminal()
        self.description, self.total, self.log_every = description, total, log_every
        self.calls = initial
        self.last_refresh = 0.0
        self.bar = None
        self.last_values: dict[str, float] = {}
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=description, leave=False,
                            dynamic_ncols=True, unit="batch")

    def due(self) -> bool:
        if not self.enabled:
            return False
        self.calls += 1
        if self.tty:
            if self.bar is not None:
                self.bar.update(1)
            now = time.monotonic()
            if now - self.last_refresh > 0.5:
                self.last_refresh = now
                return True
            return False
        return self.calls % self.log_every == 0

    def update(self, step: int, **values: float) -> None:
        self.last_values = values
        text = " ".join(_format(k, v) for k, v in values.items())
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=True)
        elif self.enabled:
            log.info("%s %d/%d %s", self.description, step, self.total, text)

    def write(self, line: str, stdout: bool = False) -> None:
        """Print a line on stdout, or log it on stderr as a warning, without breaking the bar:
        tqdm clears the bar, writes the line and draws the bar again below it."""
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout if stdout else sys.stderr)
        elif stdout:
            print(line)
        else:
            log.warning("%s", line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _format(key: str, value: float) -> str:
    if key == "lr":
        return f"lr {value:.3g}"
    if key == "img_s":
        return f"{value:,.0f} img/s"
    return f"{key} {value:.4f}" if key == "loss" else f"{key} {value:.2f}%"


class RunLog:
    """metrics.csv (rewritten whole each epoch), curves.png and TensorBoard events."""

    def __init__(self, out: Path, enabled: bool, tensorboard: bool | None = None) -> None:
        self.out, self.enabled = out, enabled
        self.writer = None
        if enabled and tensorboard is not False:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                if tensorboard:
                    log.warning("warning: tensorboard is not installed; pip install tensorboard")
            else:
                self.writer = SummaryWriter(str(out / "tensorboard"))

    def write(self, history: list[dict[str, Any]]) -> None:
        if not self.enabled:
            return
        from .weights import atomic_write

        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=METRIC_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)
        # These files are views of the history that checkpoint.pt keeps, rewritten whole each
        # epoch: one that cannot be replaced (on Windows, while Excel or a viewer has it open)
        # is said once an epoch, and the run goes on to write it again.
        try:
            # newline="": the csv module ends rows in "\r\n" itself, which a text file on
            # Windows would turn into "\r\r\n" (an empty row between every two).
            atomic_write(self.out / "metrics.csv", lambda tmp: Path(tmp).write_text(
                buffer.getvalue(), encoding="utf-8", newline=""))
            plot_curves(history, self.out / "curves.png")
        except OSError as e:
            from .distributed import shell_quote

            log.warning("warning: could not update %s: %s (another program may have it open); "
                        "training goes on, and the next epoch, or train --resume %s once the run "
                        "is over, writes it again", e.filename2 or e.filename, e.strerror or e,
                        shell_quote(self.out))
        if self.writer is not None and history:
            row = history[-1]
            for key in METRIC_FIELDS[1:]:
                if row.get(key) is not None:
                    self.writer.add_scalar(key.replace("_", "/", 1), row[key], row["epoch"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def plot_curves(history: list[dict[str, Any]], path: Path) -> Figure:
    """Draw loss and top-1 accuracy per epoch, train and validation, side by side, to ``path``
    (a PNG); returns the figure (a notebook shows it)."""
    # matplotlib's Figure, not pyplot: no global backend is chosen or changed (a notebook that
    # calls train() keeps its own), and nothing is left open between epochs.
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    from .weights import atomic_write

    epochs = [row["epoch"] for row in history]
    fig = Figure(figsize=(10, 4))
    ax_loss, ax_acc = fig.subplots(1, 2)
    for ax, key, title in ((ax_loss, "loss", "loss"), (ax_acc, "top1", "top-1 accuracy (%)")):
        ax.plot(epochs, [row[f"train_{key}"] for row in history], "o-", label="train")
        ax.plot(epochs, [row[f"val_{key}"] for row in history], "o-", label="val")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no epoch 1.5
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    return fig
