"""The web overview in-process (FastAPI's TestClient): every page, its JSON view byte for byte
against the CLI's `--json`, the table's sort/filter/pages, bad input, and `taps-cl ui`'s own
errors. tests/test_ui_browser.py drives the same pages in chromium against a real process.

The sample registry is examples/ui_screenshots.py's (seven tasks of five methods on a tiny
EfficientNet, built once per test session); a synthetic one of 70 tasks (registry rows and
small blobs, no model) exercises the paths of a large base.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import socket
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient

from registry import Registry, runs
from taps_cl.manager import Manager
from taps_cl.serving.app import AppConfig, create_app
from taps_cl.serving.ui import views
from tests.conftest import load_example
from tests.test_cli import assert_one_line_error, run
from tests.test_task_summaries import add_base, add_task, linear_layers, taps_layers

HTML = {"accept": "text/html"}
SAMPLE_BASE = "demo"
ODD_NAME = 'a "task" <b>&amp; 100%?#'  # names may hold anything but slashes, tabs, newlines


def sample_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample registry of examples/ui_screenshots.py, built once per session (both UI test
    modules use it; the app only reads it)."""
    home = tmp_path_factory.getbasetemp() / "ui-sample" / "home"
    done = home.parent / "built"
    if not done.exists():
        shutil.rmtree(home.parent, ignore_errors=True)
        home.parent.mkdir(parents=True)
        load_example("ui_screenshots").build_sample_registry(home)
        done.touch()
    return home


def digit_png(directory: Path) -> Path:
    return load_example("ui_screenshots").write_digit_png(directory / "digit.png", 3)


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    return sample_home(tmp_path_factory)


def client_for(home: Path, **config) -> TestClient:
    return TestClient(create_app(AppConfig(home=str(home), inference=False, ui=True, **config)))


@pytest.fixture(scope="module")
def client(sample) -> TestClient:
    with client_for(sample) as c:
        yield c


@pytest.fixture(scope="module")
def large(tmp_path_factory) -> Path:
    """Base b: 69 ready synthetic tasks of three methods (taps tasks in two groups, with
    accuracies 0.01 … 0.69) and one still training; base c empty."""
    home = tmp_path_factory.mktemp("ui-large") / "home"
    with Registry(home, create=True) as reg:
        add_base(reg, "b")
        add_base(reg, "c")
        for i in range(69):
            method = ("taps", "linear", "fusion")[i % 3]
            layers = taps_layers(i % 5 + 1, 3) if method != "linear" else linear_layers(4)
            add_task(reg, f"t{i:02d}", "b", method=method, layers=layers, acc=(i + 1) / 100,
                     config={"group": f"g{i % 2}"} if method == "taps" else {},
                     blob=f"task-{i}".encode() * (i % 7 + 1),
                     reads=(f"t{i - 1:02d}",) if method == "fusion" else ())
        reg.begin_task("running", base="b", method="taps", method_config={}, train_config={},
                       dataset_spec={}, class_names=["a", "b"], run_host=runs.this_host(),
                       run_pid=os.getpid())
        add_base(reg, "w e<i>rd")
        add_task(reg, ODD_NAME, "w e<i>rd", method="linear", layers=linear_layers(2), acc=0.5)
    return home


@pytest.fixture(scope="module")
def large_client(large) -> TestClient:
    with client_for(large) as c:
        yield c


class Cells(HTMLParser):
    """The attributes of every element of class `cls` (inside `within`, an id, if given)."""

    def __init__(self, cls: str, within: str | None = None) -> None:
        super().__init__()
        self.cls, self.within = cls, within
        self.depth = 0 if within else 1
        self.found: list[dict[str, str]] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attrs = dict(attrs)
        if self.within and attrs.get("id") == self.within:
            self.depth = 1
        if self.depth and self.cls in (attrs.get("class") or "").split():
            self.found.append(attrs)

    @classmethod
    def of(cls, html: str, css_class: str, within: str | None = None) -> list[dict[str, str]]:
        parser = cls(css_class, within)
        parser.feed(html)
        return parser.found


