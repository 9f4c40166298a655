"""The error of one task's data (a data file, a row, an image) that the evaluation cannot use.

``muco eval`` records it as that task's failure (``summary.json``: ``failed``) and goes on with the next task.
Its message is one line that names the task, the row (0-based, as in ``<task>.pred.jsonl``), the column and the
file, e.g. ``task CIRR, row 17 (tgt_img_path[3]), image /data/mmeb/CIRR/x.png: image file not found``.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError


class EvalDataError(ValueError):
    """One task's data cannot be used. ``reason`` is the short cause; ``str()`` is the whole one-line message."""

    def __init__(self, reason: str, *, task: str | None = None, row: int | None = None, column: str | None = None,
                 file: str | Path | None = None, what: str = "") -> None:
        self.reason = " ".join(str(reason).split())  # one line, whatever the cause's text held
        self.task, self.row, self.column = task, row, column
        self.file = None if file is None else str(file)
        self.what = what  # how the file is named in the message: "image", "data" or "" (the bare path)
        super().__init__(self.message)

    @property
    def message(self) -> str:
        where = []
        if self.task is not None:
            where.append(f"task {self.task}")
        if self.row is not None:
            where.append(f"row {self.row}" + (f" ({self.column})" if self.column else ""))
        if self.file is not None:
            where.append(f"{self.what} {self.file}".strip())
        return ", ".join(where) + (": " if where else "") + self.reason

    def __str__(self) -> str:
        return self.message

    def in_task(self, task: str) -> EvalDataError:
        """The same error, naming ``task`` (kept when it names one already)."""
        if self.task is not None:
            return self
        return EvalDataError(self.reason, task=task, row=self.row, column=self.column, file=self.file,
                             what=self.what)

    def record(self) -> dict:
        """The entry of ``summary.json``'s ``failed``."""
        return {"message": self.message, "reason": self.reason, "row": self.row, "column": self.column,
                "file": self.file}


def image_error(exc: BaseException, path: Path, *, task: str | None = None, row: int | None = None,
                column: str | None = None) -> EvalDataError:
    """What went wrong reading an image, in words, with where it was referenced."""
    if isinstance(exc, FileNotFoundError):
        reason = "image file not found"
    elif isinstance(exc, UnidentifiedImageError):
        reason = "not an image Pillow can read (corrupt or an unsupported format)"
    elif isinstance(exc, IsADirectoryError):
        reason = "a directory, not an image file"
    elif isinstance(exc, PermissionError):
        reason = "image file not readable (permission denied)"
    elif isinstance(exc, Image.DecompressionBombError):
        reason = f"image too large to decode safely ({exc})"
    else:  # Pillow's decoders raise OSError ("image file is truncated", "Truncated File Read"), SyntaxError, ...
        reason = f"truncated or corrupt image ({type(exc).__name__}: {exc})"
    return EvalDataError(reason, task=task, row=row, column=column, file=path, what="image")
