"""What a user sees: the console is in the run's log file, without third-party noise; example grids are titled.

(Issue 15, "A clean console".) One short toy run and one re-evaluation through the real CLIs.
"""

from __future__ import annotations

from PIL import Image

from tests.conftest import run_cli, single_run_dir
from unimm.data.records import Item
from unimm.eval.report import grid_title, retrieval_grid

NOISE = ("litlogger", "litmodels", "anonymous setting", "LeafSpec", "transfer_batch_to_device", "Total FLOPs",
         "`training_step` returned `None`")


def test_console_goes_to_the_run_log_without_noise(toy_data_dir, tmp_path):
    # the smallest toy evaluation (200 image queries, 120 captions); the re-evaluation reads the same embedding cache
    common = [f"paths.data_dir={toy_data_dir}", f"paths.log_dir={tmp_path}", "data.num_workers=0",
              "eval.evaluations=[toy_i2t]", f"eval.cache_dir={tmp_path / 'embeddings'}"]
    proc = run_cli("unimm.train", "trainer.max_steps=3", *common, cwd=tmp_path)
    console = proc.stdout + proc.stderr
    for noise in NOISE:
        assert noise not in console, noise
    run_dir = single_run_dir(tmp_path, "train")
    log = (run_dir / "train.log").read_text()
    for expected in ("GPU available",          # Lightning's log lines
                     "[progress] epoch 0/5: step 3",  # a plain-text line per epoch for the live progress bar
                     "[data] epoch 0:",        # data accounting
                     "| i2t / toy |",          # the results table
                     "== unimm run summary ==", "non-finite steps skipped: 0 of 3"):
        assert expected in log, (expected, log[-3000:])
    assert "\x1b[" not in log  # no terminal control codes

    proc = run_cli("unimm.eval", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", *common, cwd=tmp_path)
    assert not [noise for noise in NOISE if noise in proc.stdout + proc.stderr]
    log = (single_run_dir(tmp_path, "eval", "evals") / "cli.log").read_text()
    assert "| i2t / toy |" in log and "evaluated " in log, log[-3000:]


def test_grid_keeps_the_instruction_off_the_query_tile():
    """The it2i grid showed "[retrieve the imag..." on the query tile: the instruction is now a header line."""
    blue = Image.new("RGB", (8, 8), (0, 0, 255))
    rows = [(Item(text=f"make it {c}", image=blue), [Item(image=blue)], [True]) for c in ("red", "small")]
    tile = 64
    plain = retrieval_grid(rows, tile=tile)
    shared = retrieval_grid(rows, tile=tile, title="toy · it2i / toy · UniIRModule (CLIPModel) · step 276",
                            notes=["retrieve the image after applying the change"] * 2)
    per_row = retrieval_grid(rows, tile=tile, notes=["instruction a", "instruction b"])
    line = (shared.height - plain.height) // 2
    assert plain.size == (tile * 2 + tile // 4, tile * 2) and line > 8
    assert shared.size == (plain.width, plain.height + 2 * line)      # title + "instruction: ..." above the rows
    assert per_row.size == (plain.width, plain.height + 2 * line)     # one line under each row
    # the query tiles (below the header) are the same pixels as without notes: the text on them is the query's own
    header = 2 * line
    assert shared.crop((0, header, tile, header + tile)).tobytes() == plain.crop((0, 0, tile, tile)).tobytes()


def test_grid_title_names_benchmark_task_model_and_step():
    class Encoder:
        pass

    class UniIRModule:
        encoder = Encoder()

    assert grid_title("toy", "it2i / toy", UniIRModule(), "step276") == "toy · it2i / toy · UniIRModule (Encoder) · step276"


def test_log_keeps_what_was_printed_under_a_live_progress_bar():
    """On a terminal, rich redraws its progress frame in place; text printed meanwhile is in the same write."""
    from unimm.utils.console import clean_for_log

    erase = "\r\x1b[2K\x1b[1A\x1b[2K"  # the previous 2-line frame
    frame = "Epoch 0/5  \x1b[90m━━━━\x1b[0m 2/46\r\n        \x1b[3mtrain/loss: 4.159  \x1b[0m"
    assert clean_for_log(erase + frame) == ""
    assert clean_for_log(erase + "[nonfinite] step 2: loss nan\r\nbatch keys: ['a']\r\n" + frame) == (
        "[nonfinite] step 2: loss nan\nbatch keys: ['a']\n")
    assert clean_for_log("\x1b[1m| i2t / toy |\x1b[0m 4.5\n") == "| i2t / toy | 4.5\n"