def rows_of(html: str) -> list[str]:
    """The task names of the task table, in the order shown."""
    return re.findall(r'<tr data-task="([^"]*)">', html)


def cli_json(capsys, home: Path, *args: str) -> str:
    code, out, err = run(capsys, "--home", str(home), "--json", *args)
    assert code == 0, err
    return out


# ------------------------------------------------------------------- pages
def test_every_page_renders_with_the_reports_numbers(client, sample):
    with Manager(sample) as m:
        budget = m.budget(SAMPLE_BASE)
        acc = m.accuracy(SAMPLE_BASE)
        tasks = m.task_summaries(SAMPLE_BASE)
    home = client.get("/", headers=HTML)
    assert home.status_code == 200
    (row,) = [r for r in Cells.of(home.text, "num") if r.get("data-field") == "total_params"
              and r.get("data-value") == str(budget.total_params)]
    assert f'data-value="{budget.finetune_total_params}"' in home.text
    assert "probe logits unchanged" in home.text

    page = client.get(f"/bases/{SAMPLE_BASE}", headers=HTML).text
    assert rows_of(page) == [t.name for t in tasks]
    for t in tasks:
        assert f'data-value="{t.task_params}"' in page
    assert f'id="total-params" data-value="{budget.total_params}"' in page
    # The heatmap draws every cell of the report, marked as the CLI marks it.
    cells = Cells.of(page, "cell", within=None)
    drawn = {(c["data-task"], c["data-after"]): (c["data-kind"], c["data-value"])
             for c in cells if "data-after" in c and "data-task" in c}
    expected = {(a, b): (kind, repr(value))
                for a, row, kinds in zip(acc.tasks, acc.matrix, acc.cells)
                for b, value, kind in zip(acc.tasks, row, kinds) if kind is not None}
    assert drawn == expected
    assert {kind for kind, _ in drawn.values()} >= {"measured", "probe", "derived"}
    assert page.count(">~</text>") + len(re.findall(r">\d+~</text>", page)) == sum(
        kind == "derived" for kind, _ in drawn.values())
    # Lineage: the fusion pin and the three progressive tasks on the shared band.
    assert 'data-reader="odd-fused" data-read="even"' in page
    for name in ("p-012", "p-345", "p-678"):
        assert f'<a class="task" href="/tasks/{name}">' in page
    for part in ("budget", "accuracy", "layers", "similarity", "lineage", "try"):
        assert client.get(f"/bases/{SAMPLE_BASE}/{part}", headers=HTML).status_code == 200
    assert client.get("/bases/spare", headers=HTML).status_code == 200  # a base without tasks
    task = client.get("/tasks/odd-fused", headers=HTML).text
    with Manager(sample) as m:
        t = m.get_task("odd-fused")
        pinned = t.depends_on[0].sha256
    assert t.artifact.sha256 in task and t.probe.sha256 in task and pinned in task
    assert 'class="read-link" href="/tasks/even"' in task
    assert 'class="reader-link" href="/tasks/odd-fused"' in client.get("/tasks/even").text
    assert client.get("/static/style.css").status_code == 200


