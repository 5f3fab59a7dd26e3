"""The HTML report: self-contained, plots as PNG files too, per-task samples, checked in headless Chromium."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from peftlab.report.html import plots_dir, write_report
from peftlab.report.plots import PLOTS
from peftlab.runs import atomic_write_text

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def sft_metrics(speed: float, loss0: float) -> list[dict]:
    records = []
    for step in range(2, 22, 2):
        records.append({"kind": "train", "step": step, "epoch": step / 20, "loss": loss0 / step ** 0.3,
                        "grad_norm": 1.0 + 1 / step, "lr": 1e-3 * (1 - step / 25), "tokens_per_s": speed,
                        "samples_per_s": speed / 100, "mem_allocated_gib": 2.0 + step / 100,
                        "mem_reserved_gib": 2.5, "time": step / 2})
        if step % 10 == 0:
            records.append({"kind": "eval", "step": step, "epoch": step / 20, "eval_loss": loss0 / step ** 0.25})
    return records


def png(path: Path, size: tuple[int, int], color: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


@pytest.fixture
def report_runs(make_run):
    """An SFT pair with generations, a classify run with a confusion matrix, a diffusion run with a grid."""
    lora = make_run("sft-lora", {"runtime_s": 100.0, "peak_mem_allocated_gib": 2.2, "tokens_per_s": 900.0,
                                 "eval_loss": 1.9, "environment": {"device": "cpu (2 cores)",
                                                                   "versions": {"torch": "2.13.0"}}},
                    sft_metrics(900.0, 3.0))
    qlora = make_run("sft-qlora", {"method": "qlora", "runtime_s": 130.0, "peak_mem_allocated_gib": 1.4,
                                   "tokens_per_s": 700.0, "eval_loss": 2.0}, sft_metrics(700.0, 3.2))
    for run, answer in ((lora, "Paris <b>is</b> the capital."), (qlora, "Paris.")):
        rows = [{"prompt": "What is the capital of France?", "adapter": answer, "base": "blue blue blue"},
                {"prompt": "Name a color.", "adapter": f"{run.name} says red", "base": "blue"}]
        atomic_write_text(run.samples_path / "generations.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    cls = make_run("cls", {"task": "classify", "runtime_s": 40.0, "test_accuracy": 0.91, "test_f1": 0.9},
                   [{"kind": "eval", "step": 5, "eval_accuracy": 0.5, "eval_f1": 0.45},
                    {"kind": "eval", "step": 10, "eval_accuracy": 0.8, "eval_f1": 0.78}])
    png(cls.path / "confusion_matrix.png", (120, 120), "purple")
    diff = make_run("diff", {"task": "diffusion", "runtime_s": 60.0, "it_per_s": 0.69, "final_train_loss": 0.1},
                    [{"step": s, "loss": 0.2 - s / 100, "it_per_s": 0.69, "lr": 1e-4} for s in range(1, 6)])
    png(diff.samples_path / "grid.png", (192, 64), "orange")
    qlora.config_path.write_text(qlora.config_path.read_text().replace("\n  name: lora\n", "\n  name: qlora\n"))
    return [lora, qlora, cls, diff]


def test_report_is_self_contained_with_plots_samples_and_recipes(report_runs, tmp_path):
    out = write_report(report_runs, tmp_path / "out" / "report.html")
    page = out.read_text(encoding="utf-8")

    srcs = re.findall(r'<img[^>]*\ssrc="([^"]*)"', page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert all(base64.b64decode(s.split(",", 1)[1]).startswith(PNG_MAGIC) for s in srcs)
    assert not re.search(r'(src|href)="(https?:)?//', page) and "<link" not in page  # nothing fetched from a network

    pngs = sorted(p.name for p in plots_dir(out).glob("*.png"))
    assert {"loss.png", "grad_norm.png", "lr.png", "memory.png", "tokens_per_s.png", "it_per_s.png",
            "eval_metrics.png"} <= set(pngs)
    assert all((plots_dir(out) / p).read_bytes().startswith(PNG_MAGIC) for p in pngs)
    assert len(srcs) == len(pngs) + 2  # every plot, the confusion matrix and the diffusion grid

    assert page.count('<tr data-run="') == 2 * len(report_runs)  # the comparison and the vs-baseline tables
    assert "Paris &lt;b&gt;is&lt;/b&gt; the capital." in page and "<b>is</b>" not in page  # escaped, side by side
    assert "sft-lora: adapter" in page and "sft-qlora: adapter" in page and "base model" in page
    assert page.count("tiny-gemma2-dolly") >= len(report_runs)  # each run's resolved recipe
    assert "cpu (2 cores)" in page and "versions.torch" in page  # the environment
    differences = re.search(r'<table id="recipe-differences".*?</table>', page, re.S).group(0)
    assert re.findall(r"<tr><td>([^<]+)</td>", differences) == ["method.name"]


def test_plots_skip_metrics_no_run_logged(make_run, tmp_path):
    run = make_run("only-loss", {}, [{"kind": "train", "step": s, "loss": 1.0 / s, "grad_norm": "nan"}
                                     for s in range(1, 5)])
    out = write_report([run], tmp_path / "r.html")
    assert sorted(p.stem for p in plots_dir(out).glob("*.png")) == ["loss"]  # NaN-only grad norm: no empty plot
    assert {p.name for p in PLOTS} >= {"loss"}
    assert 'id="comparison"' in out.read_text() and 'id="versus"' not in out.read_text()


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
             f"--user-data-dir={profile}"]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=120)


def test_report_renders_in_headless_chromium(report_runs, tmp_path):
    if CHROMIUM is None:
        pytest.skip("CHROMIUM IS MISSING: the browser check of the HTML report did NOT run; "
                    "install it (Debian: apt-get install chromium chromium-driver) to run it")
    out = write_report(report_runs, tmp_path / "report.html")
    dom = chromium("--virtual-time-budget=10000", "--dump-dom", out.as_uri(), profile=tmp_path / "profile").stdout
    body = re.search(r"<body[^>]*>", dom).group(0)
    total = len(re.findall(r"<img\s", dom))
    assert 'data-images="ok"' in body, body
    assert f'data-images-total="{total}"' in body and 'data-images-broken="0"' in body and total >= 9
    table = re.search(r'<table id="comparison".*?</table>', dom, re.S).group(0)
    assert re.findall(r'<tr data-run="([^"]+)"', table) == [r.name for r in report_runs]

    shot = tmp_path / "shot.png"
    chromium("--window-size=1400,2400", "--hide-scrollbars", f"--screenshot={shot}", out.as_uri(),
             profile=tmp_path / "profile")
    with Image.open(shot) as image:
        assert image.size == (1400, 2400)
        colors = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) > 50  # table text and plot lines, not a blank page

    broken = tmp_path / "broken.html"  # the image check itself can fail: a truncated image reads as broken
    broken.write_text(out.read_text().replace("<h1>", '<img alt="x" src="data:image/png;base64,iVBORw0KGgo="><h1>', 1))
    dom = chromium("--virtual-time-budget=10000", "--dump-dom", broken.as_uri(), profile=tmp_path / "profile").stdout
    assert 'data-images="broken"' in re.search(r"<body[^>]*>", dom).group(0)


def test_matrix_writes_the_report_and_the_registry_tracks_the_run(runs_dir, capsys):
    """One real tiny run through `peftlab matrix`: the runner indexes it, the matrix ends with the report."""
    from peftlab.cli import matrix
    from peftlab.registry import Registry

    fast = ["data.max_samples=32", "data.eval_fraction=0.1", "train.max_steps=4", "train.logging_steps=2",
            "train.batch_size=2", "train.grad_accum=1", "eval.prompts=[Name a primary color.]", "eval.max_new_tokens=4"]
    matrix("tiny-gemma2-dolly", methods="lora", set_=fast, name="m", runs_dir=runs_dir, overwrite=False)
    report = runs_dir / "m-report.html"
    assert f"report: {report}" in capsys.readouterr().out
    page = report.read_text(encoding="utf-8")
    assert '<tr data-run="m-lora">' in page and "Name a primary color." in page
    assert (plots_dir(report) / "loss.png").read_bytes().startswith(PNG_MAGIC)
    [entry] = Registry(runs_dir).query()  # no sync: what the runner recorded when the run ended
    assert (entry.name, entry.status) == ("m-lora", "completed")
    assert entry.summary["max_steps"] == 4 and entry.as_dict()["key_metrics"]["eval_loss"] > 0


def test_report_command(report_runs, runs_dir, tmp_path):
    out = tmp_path / "cmp.html"
    done = subprocess.run([sys.executable, "-m", "peftlab", "report", "sft-lora", "sft-qlora", "--baseline", "sft-qlora",
                           "-o", str(out), "--runs-dir", str(runs_dir)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"report: {out}" in done.stdout and "baseline sft-qlora" in out.read_text(encoding="utf-8")
    missing = subprocess.run([sys.executable, "-m", "peftlab", "report", "nope", "--runs-dir", str(runs_dir)],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "error: run 'nope' not found" in missing.stderr
