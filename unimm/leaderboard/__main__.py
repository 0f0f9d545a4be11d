"""``python -m unimm.leaderboard``: the cross-family leaderboard and the per-query results browser.

    python -m unimm.leaderboard outputs/ [more roots] --out leaderboard/ [--wandb-run outputs/.../wandb]
    python -m unimm.leaderboard browse RUN_DIR [--k 10]            # RUN_DIR/browser/*.html
    python -m unimm.leaderboard compare RUN_A RUN_B --out DIR       # queries B gets right and A wrong, and back
    python -m unimm.leaderboard serve DIR [--port 8000]            # the same files over http://127.0.0.1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

COMMANDS = ("build", "browse", "compare", "serve")


def _build(args) -> None:
    from unimm.leaderboard.gather import build_board
    from unimm.leaderboard.render import markdown, write_all

    started = time.perf_counter()
    board = build_board(args.roots, reported=not args.no_reported)
    paths = write_all(board, args.out)
    print(markdown(board))
    measured = sum(r.kind == "measured" for r in board.rows)
    print(f"{measured} runs from {board.n_files} results files in {time.perf_counter() - started:.2f} s: "
          + ", ".join(str(p) for p in paths.values()))
    if args.wandb_project or args.wandb_run:
        from unimm.leaderboard.wandb_table import log_board

        log_board(board, project=args.wandb_project, run_id=args.wandb_run)


def _browse(args) -> None:
    from unimm.leaderboard.browser import write_run_pages

    pages = write_run_pages(args.run, out=args.out, k=args.k)
    print("\n".join(str(p) for p in pages))


def _compare(args) -> None:
    from unimm.leaderboard.browser import write_comparison

    pages = write_comparison(args.run_a, args.run_b, args.out, k=args.k, names=(args.name_a, args.name_b))
    print("\n".join(str(p) for p in pages))


def _serve(args) -> None:
    import functools
    import http.server

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(args.dir))
    with http.server.ThreadingHTTPServer(("127.0.0.1", args.port), handler) as server:
        print(f"serving {args.dir} at http://127.0.0.1:{server.server_address[1]}/ (Ctrl-C stops)")
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in (*COMMANDS, "-h", "--help"):
        argv.insert(0, "build")  # the default command: `python -m unimm.leaderboard ROOTS...`
    parser = argparse.ArgumentParser(prog="python -m unimm.leaderboard", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="gather results.json files and write leaderboard.{md,csv,html}")
    b.add_argument("roots", nargs="+", help="output roots (searched recursively for results.json) or results files")
    b.add_argument("--out", default="leaderboard", help="folder for leaderboard.md / .csv / .html")
    b.add_argument("--no-reported", action="store_true", help="leave out the papers' reported rows")
    b.add_argument("--wandb-project", default=None, help="log the table to a new wandb run in this project")
    b.add_argument("--wandb-run", default=None, help="log the table to this existing wandb run id (resumed)")
    b.set_defaults(func=_build)
    w = sub.add_parser("browse", help="static per-query pages of one evaluation run")
    w.add_argument("run", help="a run folder with per_query/manifest.json")
    w.add_argument("--out", default=None, help="output folder (default RUN/browser)")
    w.add_argument("--k", type=int, default=10, help="candidates shown per query")
    w.set_defaults(func=_browse)
    c = sub.add_parser("compare", help="queries run B gets right and run A wrong, and the reverse")
    c.add_argument("run_a")
    c.add_argument("run_b")
    c.add_argument("--out", required=True)
    c.add_argument("--k", type=int, default=10)
    c.add_argument("--name-a", default=None, help="label of run A (default: its folder name)")
    c.add_argument("--name-b", default=None)
    c.set_defaults(func=_compare)
    s = sub.add_parser("serve", help="serve a folder of pages on 127.0.0.1 (the pages also work from file://)")
    s.add_argument("dir", type=Path)
    s.add_argument("--port", type=int, default=8000)
    s.set_defaults(func=_serve)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (FileNotFoundError, ValueError, KeyError) as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