def test_json_views_are_the_cli_documents(client, sample, capsys, tmp_path, monkeypatch):
    pairs = {
        "/?format=json": ["base list"],
        "/api/bases": ["base list"],
        f"/api/bases/{SAMPLE_BASE}": ["base show", SAMPLE_BASE],
        f"/bases/{SAMPLE_BASE}?format=json": ["task list --base", SAMPLE_BASE, "--limit", "50"],
        f"/bases/{SAMPLE_BASE}?per_page=3&page=2&format=json": [
            "task list --base", SAMPLE_BASE, "--limit", "3", "--offset", "3"],
        f"/api/tasks?base={SAMPLE_BASE}": ["task list --base", SAMPLE_BASE],
        "/api/tasks?limit=2&offset=1": ["task list --limit 2 --offset 1"],
        "/tasks/odd-fused?format=json": ["task show odd-fused"],
        "/api/tasks/p-345": ["task show p-345"],
        f"/bases/{SAMPLE_BASE}/budget?format=json": ["report budget --base", SAMPLE_BASE],
        f"/bases/{SAMPLE_BASE}/lineage?format=json": ["report budget --base", SAMPLE_BASE],
        f"/api/reports/budget?base={SAMPLE_BASE}": ["report budget --base", SAMPLE_BASE],
        f"/bases/{SAMPLE_BASE}/accuracy?format=json": ["report accuracy --base", SAMPLE_BASE],
        f"/bases/{SAMPLE_BASE}/accuracy?summary=1&format=json": [
            "report accuracy --summary --base", SAMPLE_BASE],
        f"/api/reports/accuracy?base={SAMPLE_BASE}&summary=1": [
            "report accuracy --summary --base", SAMPLE_BASE],
        f"/bases/{SAMPLE_BASE}/layers?format=json": ["report layers --base", SAMPLE_BASE],
        f"/bases/{SAMPLE_BASE}/similarity?format=json": ["report similarity --base",
                                                         SAMPLE_BASE],
    }
    for path, command in pairs.items():
        args = [word for part in command for word in part.split()]
        answer = client.get(path)
        assert answer.status_code == 200 and answer.headers["content-type"] == (
            "application/json"), path
        assert answer.text == cli_json(capsys, sample, *args), path

    # Verify: the same report, but for how long the check took.
    answer = client.post("/tasks/even/verify?format=json")
    out = cli_json(capsys, sample, "report", "accuracy", "--base", SAMPLE_BASE, "--verify",
                   "--task", "even")
    timed = ("verify_seconds", "verify_tasks_per_s")
    web, cli = json.loads(answer.text), json.loads(out)
    assert web["verified"] is True and web["verified_tasks"] == ["even"]
    assert {k: v for k, v in web.items() if k not in timed} == {
        k: v for k, v in cli.items() if k not in timed}

    # Try it: each task's `predict TASK IMAGE --json` (the CLI given the file by its name).
    png = digit_png(tmp_path)
    answer = client.post(f"/bases/{SAMPLE_BASE}/try?format=json",
                         files={"image": ("digit.png", png.read_bytes(), "image/png")},
                         data={"task": ["even", "p-345", "low-digits"]})
    assert answer.status_code == 200
    documents = json.loads(answer.text)
    assert list(documents) == ["low-digits", "even", "p-345"]  # in sequence order
    monkeypatch.chdir(tmp_path)
    for task, document in documents.items():
        out = cli_json(capsys, sample, "predict", task, "digit.png", "--device", "cpu")
        assert json.dumps(document) == out.strip()


def test_verify_button_shows_the_outcome_and_the_registry_page_remembers_it(
        client, sample, tmp_path):
    page = client.post("/tasks/p-012/verify", headers=HTML)
    assert page.status_code == 200
    (outcome,) = Cells.of(page.text, "outcome")
    assert outcome["data-verified"] == "true" and "p-012: ok" in page.text
    home = client.get("/", headers=HTML).text
    assert re.search(r'verified here: <a href="/tasks/p-012">p-012</a>\s*<span class="ok">',
                     home)

    # A damaged artifact: the check fails and says which task, and the app goes on.
    copy = tmp_path / "home"
    shutil.copytree(sample, copy)
    with Manager(copy) as m:
        artifact = m.get_task("high-digits").artifact
        path = Path(str(m.registry.store.path_of(artifact.path)))
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with client_for(copy) as damaged:
        page = damaged.post("/tasks/high-digits/verify", headers=HTML)
        assert page.status_code == 200
        (outcome,) = Cells.of(page.text, "outcome")
        assert outcome["data-verified"] == "false"
        assert re.search(r'<li class="bad">high-digits: [^<]*sha256', page.text)
        assert damaged.get("/", headers=HTML).status_code == 200


