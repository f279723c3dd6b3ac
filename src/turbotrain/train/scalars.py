"""Training scalars: an append-only ``metrics.csv``, TensorBoard events and a tqdm bar.

Named ``scalars`` rather than ``logging`` so it is never confused with the standard library module.
The CSV is the record the report stage reads; it is appended and flushed row by row so a killed run
keeps every finished step, and :meth:`CsvScalarLog.truncate_after` drops the rows a resumed run
is about to redo, so no step appears twice.
"""
from __future__ import annotations

import csv
import math
import sys
from pathlib import Path
from typing import IO, TYPE_CHECKING, Mapping

from tqdm import tqdm

from turbotrain.utils.atomic import atomic_open

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

Row = Mapping[str, float | int | str]


class CsvScalarLog:
    """``metrics.csv`` with a header that grows when a row brings new columns.

    Balancer diagnostics may appear only on some steps, so the column set is not known up front;
    a new column rewrites the file once (atomically) with the wider header, earlier rows blank there.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.columns: list[str] = self._read_header()
        self._fh: IO[str] | None = None

    def _read_header(self) -> list[str]:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return []
        with open(self.path, newline="") as fh:
            return next(csv.reader(fh), [])

    def _read_rows(self) -> list[dict[str, str]]:
        if not self.columns:
            return []
        with open(self.path, newline="") as fh:
            return list(csv.DictReader(fh))

    def _rewrite(self, columns: list[str], rows: list[Mapping[str, object]]) -> None:
        self.close()
        with atomic_open(self.path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns, restval="")
            writer.writeheader()
            writer.writerows(rows)
        self.columns = columns

    def truncate_after(self, step: int) -> None:
        """Drop rows whose ``step`` exceeds ``step`` (those a resumed run will log again)."""
        rows = self._read_rows()
        kept = [r for r in rows if r.get("step") and int(r["step"]) <= step]
        if len(kept) != len(rows):
            self._rewrite(self.columns, kept)

    def append(self, row: Row) -> None:
        """Append one row and flush it to disk."""
        new_columns = [k for k in row if k not in self.columns]
        if new_columns:
            self._rewrite(self.columns + new_columns, self._read_rows())
        if self._fh is None:
            self._fh = open(self.path, "a", newline="")
            if self._fh.tell() == 0:
                csv.writer(self._fh).writerow(self.columns)
        csv.DictWriter(self._fh, fieldnames=self.columns, restval="").writerow(dict(row))
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class ScalarLogger:
    """CSV + TensorBoard for rank 0; every call is a no-op on other ranks (``enabled=False``)."""

    def __init__(self, run_dir: str | Path, enabled: bool, resume_step: int = 0):
        self.enabled = enabled
        self.csv: CsvScalarLog | None = None
        self.tb: SummaryWriter | None = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        self.csv = CsvScalarLog(run_dir / "metrics.csv")
        self.csv.truncate_after(resume_step)
        # Imported here: tensorboard costs ~1 s per job process that logs nothing (evaluation, --help).
        from torch.utils.tensorboard import SummaryWriter

        # purge_step hides events a killed run wrote after its last checkpoint (all of them on a fresh start).
        self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1)

    def log(self, row: Row) -> None:
        """Write one row; ``row['step']`` is the TensorBoard step, numeric columns become scalars."""
        if not self.enabled:
            return
        self.csv.append(row)
        step = int(row["step"])
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.enabled:
            self.csv.close()
            self.tb.close()


def progress_bar(total: int, initial: int, enabled: bool) -> tqdm:
    """tqdm over optimizer steps, shown only on rank 0 with an interactive terminal."""
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                disable=not (enabled and sys.stderr.isatty()))
