"""The leaderboard as a wandb Table: ``python -m unimm.leaderboard ROOTS --wandb-project P`` (a new run of job type
``leaderboard``) or ``--wandb-run ID`` (appended to an existing run). Offline mode (``WANDB_MODE=offline``, the
platform default) writes the run folder locally for a later ``wandb sync``."""

from __future__ import annotations

from unimm.leaderboard.gather import Board


def table_rows(board: Board) -> tuple[list[str], list[list]]:
    """Columns (model, family, kind, one per leaderboard column) and one list of cells per row (None = empty)."""
    columns = ["model", "family", "kind", *[c.label for c in board.columns]]
    data = [[row.name, board.families.get(row.family, row.family), row.kind,
             *[row.cells.get(c.key) for c in board.columns]] for row in board.rows]
    return columns, data


def log_board(board: Board, project: str | None = None, run_id: str | None = None, dir: str | None = None,
              key: str = "leaderboard"):
    """Log the board as ``wandb.Table`` under ``key``; returns the table."""
    import wandb

    columns, data = table_rows(board)
    run = wandb.init(project=project or "unimm", id=run_id, resume="allow" if run_id else None,
                     job_type="leaderboard", dir=dir)
    table = wandb.Table(columns=columns, data=data)
    run.log({key: table})
    print(f"leaderboard table logged to wandb run {run.id} ({run.dir})")
    run.finish()
    return table