# ------------------------------------------------------------- the task table
def test_table_sorts_filters_and_pages_on_the_server(large_client, large):
    with Manager(large) as m:
        every = m.task_summaries("b")
    by_size = sorted([t for t in every if t.sha256], key=lambda t: (t.task_params, t.name))
    page = large_client.get("/bases/b?sort=params&order=desc&per_page=10&page=2", headers=HTML)
    assert rows_of(page.text) == [t.name for t in reversed(by_size)][10:20]
    assert 'page 2 of 7' in page.text
    last = large_client.get("/bases/b?sort=params&per_page=10&page=7", headers=HTML).text
    assert rows_of(last) == [t.name for t in by_size][60:] + ["running"]  # no size: last
    by_accuracy = large_client.get("/bases/b?sort=accuracy&order=desc", headers=HTML).text
    assert rows_of(by_accuracy)[:3] == ["t68", "t67", "t66"]
    # Filters combine; the count says how many match.
    assert rows_of(large_client.get("/bases/b?q=T0&method=taps").text) == [
        "t00", "t03", "t06", "t09"]
    grouped = large_client.get("/bases/b?group=g1&per_page=100").text
    assert rows_of(grouped) == [t.name for t in every if t.method_config.get("group") == "g1"]
    training = large_client.get("/bases/b?status=training").text
    assert rows_of(training) == ["running"] and 'id="matching" data-value="1"' in training
    # Sequence order reads one page: the same rows as `task list --limit --offset`.
    plain = large_client.get("/bases/b?page=2", headers=HTML).text
    assert rows_of(plain) == [t.name for t in every[50:]]
    assert rows_of(large_client.get("/bases/b?page=9").text) == []  # past the end: empty


def test_large_base_links_its_charts_and_summarises_accuracy(large_client, large,
                                                             monkeypatch):
    monkeypatch.setattr(views, "INLINE_TASKS", 20)
    page = large_client.get("/bases/b", headers=HTML).text
    assert 'id="large-base"' in page and "<svg" not in page
    accuracy = large_client.get("/bases/b/accuracy", headers=HTML).text
    assert 'id="summary-line"' in accuracy and 'class="chart accuracy"' not in accuracy
    with Manager(large) as m:
        final = m.accuracy("b").final
    strip = [c for c in Cells.of(accuracy, "cell") if "data-after" in c]
    assert len(strip) == len(final) == 69
    monkeypatch.setattr(views, "HEATMAP_LIMIT", 50)
    refused = large_client.get("/bases/b/accuracy?summary=0", headers=HTML)
    assert refused.status_code == 400 and "at most 50 tasks" in refused.text
    for part in ("budget", "layers", "similarity", "lineage", "try"):
        assert large_client.get(f"/bases/b/{part}", headers=HTML).status_code == 200, part
    lineage = large_client.get("/bases/b/lineage", headers=HTML).text
    assert 'data-reader="t02" data-read="t01"' in lineage


def test_names_are_escaped_and_quoted(large_client):
    base = quote("w e<i>rd", safe="")
    page = large_client.get(f"/bases/{base}", headers=HTML)
    assert page.status_code == 200
    assert [html.unescape(name) for name in rows_of(page.text)] == [ODD_NAME]
    links = [html.unescape(href) for href in re.findall(r'href="(/tasks/[^"]*)"', page.text)]
    assert f"/tasks/{quote(ODD_NAME, safe='')}" in links
    assert "<b>" not in page.text and "<i>" not in page.text
    task = large_client.get(f"/tasks/{quote(ODD_NAME, safe='')}", headers=HTML)
    assert task.status_code == 200 and "<b>" not in task.text
    (title,) = re.findall(r"<h1>Task (.*)</h1>", task.text)
    assert html.unescape(title) == ODD_NAME
    assert large_client.get(f"/tasks/{quote(ODD_NAME, safe='')}?format=json").json()[
        "name"] == ODD_NAME
    registry = large_client.get("/", headers=HTML).text
    assert f'href="/bases/{base}"' in registry and "<i>" not in registry


