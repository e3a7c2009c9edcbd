"""What an exported run must hold, computed from ``gp.Run``'s frames (independently of
:mod:`gradprobe.integrations.export`), and readers of what TensorBoard and W&B wrote."""

from __future__ import annotations

import json
import math
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import gradprobe as gp
from gradprobe.integrations.export import DEFAULT_COLUMNS

NAN_STEP = 3


def train(run_dir: Path, steps: int = 5, *, on_step=None) -> gp.Run:
    """A real run: Linear-Tanh-Linear, histograms every step, a flush every 2 steps, and a NaN
    planted in the Tanh's output (layer ``1``) at step :data:`NAN_STEP`. ``on_step(probe, s)``
    is called after each optimizer step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    at = [0]

    def plant(module, args, out):
        if at[0] == NAN_STEP:
            out = out.clone()
            out[0, 0] = float("nan")
            return out
        return None

    model[1].register_forward_hook(plant)  # before the Probe's hook: the Probe sees the NaN
    with gp.Probe(model, opt, run_dir=run_dir, hist_every=1, hist_bins=8,
                  flush_every=2) as probe:
        for s in range(steps):
            at[0] = s
            loss = model(torch.randn(16, 3)).pow(2).mean()
            probe.observe_loss(loss)
            loss.backward()
            opt.step()
            opt.zero_grad()
            with torch.no_grad():  # keep the weights finite after the NaN step
                for p in model.parameters():
                    p.nan_to_num_(0.0)
            if on_step is not None:
                on_step(probe, s)
    return gp.Run.open(run_dir)


def expected_scalars(run: gp.Run) -> dict[str, dict[int, float]]:
    """tag -> step -> value, from ``run.scalars()`` and ``run.losses()``: finite values only,
    ``nonfinite/...`` at every recorded (step, layer, kind)."""
    out: dict[str, dict[int, float]] = {}
    for row in run.scalars().to_dict("records"):
        kind, layer, step = row["kind"], row["layer"], int(row["step"])
        out.setdefault(f"nonfinite/{kind}/{layer}", {})[step] = float(row["nonfinite"])
        for col in DEFAULT_COLUMNS[kind]:
            value = float(row["norm" if col == "ratio" else col])
            if math.isfinite(value):
                out.setdefault(f"{kind}/{col}/{layer}", {})[step] = value
    for step, loss in zip(run.losses()["step"], run.losses()["loss"]):
        out.setdefault("nonfinite/loss", {})[int(step)] = 0.0 if math.isfinite(loss) else 1.0
        if math.isfinite(loss):
            out.setdefault("probe/loss", {})[int(step)] = float(loss)
    for ev in run.events().to_dict("records"):
        out.setdefault("events/nonfinite_layers", {})[int(ev["step"])] = float(ev["n_layers"])
    return out


def expected_histograms(run: gp.Run) -> dict[str, dict[int, tuple[list[float], list[int]]]]:
    """tag -> step -> (edges, counts) of the stored histograms holding a finite value."""
    out: dict[str, dict[int, tuple[list[float], list[int]]]] = {}
    for row in run.histograms().to_dict("records"):
        if sum(row["counts"]) > 0:
            tag = f"{row['kind']}/hist/{row['layer']}"
            out.setdefault(tag, {})[int(row["step"])] = (row["bin_edges"], row["counts"])
    return out


def read_tensorboard(log_dir: Path) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0,
                                                         "tensors": 0})
    acc.Reload()
    return acc


def check_tensorboard(log_dir: Path, run: gp.Run) -> None:
    """Every scalar and histogram in the event files equals the run's, once per step."""
    acc = read_tensorboard(log_dir)
    want = expected_scalars(run)
    assert set(acc.Tags()["scalars"]) == set(want)
    for tag, by_step in want.items():
        got = acc.Scalars(tag)
        assert [e.step for e in got] == sorted(by_step), tag  # each step once, in order
        for e in got:  # TensorBoard stores float32
            assert e.value == np.float32(by_step[e.step]), (tag, e.step, e.value)
    hists = expected_histograms(run)
    assert set(acc.Tags()["histograms"]) == set(hists)
    for tag, by_step in hists.items():
        got = acc.Histograms(tag)
        assert [e.step for e in got] == sorted(by_step), tag
        for e in got:
            edges, counts = by_step[e.step]
            h = e.histogram_value
            assert list(h.bucket) == counts and list(h.bucket_limit) == edges[1:], (tag, e.step)
            assert h.min == edges[0] and h.num == sum(counts)
    texts = acc.Tensors("events/nonfinite/text_summary")
    events = run.events()
    assert [t.step for t in texts] == [int(s) for s in events["step"]]
    for t, ev in zip(texts, events.to_dict("records")):
        line = t.tensor_proto.string_val[0].decode()
        assert f"step {ev['step']}" in line and f"layer '{ev['layer']}'" in line, line


