"""Every path inside a run folder, in one place.

A run folder is the unit that `suite run` writes and `suite report`/`compare` read; its layout
is part of the results' contract, so no other module spells a file name of it.

  run.json              run metadata, config, per-backend threat model and status
  results.jsonl         tidy metric rows (suite.results)
  predictions.parquet   one row per backend x image x label
  parts/<id>.json       a backend job's timings, traffic and extra rows, written as it finishes
  parts/<id>.parquet    its predictions
  parts/<id>.progress.json  images predicted so far, rewritten by the harness after every batch
  parts/<id>.job.json   the job the worker ran (plain JSON, so it can run on another host)
  parts/<id>.released.pt  the model a training configuration released (compositions serve it)
  parts/<id>.shards/<k>.{job.json,parquet,json}  one shard of a configuration the Ray executor
                        fanned out (the .json is written last: a shard is complete or absent)
  work/<id>/            the backend's private scratch folder
  work/<id>/artifacts/  files an audit produced that the report shows (referenced by rows)
  leaderboard.csv, leaderboard.md, report.html
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar


def safe_name(backend_id: str) -> str:
    """A configuration name as a file name (`dp[target_epsilon=1.0]` -> `dp_target_epsilon_1.0_`)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in backend_id)


@dataclass(frozen=True)
class RunFolder:
    root: Path
    # what makes a folder a run's (an --out that holds any of them is another run)
    RUN_FILES: ClassVar[tuple[str, ...]] = ("run.json", "results.jsonl", "predictions.parquet", "parts")

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def run_json(self) -> Path:
        return self.root / "run.json"

    @property
    def results(self) -> Path:
        return self.root / "results.jsonl"

    @property
    def predictions(self) -> Path:
        return self.root / "predictions.parquet"

    @property
    def leaderboard_csv(self) -> Path:
        return self.root / "leaderboard.csv"

    @property
    def leaderboard_md(self) -> Path:
        return self.root / "leaderboard.md"

    @property
    def report_html(self) -> Path:
        return self.root / "report.html"

    @property
    def parts_dir(self) -> Path:
        return self.root / "parts"

    def part_meta(self, backend_id: str) -> Path:
        return self.parts_dir / f"{safe_name(backend_id)}.json"

    def part_predictions(self, backend_id: str) -> Path:
        return self.parts_dir / f"{safe_name(backend_id)}.parquet"

    def job(self, backend_id: str) -> Path:
        return self.parts_dir / f"{safe_name(backend_id)}.job.json"

    def progress(self, backend_id: str) -> Path:
        """Where the worker's harness reports images done of total (the parent shows it)."""
        return self.parts_dir / f"{safe_name(backend_id)}.progress.json"

    def shards_dir(self, backend_id: str) -> Path:
        """The shard parts of a configuration the Ray executor split over its nodes."""
        return self.parts_dir / f"{safe_name(backend_id)}.shards"

    def shard_meta(self, backend_id: str, shard: int) -> Path:
        return self.shards_dir(backend_id) / f"{shard}.json"

    def shard_predictions(self, backend_id: str, shard: int) -> Path:
        return self.shards_dir(backend_id) / f"{shard}.parquet"

    def shard_job(self, backend_id: str, shard: int) -> Path:
        return self.shards_dir(backend_id) / f"{shard}.job.json"

    def workdir(self, backend_id: str) -> Path:
        return self.root / "work" / backend_id

    def artifacts(self, backend_id: str) -> Path:
        return self.workdir(backend_id) / "artifacts"

    def released_model(self, backend_id: str) -> Path:
        """The checkpoint a training configuration released (served by compositions)."""
        return self.parts_dir / f"{safe_name(backend_id)}.released.pt"

    def relative(self, path: Path) -> str:
        """How a row refers to a file of this run (portable when the folder moves)."""
        return Path(path).resolve().relative_to(self.root.resolve()).as_posix()

    def is_run(self) -> bool:
        return self.run_json.exists() or self.results.exists()
