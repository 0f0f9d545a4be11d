"""Errors a user makes, through the real CLIs: one ``error:`` line naming the key / file, no traceback, exit 1.

(Issue 15, "Unclear messages"; the diverged run of item 5 through the CLI.) Each case fails before or early in
training, so the subprocesses are short.
"""

from __future__ import annotations

import pytest

from tests.conftest import run_cli
from unimm.utils.errors import UserError, report_errors


def _assert_clean_error(proc, *needles: str) -> None:
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr and "Error executing job" not in proc.stderr, proc.stderr[-3000:]
    assert "\nerror: " in "\n" + proc.stderr, proc.stderr[-3000:]
    error = proc.stderr[("\n" + proc.stderr).rindex("\nerror: "):]  # the message, hints on its following lines
    for needle in needles:
        assert needle in error, (needle, error)


def test_wrong_value_types_are_named_before_anything_is_built(tmp_path):
    """Was: a TypeError deep in the DataLoader / optimizer."""
    proc = run_cli("unimm.train", "data.batch_size=abc", "model.optimizer.lr=abc", f"paths.log_dir={tmp_path}",
                   f"paths.data_dir={tmp_path / 'data'}", "logger=none", cwd=tmp_path, check=False)
    _assert_clean_error(proc, "data.batch_size='abc' is not an integer", "model.optimizer.lr='abc' is not a number")
    assert not (tmp_path / "data").exists()  # checked before the toy set is built
    log = next(tmp_path.glob("train/runs/*/train.log")).read_text()
    assert "Traceback" in log and "data.batch_size" in log  # the traceback is kept in the run's log file


def test_text_file_as_checkpoint_is_named(tmp_path):
    """Was: KeyError: 101 from torch.load."""
    (tmp_path / "notes.txt").write_text("epoch 3 looked good\n")
    proc = run_cli("unimm.eval", f"ckpt_path={tmp_path / 'notes.txt'}", f"paths.log_dir={tmp_path}", "logger=none",
                   cwd=tmp_path, check=False)
    _assert_clean_error(proc, "notes.txt is not a Lightning checkpoint", "last.ckpt")


def test_missing_shard_set_names_the_command_that_builds_it(toy_data_dir, tmp_path):
    proc = run_cli("unimm.train", f"paths.data_dir={toy_data_dir}", f"paths.log_dir={tmp_path}", "logger=none",
                   f"data.train_sets.toy.path={tmp_path / 'mbeir' / 'train'}", "data.num_workers=0",
                   "trainer.enable_progress_bar=false", cwd=tmp_path, check=False)
    _assert_clean_error(proc, "not a unimm shard set", "python -m unimm.data.convert mbeir train",
                        f"--out {tmp_path / 'mbeir' / 'train'}")


def test_diverged_run_exits_nonzero(toy_data_dir, tmp_path):
    """Issue 15 item 5: lr=1e6 skipped 28 of 30 steps, printed a table of zeros and returned 0."""
    proc = run_cli("unimm.train", "model.optimizer.lr=1e6", "trainer.max_steps=30", f"paths.data_dir={toy_data_dir}",
                   f"paths.log_dir={tmp_path}", "logger=none", "data.num_workers=0", "trainer.enable_progress_bar=false",
                   cwd=tmp_path, check=False)
    _assert_clean_error(proc, "training diverged", "max_skipped_fraction=0.1", "loss nan", "batch keys: ['toy_")
    assert "[nonfinite] step" in proc.stdout and "R@5" not in proc.stdout  # no table after a diverged run


def test_report_errors_keeps_tracebacks_of_unexplained_errors(tmp_path, monkeypatch, capsys):
    def bug():
        return [][1]  # an IndexError: a bug, not an input problem

    with pytest.raises(IndexError):
        report_errors(bug, tmp_path / "x.log")

    def bad_input():
        raise UserError("data.root is not a key; did you mean paths.data_dir?")

    with pytest.raises(SystemExit) as exit_info:
        report_errors(bad_input, tmp_path / "x.log")
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.startswith("error: data.root is not a key")
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(UserError):
        report_errors(bad_input, tmp_path / "x.log")


def test_error_from_a_dataloader_worker_prints_its_own_message(tmp_path, capsys):
    """A strict-mode data error raised inside a DataLoader worker is re-raised in the main process by torch (with
    the worker's traceback in its text in some torch versions): the user sees the original message only."""
    from torch._utils import ExceptionWrapper

    from unimm.data.shards import DataError

    def in_worker():
        try:
            raise DataError("shard-00003.tar: sample toy_t2i_000042 has no query (data.strict=true)")
        except DataError:
            ExceptionWrapper(where="in DataLoader worker process 0").reraise()

    with pytest.raises(SystemExit):
        report_errors(in_worker, tmp_path / "x.log")
    err = capsys.readouterr().err
    assert err.startswith("error: shard-00003.tar: sample toy_t2i_000042 has no query") and "Traceback" not in err
    assert "Traceback" in (tmp_path / "x.log").read_text()