def _wandb_records(data: bytes) -> list[Any]:
    """The records of a ``.wandb`` file (W&B's record log: LevelDB log format, 32 KiB blocks,
    7-byte chunk headers; each record a ``wandb_internal_pb2.Record``)."""
    from wandb.proto import wandb_internal_pb2 as pb

    assert data[:4] == b":W&B"
    records: list[Any] = []
    pos, buf, block = 7, b"", 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding at the end of a block
            pos += left
            continue
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk
            record = pb.Record()
            record.ParseFromString(buf)
            records.append(record)
            buf = b""
    return records


def read_wandb(root: Path, timeout: float = 20.0) -> list[dict[str, Any]]:
    """The history rows of the one offline run under ``root``, read from W&B's ``.wandb`` file
    once it ends with its ``exit`` record (W&B's service may still be writing it after
    ``finish()`` returned)."""
    deadline = time.monotonic() + timeout
    while True:
        (path,) = root.glob("wandb/offline-run-*/run-*.wandb")
        records = _wandb_records(path.read_bytes())
        if records and records[-1].WhichOneof("record_type") == "exit":
            break
        assert time.monotonic() < deadline, f"{path} has no exit record after {timeout} s"
        time.sleep(0.05)
    rows: list[dict[str, Any]] = []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                keys = list(item.nested_key) or [item.key]
                value = json.loads(item.value_json)
                if len(keys) == 1:
                    row[keys[0]] = value
                else:
                    row.setdefault("/".join(keys[:-1]), {})[keys[-1]] = value
            rows.append(row)
    return rows


def check_wandb(rows: list[dict[str, Any]], run: gp.Run) -> None:
    """The history rows carrying ``probe/step`` hold every scalar and histogram of the run, each
    step once (the values are JSON floats: equal exactly)."""
    ours = [r for r in rows if "probe/step" in r]
    steps = [r["probe/step"] for r in ours]
    assert steps == sorted(set(steps)) == sorted(set(run.losses()["step"].astype(int)))
    by_step = {r["probe/step"]: r for r in ours}
    want = expected_scalars(run)
    keys = {k for r in ours for k, v in r.items()  # W&B's own keys start with "_"
            if isinstance(v, (int, float)) and not k.startswith("_")} - {"probe/step"}
    assert keys == set(want), keys ^ set(want)
    for tag, values in want.items():
        got = {s: r[tag] for s, r in by_step.items() if tag in r}
        assert got == values, tag
    hists = expected_histograms(run)
    keys = {k for r in ours for k, v in r.items() if isinstance(v, dict)}
    assert keys == set(hists), keys ^ set(hists)
    for tag, values in hists.items():
        got = {s: (r[tag]["bins"], r[tag]["values"]) for s, r in by_step.items() if tag in r}
        assert got == values, tag
    texts = {s: r["events/nonfinite"] for s, r in by_step.items() if "events/nonfinite" in r}
    assert sorted(texts) == [int(s) for s in run.events()["step"]]
