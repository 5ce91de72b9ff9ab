"""Tests of the HTML report (python -m mmdsweep.report), rendered in headless Chromium.

Needs Debian's ``chromium`` at /usr/bin/chromium (``apt-get install chromium``); CI installs it.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sweep_fixture import build_sweep

from mmdsweep.analysis import report as R

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]
NUM_SAMPLES = 16
SECTIONS = (
    "summary",
    "final",
    "leaderboard",
    "best",
    "pareto",
    "curves",
    "sensitivity",
    "samples",
    "speed",
    "config",
)
EXPECTED_PNGS = {
    "pareto_timesteps.png",
    "pareto_seconds.png",
    "learning_curves.png",
    "sensitivity.png",
    "samples_T5_base.png",
    "samples_T5_finetuned.png",
    "samples_T10_base.png",
    "samples_T10_finetuned.png",
}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one torch thread per module


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_sweep(tmp_path_factory.mktemp("report"), optuna=True)


@pytest.fixture(scope="module")
def built(results_dir: Path) -> tuple[Path, str, float]:
    """The report built through the command line entry point: (html path, stdout, seconds)."""
    import contextlib

    out = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(out):
        rc = R.main([str(results_dir), "--num-samples", str(NUM_SAMPLES), "--device", "cpu"])
    elapsed = time.perf_counter() - t0
    assert rc == 0
    return results_dir / "report" / "report.html", out.getvalue(), elapsed


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.srcs: list[str] = []
        self.ids: list[str] = []
        self.external: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "img":
            self.srcs.append(a.get("src") or "")
        if tag == "section" and a.get("id"):
            self.ids.append(str(a["id"]))
        if tag in ("script", "link", "iframe") or (
            tag == "img" and not (a.get("src") or "").startswith("data:")
        ):
            self.external.append(tag)


def _decode_data_uri(src: str) -> Image.Image:
    match = re.fullmatch(r"data:image/png;base64,([A-Za-z0-9+/=]+)", src)
    assert match, f"not a base64 PNG data URI: {src[:60]}"
    try:
        data = base64.b64decode(match.group(1), validate=True)
    except binascii.Error as exc:  # pragma: no cover - the assertion message is the point
        raise AssertionError(f"bad base64 in data URI: {exc}") from exc
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} not found: install Debian's chromium (apt-get install -y chromium) to run this test"
        )
    return subprocess.run(
        [str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_report_files_and_content(built: tuple[Path, str, float], results_dir: Path) -> None:
    path, stdout, elapsed = built
    assert path.is_file()
    assert stdout.startswith(f"report: {path} (built in ") and stdout.rstrip().endswith("s)")
    print(f"report built in {elapsed:.1f}s")
    text = path.read_text()
    assert "section failed" not in text
    pngs = {p.name for p in path.parent.glob("*.png")}
    assert pngs == EXPECTED_PNGS
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    parser = _Images()
    parser.feed(text)
    assert parser.ids == list(SECTIONS)
    assert parser.external == [], "the report must not load anything from outside the file"
    assert len(parser.srcs) == len(EXPECTED_PNGS)
    for src in parser.srcs:
        img = _decode_data_uri(src)
        assert img.width > 10 and img.height > 10
        assert np.asarray(img.convert("L"), dtype=float).std() > 5
    # the embedded images are the PNGs written beside the report
    beside = {base64.b64encode((path.parent / n).read_bytes()).decode() for n in EXPECTED_PNGS}
    assert {s.split(",", 1)[1] for s in parser.srcs} == beside
    # summary, leaderboard, samples labelled with T and FID
    for needle in (
        "sweep-fixture",
        "digits_mmd",
        "completed",
        "early-stopped",
        "RuntimeError: CUDA out of memory",
        "base model, ddim, T=5 · FID 60.00",
        "fine-tuned, ddim, T=5 · FID 45.00 (trial t00)",
        "fine-tuned, ddim, T=10 · FID 29.00 (trial t03)",
        "optuna-fanova",
        "finetune.lr",
        "19m 05s",
    ):
        assert needle in text, needle
    board = text[text.index('<section id="leaderboard">') :]
    assert board.index("t06") < board.index("t03")  # leaderboard order: best FID first


def test_report_final_protocol_section(built: tuple[Path, str, float]) -> None:
    """The final-protocol tables (fixture FINAL_FIDS) near the top: per space, the protocol sentence, the
    verdicts (rows within 2 std marked), and every baseline."""
    text = built[0].read_text()
    assert text.index('<section id="final">') < text.index('<section id="leaderboard">')
    final = text[text.index('<section id="final">') : text.index('<section id="leaderboard">')]
    assert final.index("Space classifier (primary)") < final.index("Space inception")
    assert "Training-free baselines (final protocol)" in final
    for needle in (
        "k = 3 fresh noise seeds × N = 64 images per seed, against the reference digits:heldout, "
        "in feature space classifier",
        "1.000 ± 0.100",  # t00 at T=5
        "1.900 ± 0.300",  # t03 at T=10
        "dpmpp_2m/trailing",
        "31.000 ± 1.000",
        "3.100 ± 0.100",  # a baseline that is not the best one: only in the baselines table
        "inception: N=64 &lt; 2048 features: FID biased",
    ):
        assert needle in final, needle
    classifier = final[final.index("Space classifier") : final.index("Space inception")]
    # the floor (real training images, fixture 0.8 +- 0.1) under the classifier table only
    assert "Real training images scored the same way (N = 64 per seed): final FID 0.800 ± 0.100" in classifier
    assert final.count("Real training images scored the same way") == 1
    rows = re.findall(r"<tr>(.*?)</tr>", classifier, re.S)[1:]  # header first
    assert len(rows) == 2
    assert ">better<" in rows[0] and "noise" not in rows[0]
    assert ">within noise<" in rows[1] and 'class="data row1 col0 noise"' in rows[1]


def test_report_renders_in_chromium(built: tuple[Path, str, float], tmp_path: Path) -> None:
    path = built[0]
    shot = tmp_path / "report.png"
    proc = _chromium(
        f"--screenshot={shot}",
        "--window-size=1280,4000",
        "--virtual-time-budget=5000",
        path.resolve().as_uri(),
        profile=tmp_path / "profile-shot",
    )
    assert shot.is_file(), proc.stderr[-2000:]
    img = Image.open(shot)
    assert img.size == (1280, 4000)
    pixels = np.asarray(img.convert("L"), dtype=float)
    assert pixels.std() > 20, "screenshot is blank"
    assert (pixels < 128).mean() > 0.01, "screenshot has almost no dark pixels (text, plots)"
    keep = os.environ.get("MMDSWEEP_KEEP_SCREENSHOT")
    if keep:
        Path(keep).write_bytes(shot.read_bytes())

    # Every <img> decoded by the browser: a copy of the report with a checking script, DOM dumped.
    probe = path.parent / ".probe.html"
    script = (
        "<script>window.addEventListener('load', function () {"
        " var imgs = Array.from(document.images);"
        " var bad = imgs.filter(function (i) { return !i.complete || i.naturalWidth === 0; }).length;"
        " document.body.setAttribute('data-img-check', 'total=' + imgs.length + ' broken=' + bad);"
        "});</script>"
    )
    probe.write_text(path.read_text().replace("</body>", script + "</body>"))
    try:
        proc = _chromium(
            "--dump-dom",
            "--virtual-time-budget=5000",
            probe.resolve().as_uri(),
            profile=tmp_path / "profile-dom",
        )
    finally:
        probe.unlink()
    match = re.search(r'data-img-check="total=(\d+) broken=(\d+)"', proc.stdout)
    assert match, f"image check did not run: {proc.stderr[-2000:]}"
    assert int(match.group(1)) == len(EXPECTED_PNGS)
    assert int(match.group(2)) == 0


def test_missing_trials_parquet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert R.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("error:") and "trials.parquet" in err
    with pytest.raises(FileNotFoundError):
        R.build_report(tmp_path)


def test_report_without_models_or_speed(tmp_path: Path) -> None:
    d = build_sweep(tmp_path, sweep_id="bare", models=False, speed=False, evaluation=False)
    out = R.build_report(d, tmp_path / "out", samples=True)
    text = out.read_text()
    assert "section failed" not in text
    assert "The final protocol has not run for this sweep: there is no evaluation.parquet" in text
    assert "No speed.parquet" in text and "lists no exported models" in text
    assert {p.name for p in out.parent.glob("*.png")} == {
        "pareto_timesteps.png",
        "learning_curves.png",
        "sensitivity.png",
    }


def test_failing_section_is_reported(
    results_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    d = tmp_path / "sweep"
    shutil.copytree(results_dir, d, ignore=shutil.ignore_patterns("report", "checkpoints"))
    shutil.rmtree(d / "exported" / "T10")
    text = R.build_report(d, num_samples=4, device="cpu").read_text()
    assert text.count("section failed") == 1 and "T10" in text
    assert "report section 'Samples: base vs fine-tuned' failed" in capsys.readouterr().err


@pytest.mark.slow
def test_report_on_a_real_sweep(tiny_sweep: tuple[Path, str], tmp_path: Path) -> None:
    """The report of a sweep that mmdsweep.tune really ran: every figure present and decodable."""
    import json

    sdir, _ = tiny_sweep
    out = tmp_path / "report"
    assert R.main([str(sdir), "--out", str(out), "--num-samples", "16", "--device", "cpu"]) == 0
    html = (out / "report.html").read_text()
    parser = _Images()
    parser.feed(html)
    assert not parser.external
    exports = json.loads((sdir / "sweep.json").read_text())["exports"]
    # Pareto (T and time), learning curves, sensitivity, and base + fine-tuned grids per exported T
    assert len(parser.srcs) >= 4 + 2 * len(exports)
    for src in parser.srcs:
        assert _decode_data_uri(src).size[0] > 10
    for T in exports:
        assert (out / f"samples_T{T}_base.png").is_file() and (out / f"samples_T{T}_finetuned.png").is_file()
    assert "diverged" in html