def test_pages_follow_the_registry_as_it_changes(large, tmp_path):
    home = tmp_path / "home"
    shutil.copytree(large, home)
    with client_for(home) as c:
        before = c.get("/bases/c", headers=HTML).text
        assert rows_of(before) == []
        home_page = c.get("/", headers=HTML).text
        with Registry(home) as reg:
            add_task(reg, "late", "c", method="linear", layers=linear_layers(2), acc=0.5)
        assert rows_of(c.get("/bases/c?sort=name").text) == ["late"]  # cached summaries renewed
        assert c.get("/", headers=HTML).text != home_page
        with Manager(home) as m:
            assert f'data-value="{m.budget("c").total_params}"' in c.get("/").text


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("query", [
    "page=-1", "page=0", "page=two", "per_page=0", "per_page=501", "sort=bogus", "order=up",
    "status=done", "format=xml"])
def test_bad_parameters_answer_400(client, query):
    page = client.get(f"/bases/{SAMPLE_BASE}?{query}", headers=HTML)
    assert page.status_code == 400
    name = query.split("=")[0]
    assert re.search(rf'<p id="error-message" class="bad">{name} must', page.text)
    if name != "format":  # (a second format would be the one read)
        answer = client.get(f"/bases/{SAMPLE_BASE}?{query}&format=json")
        assert answer.status_code == 400 and json.loads(answer.text)["error"].startswith(name)


def test_unknown_names_answer_404(client):
    for path in ("/bases/nosuch", "/tasks/nosuch", "/bases/nosuch/accuracy", "/nothing/here",
                 "/bases/nosuch/try", "/api/reports/nosuch?base=demo"):
        page = client.get(path, headers=HTML)
        assert page.status_code == 404, path
        assert 'id="error-status">404' in page.text or "error" in page.json(), path
    assert client.get("/tasks/nosuch?format=json").json() == {"error": "no task named 'nosuch'"}
    assert client.post("/tasks/nosuch/verify").status_code == 404
    assert client.get("/", headers=HTML).status_code == 200  # still serving


def test_bad_uploads_get_a_clear_message_and_the_app_goes_on(sample, tmp_path, monkeypatch):
    png = digit_png(tmp_path).read_bytes()
    with client_for(sample, max_body_bytes=50_000) as c:
        def upload(data: bytes, **form):
            return c.post(f"/bases/{SAMPLE_BASE}/try?format=json",
                          files={"image": ("x.png", data, "image/png")}, data=form)

        cases = [
            (upload(b"plain text, not an image"), 415, "not an image"),
            (upload(png[:len(png) // 2]), 415, "not an image"),  # truncated
            (upload(b"\x89PNG" + b"0" * 60_000), 413, "at most 50,000"),
            (c.post(f"/bases/{SAMPLE_BASE}/try?format=json", data={"task": "even"}), 400,
             "no image was uploaded"),
            (upload(png, task="nosuch"), 400, "no ready task 'nosuch'"),
            (upload(png, top="0"), 400, "top must be between 1 and 20"),
            (c.post("/bases/nosuch/try?format=json",
                    files={"image": ("x.png", png, "image/png")}), 404, "no base model"),
        ]
        monkeypatch.setattr(views, "TRY_TASKS", 2)
        cases.append((upload(png), 400, "try at most 2 at once"))
        for answer, status, message in cases:
            assert answer.status_code == status, answer.text
            assert message in answer.json()["error"]
        page = c.post(f"/bases/{SAMPLE_BASE}/try", headers=HTML,
                      files={"image": ("x.png", b"GIF89a broken", "image/gif")})
        assert page.status_code == 415 and 'id="error-message"' in page.text
        ok = upload(png, task="high-digits")
        assert ok.status_code == 200 and list(ok.json()) == ["high-digits"]


# ------------------------------------------------------------- the command
def test_ui_command_refuses_without_a_registry_or_a_port(capsys, tmp_path, sample):
    code, _, err = run(capsys, "--home", str(tmp_path / "none"), "ui")
    assert code == 1
    assert_one_line_error(err, "no registry")
    assert not (tmp_path / "none").exists()  # reading never creates a registry
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        code, _, err = run(capsys, "--home", str(sample), "ui", "--port", str(port))
    assert code == 1
    assert_one_line_error(err, f"cannot listen on 127.0.0.1:{port}")
