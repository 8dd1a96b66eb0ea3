"""`python -m pipeline.tools.describe` prints the strategies' parameter counts; the README's
strategy tables are its output, so the README cannot drift from the code."""

from __future__ import annotations

from pathlib import Path

from pipeline.tools import describe

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_strategy_tables_are_the_describe_output(capsys):
    describe.main([])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line]
    names = [row.split(" | ")[0].removeprefix("| ") for row in rows]
    assert "frozen" in names and "bias_only" in names and "surgical_block1" in names  # both tables
    readme = README.read_text().splitlines()
    assert [row for row in rows if row not in readme] == []


def test_each_row_says_what_trains_and_counts_it(capsys):
    describe.main([])
    rows = {
        cells[0]: cells
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("| ") and "---" not in line
        for cells in [line.removeprefix("| ").removesuffix(" |").split(" | ")]
    }
    assert rows["bias_only"][3] == "every conv layer: biases only + head"
    assert rows["lora_r4"][3] == "every conv layer: LoRA rank 4 on the kernels + head"
    assert rows["scale_shift"][3] == "every conv layer: a scale and shift per channel + head"
    assert rows["surgical_block1"][3] == "block1 + head"
    assert rows["full"][3] == "everything"
    # the base's trainable parameters of bias-only are VGG16's 4,224 conv biases (the head's on top)
    head = int(rows["frozen"][4].replace(",", ""))
    assert int(rows["bias_only"][4].replace(",", "")) - head == 4_224
    del rows["strategy"]  # the header
    for cells in rows.values():
        trainable, frozen, total = (int(c.replace(",", "")) for c in cells[4:7])
        assert trainable + frozen == total
