"""Size and render time of the HTML report for a large run (run by hand).

    python benchmarks/report_size.py                      # 100 Linear+Tanh blocks, 10,000 steps
    python benchmarks/report_size.py --blocks 20 --steps 1000 --keep runs/big

Records a synthetic run with the Probe: ``--blocks`` blocks of ``nn.Linear(8, 8)`` and
``nn.Tanh()`` (so 2 x blocks tracked modules, ``blocks`` weight layers), batch 16, SGD, all
statistic kinds every step, histograms every 100 steps. Then times ``Run.scalars`` (the
reader), ``gp.report`` (reading plus figures plus HTML) and, when chromium is installed, the
browser's load of the page, and prints the file size and each figure's embedded format and size.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import gradprobe as gp


def record(path: Path, blocks: int, steps: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(blocks) for m in (nn.Linear(8, 8), nn.Tanh())])
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gp.Probe(model, opt, run_dir=path, hist_every=100, overwrite=True) as probe:
        for _ in range(steps):
            x = torch.randn(16, 8)
            loss = (model(x) - x.flip(1)).pow(2).mean()
            probe.observe_loss(loss)
            loss.backward()
            opt.step()
            opt.zero_grad()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=100)
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--keep", type=Path, default=None, help="run directory to keep/reuse")
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp())
    run_dir = args.keep or root / "run"
    if not (run_dir / "meta.json").is_file():
        t = time.perf_counter()
        record(run_dir, args.blocks, args.steps)
        print(f"recorded {args.steps} steps in {time.perf_counter() - t:.0f} s")
    run = gp.Run.open(run_dir)
    # wall time and this process's CPU time (the CPU time moves less on a shared machine)
    t, c = time.perf_counter(), time.process_time()
    rows = len(run.scalars(kinds=["grad", "weight", "act", "act_grad"]))
    print(f"Run.scalars: {rows} rows in {time.perf_counter() - t:.1f} s "
          f"(CPU {time.process_time() - c:.1f} s)")
    t, c = time.perf_counter(), time.process_time()
    out = gp.report(run, root / "report.html")
    print(f"gp.report: {time.perf_counter() - t:.1f} s (CPU {time.process_time() - c:.1f} s), "
          f"{out.stat().st_size / 1e6:.2f} MB")
    text = out.read_text()
    for m in re.finditer(r'id="fig-([a-z-]+)"><img[^>]*src="data:image/([a-z]+)[^,]*,([^"]+)',
                         text):
        print(f"  {m.group(1):18s} {m.group(2):4s} {len(m.group(3)) / 1e3:6.0f} kB")
    chromium = shutil.which("chromium")
    if chromium:
        t = time.perf_counter()
        dom = subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             f"--user-data-dir={tempfile.mkdtemp()}", "--dump-dom", out.as_uri()],
            capture_output=True, text=True, timeout=120)
        found = re.search(r'data-figures="([^"]*)"', dom.stdout)
        print(f"chromium: loaded in {time.perf_counter() - t:.1f} s (browser start included), "
              f"figures decoded {found.group(1) if found else '?'}")


if __name__ == "__main__":
    main()
