"""The report of a deep sigmoid network, and the screenshot in docs/report.png (run by hand).

    python benchmarks/report_demo.py [--out results/report_demo]

Trains a 10-hidden-layer sigmoid MLP (width 32, PyTorch's default initialisation, SGD lr 0.5)
on two concentric circles for 200 steps under ``gp.Probe(..., hist_every=20)``: the textbook
case of vanishing gradients (each sigmoid passes back at most 1/4 of the gradient). Writes the
run, ``report.html`` and, with chromium installed, ``report.png`` (the top of the page, reduced
to a palette PNG under 400 kB); copy it to docs/report.png.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import nn

import gradprobe as gp


def train(run_dir: Path) -> gp.Run:
    from sklearn.datasets import make_circles

    torch.manual_seed(0)
    x, y = make_circles(n_samples=2048, noise=0.05, factor=0.5, random_state=0)
    x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    layers: list[nn.Module] = [nn.Linear(2, 32), nn.Sigmoid()]
    for _ in range(9):
        layers += [nn.Linear(32, 32), nn.Sigmoid()]
    model = nn.Sequential(*layers, nn.Linear(32, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    gen = torch.Generator().manual_seed(0)
    with gp.Probe(model, opt, run_dir=run_dir, hist_every=20, overwrite=True) as probe:
        for _ in range(200):
            idx = torch.randint(0, len(x), (64,), generator=gen)
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            probe.observe_loss(loss)
            loss.backward()
            opt.step()
            opt.zero_grad()
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
    html = gp.report(run, args.out / "report.html", title="Deep sigmoid MLP on circles")
    print(f"{html}: {html.stat().st_size / 1e3:.0f} kB")
    screenshot(html.resolve(), args.out / "report.png", args.height)


if __name__ == "__main__":
    main()
