"""Markdown table, atomic metrics.json and the retrieval example grid."""

from PIL import Image

from unimm.data.records import Item
from unimm.eval.report import BORDER, GREEN, GREY, RED, markdown_table, retrieval_grid, write_metrics_json

VALUES = {
    ("t→i / MSCOCO", "CLIP"): 60.0, ("t→i / MSCOCO", "Ours"): 70.25,
    ("i→t / MSCOCO", "CLIP"): 80.0, ("i→t / MSCOCO", "Ours"): 90.0,
    ("i→i / NIGHTS", "CLIP"): 26.0, ("i→i / NIGHTS", "Ours"): None,
}
ROWS = ["t→i / MSCOCO", "i→t / MSCOCO", "i→i / NIGHTS"]


def test_markdown_table_complete_rows_average():
    # NIGHTS lacks "Ours", so the average uses the two MSCOCO rows only: CLIP (60+80)/2, Ours (70.25+90)/2
    expected = (
        "**M-BEIR local**\n"
        "\n"
        "| Task | CLIP | Ours |\n"
        "|---|---:|---:|\n"
        "| t→i / MSCOCO | 60.0 | 70.2 |\n"
        "| i→t / MSCOCO | 80.0 | 90.0 |\n"
        "| i→i / NIGHTS | 26.0 | – |\n"
        "| **Average (2/3 rows)** | 70.0 | 80.1 |"
    )
    assert markdown_table(ROWS, ["CLIP", "Ours"], VALUES, title="M-BEIR local", row_header="Task") == expected


def test_markdown_table_each_column_and_no_average():
    text = markdown_table(ROWS, ["CLIP"], VALUES, average_over="each_column", fmt="{:.2f}")
    assert text.splitlines()[-1] == "| **Average** | 55.33 |"  # (60 + 80 + 26) / 3
    text = markdown_table(ROWS[:1], ["CLIP", "Ours"], VALUES, average_row=False)
    assert text == "|  | CLIP | Ours |\n|---|---:|---:|\n| t→i / MSCOCO | 60.0 | 70.2 |"


def test_write_metrics_json(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text("old")
    write_metrics_json(path, {"b": 1.5, "a": {"z": 1, "y": 2}})
    assert path.read_text() == '{\n  "a": {\n    "y": 2,\n    "z": 1\n  },\n  "b": 1.5\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temporary file left behind


def test_retrieval_grid_layout_and_colours():
    blue = Image.new("RGB", (10, 6), (0, 0, 255))
    rows = [
        (Item(text="a red bus"), [Item(image=blue), Item(text="bus", image=blue), Item(text="cat")], [True, False, False]),
        (Item(image=blue), [Item(text="x" * 300)], [False]),  # shorter row, long wrapped text
    ]
    tile = 64
    grid = retrieval_grid(rows, tile=tile)
    gap = tile // 4
    assert grid.size == (tile * (1 + 3) + gap, tile * 2)
    # frames: query grey, then candidate 0 relevant (green), candidate 1 not (red); second row's candidate red
    assert grid.getpixel((1, 1)) == GREY
    assert grid.getpixel((tile + gap + 1, 1)) == GREEN
    assert grid.getpixel((tile + gap + tile + 1, tile // 2)) == RED
    assert grid.getpixel((tile + gap + BORDER // 2, tile + tile - 2)) == RED
    # the image is drawn inside the frame: the tile centre of the image-only candidate is blue
    assert grid.getpixel((tile + gap + tile // 2, tile // 2)) == (0, 0, 255)
    # row 2 has one candidate: its second slot stays white
    assert grid.getpixel((tile + gap + tile + tile // 2, tile + tile // 2)) == (255, 255, 255)


def test_retrieval_grid_max_rows():
    rows = [(Item(text=str(i)), [Item(text="c")], [True]) for i in range(5)]
    assert retrieval_grid(rows, tile=32, max_rows=3).size == (32 * 2 + 8, 32 * 3)
