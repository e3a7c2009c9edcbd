"""The report of the main job's deep sigmoid network, and the screenshot in docs/report.png
(run by hand).

    python benchmarks/report_demo.py [--out results/report_demo]

Trains ``examples/deep_sigmoid.py`` (the circles study's sigmoid network, 10 hidden layers of
5 units, ``N(0, 1)`` weights, RMSprop) under ``gp.Probe(..., hist_every=60)`` -- the three
lines the README shows -- then writes ``report.html`` and, with chromium installed,
``report.png`` (the top of the page, reduced to a palette PNG under 400 kB); copy it to
docs/report.png.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

import gradprobe as gp

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "deep_sigmoid.py"


def train(run_dir: Path) -> gp.Run:
    spec = importlib.util.spec_from_file_location("deep_sigmoid", EXAMPLE)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    torch.manual_seed(0)
    model, optimizer = example.make()
    with gp.Probe(model, optimizer, run_dir=run_dir, hist_every=60, overwrite=True) as probe:
        example.train(model, optimizer, probe)
    return probe.run


def screenshot(html: Path, png: Path, height: int) -> None:
    from PIL import Image

    chromium = shutil.which("chromium")
    if chromium is None:
        print("chromium not installed: no screenshot")
        return
    full = png.with_suffix(".full.png")
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                    "--hide-scrollbars", f"--user-data-dir={tempfile.mkdtemp()}",
                    f"--window-size=1100,{height}", f"--screenshot={full}", html.as_uri()],
                   check=True, capture_output=True, timeout=120)
    image = Image.open(full).convert("RGB")
    image = image.resize((image.width * 9 // 10, image.height * 9 // 10), Image.LANCZOS)
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(png, optimize=True)
    full.unlink()
    print(f"{png}: {png.stat().st_size / 1e3:.0f} kB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/report_demo"))
    parser.add_argument("--height", type=int, default=2000, help="screenshot height (px)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    run = train(args.out / "run")
    html = gp.report(run, args.out / "report.html", title="Deep sigmoid network on circles (examples/deep_sigmoid.py)")
    print(f"{html}: {html.stat().st_size / 1e3:.0f} kB")
    screenshot(html.resolve(), args.out / "report.png", args.height)


if __name__ == "__main__":
    main()
