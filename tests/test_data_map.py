"""The data map: python -m lynx.data map DIR writes a self-contained map.html holding every row and a map.png."""

import json
from html.parser import HTMLParser

import pytest

from lynx.data.__main__ import main
from lynx.data.build import SPLITS

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")


class Page(HTMLParser):
    """The tags of a page, the attributes that could load something, and the text of its JSON data script."""

    def __init__(self):
        super().__init__()
        self.tags, self.links, self.data, self._in_data = [], [], "", False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        self.links += [attrs[k] for k in ("src", "href") if k in attrs]
        self._in_data = tag == "script" and attrs.get("type") == "application/json"

    def handle_endtag(self, tag):
        self._in_data = False

    def handle_data(self, data):
        if self._in_data:
            self.data += data


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("small")
    assert main(["build", "--out", str(out), "--max-per-source", "8", "--no-token-stats"]) == 0
    return out


def test_map_holds_every_row(built, capsys):
    assert main(["map", str(built)]) == 0
    printed = capsys.readouterr().out
    assert "projecting" in printed and "map.html" in printed and "map.png" in printed

    rows = [json.loads(line) for s in SPLITS for line in (built / f"halubench_{s}.jsonl").open()]
    assert len(rows) == 40  # 8 per source
    page = Page()
    page.feed((built / "map.html").read_text(encoding="utf-8"))
    page.close()
    assert {"svg", "select", "table", "script"} <= set(page.tags)
    assert page.links == []  # self-contained: nothing to fetch
    data = json.loads(page.data)
    assert sorted(p["id"] for p in data["rows"]) == sorted(r["id"] for r in rows)
    by_id = {r["id"]: r for r in rows}
    for p in data["rows"]:
        r = by_id[p["id"]]
        assert p["label"] == r["label"] and p["source"] == r["source_ds"] and 0 <= p["x"] <= 1 and 0 <= p["y"] <= 1
        assert " ".join(r["question"].split()).startswith(p["question"].removesuffix(" ..."))  # shown on hover
        assert (p["type"] == "none (PASS)") == (r["label"] == "PASS")
    assert set(data["colours"]) == {"source", "label", "type", "split"}
    assert set(data["colours"]["source"]) == {r["source_ds"] for r in rows}

    png = (built / "map.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_map_of_a_folder_without_data_names_it(tmp_path, capsys):
    assert main(["map", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "no built data" in err
    assert main(["map", str(tmp_path / "missing")]) == 1
    assert str(tmp_path / "missing") in capsys.readouterr().err


def test_map_help_explains(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["map", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "map.html" in text and "map.png" in text and "TF-IDF" in text
