"""The `vlmeff` command line: method specs, the method table, and the showcase on a small untrained model."""
import json

import pytest

pytest.importorskip("easy_vqa")

from vlmeff import cli, zoo  # noqa: E402
from vlmeff.zoo import build  # noqa: E402


def test_parse_method_specs():
    assert cli.parse_method("cls") == ("cls", {})
    assert cli.parse_method("cls:reduce=merge,score_layers=1") == ("cls", {"reduce": "merge", "score_layers": 1})
    with pytest.raises(Exception, match="not key=value"):
        cli.parse_method("cls:merge")


def test_methods_table(capsys):
    cli.main(["methods"])
    out = capsys.readouterr().out
    for name in ("cls", "tome", "visionzip", "received", "random", "pool"):
        assert f"\n{name} " in out


def test_showcase_runs_every_method_and_writes_results(tmp_path, monkeypatch):
    model, processor = build.build_llava()
    model.save_pretrained(tmp_path / "weights" / "tiny-llava-evqa")
    processor.save_pretrained(tmp_path / "weights" / "tiny-llava-evqa")
    monkeypatch.setattr(zoo, "WEIGHTS", tmp_path / "weights")
    cli.main(["showcase", "--limit", "8", "--batch-size", "4", "--methods", "cls", "pool", "--budgets", "0.25", "0.125",
              "--out", str(tmp_path / "out")])
    rows = json.loads((tmp_path / "out" / "showcase.json").read_text())
    assert [(r["method"], r["keep"]) for r in rows] == [("unpatched", None), ("cls", 0.25), ("cls", 0.125),
                                                        ("pool", 0.25), ("pool", 0.125)]
    assert [r["visual_tokens"] for r in rows] == [None, 64, 32, 64, 32]
    assert all(r["n"] == 8 and 0 <= r["accuracy"] <= 1 for r in rows)
    assert (tmp_path / "out" / "showcase.png").stat().st_size > 0
    # a second run resumes from the folder instead of recomputing or overwriting
    monkeypatch.setattr(cli, "evaluate_vqa", lambda *a, **k: pytest.fail("finished runs must not be recomputed"))
    cli.main(["showcase", "--limit", "8", "--methods", "cls", "pool", "--budgets", "0.25", "0.125",
              "--out", str(tmp_path / "out")])
    assert json.loads((tmp_path / "out" / "showcase.json").read_text()) == rows
    with pytest.raises(SystemExit, match="another model or question count"):
        cli.main(["showcase", "--limit", "16", "--out", str(tmp_path / "out")])
