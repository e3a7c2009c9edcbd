"""Where a sweep's configurations run: a local process pool, or Ray Tune trials.

Both call :func:`gradprobe.lab.sweep_task.execute` once per configuration and yield its record
as each finishes; neither raises for a failing configuration (a worker that dies is reported as
that configuration's error). Ray is imported only here, only when asked for.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from gradprobe.errors import ConfigError
from gradprobe.lab.sweep_task import TaskConfig, execute, read_record

Todo = Sequence[tuple[TaskConfig, str]]


def one_thread() -> None:
    """Each worker runs torch on one intra-op thread: a lab network is far too small to gain
    from more, and ``workers`` processes of several threads each would oversubscribe the CPUs."""
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


def failed(config: TaskConfig, name: str, why: str) -> dict[str, Any]:
    """The record of a configuration whose worker did not return one."""
    import dataclasses

    return {"name": name, "config": dataclasses.asdict(config), "error": why}


def quiet(line: str) -> None:
    """The default ``notify``: says nothing."""


def announce(record: dict[str, Any], notify: Callable[[str], None]) -> dict[str, Any]:
    """Say that a configuration finished (``done NAME (s)`` or ``failed NAME: error``)."""
    notify(f"failed {record['name']}: {record['error']}" if record.get("error")
           else f"done {record['name']} ({record.get('seconds', 0.0):.1f} s)")
    return record


def local_pool(todo: Todo, root: Path, *, workers: int, address: str | None = None,
               notify: Callable[[str], None] = quiet) -> Iterator[dict[str, Any]]:
    """Run ``todo`` in ``workers`` spawned processes (in this process when ``workers`` is 1 or
    there is one configuration: no process to start)."""
    if workers == 1 or len(todo) == 1:
        for config, name in todo:
            yield announce(execute(config, root, name), notify)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    # spawn, not fork: a forked child inherits torch's thread pools and any lock held in them
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=context,
                             initializer=one_thread) as pool:
        futures = {pool.submit(execute, config, root, name): (config, name)
                   for config, name in todo}
        for future in as_completed(futures):
            config, name = futures[future]
            try:
                record = future.result()
            except Exception as exc:  # the process died (BrokenProcessPool), or pickling failed
                record = failed(config, name, f"worker process failed: {type(exc).__name__}: "
                                f"{exc} (the workers are spawned and import the calling script: "
                                "call gp.lab.sweep under `if __name__ == '__main__':`)")
            yield announce(record, notify)


def import_ray() -> tuple[Any, Any]:
    """``(ray, ray.tune)``, or a ConfigError naming the extra to install."""
    try:
        import ray
        from ray import tune
    except ImportError:
        raise ConfigError("the Ray backend needs Ray Tune, which is not installed",
                          hint="pip install gradprobe[ray]  (or use the local backend)") from None
    return ray, tune


def trial(params: dict[str, Any], *, configs: dict[str, TaskConfig], root: str) -> None:
    """One Ray Tune trial: the configuration named ``params["run"]``, reported as JSON."""
    from ray import tune

    one_thread()
    name = params["run"]
    record = execute(configs[name], root, name)
    tune.report({"record": json.dumps(record, default=str)})


def ray_pool(todo: Todo, root: Path, *, workers: int, address: str | None = None,
             notify: Callable[[str], None] = quiet) -> Iterator[dict[str, Any]]:
    """Run ``todo`` as trials of one Ray Tune ``Tuner`` (a grid search over the run names),
    at most ``workers`` at once, one CPU each. Joins the cluster at ``address`` when given,
    else starts a local Ray instance of ``workers`` CPUs; shuts down only what it started."""
    ray, tune = import_ray()
    configs = {name: config for config, name in todo}
    started = not ray.is_initialized()
    if started:
        options: dict[str, Any] = {"log_to_driver": False, "logging_level": "WARNING"}
        if address is None:
            options.update(num_cpus=workers, include_dashboard=False)
        start = time.perf_counter()
        ray.init(address=address, **options)
        notify(f"ray: {'joined ' + address if address else 'started a local instance'} in "
               f"{time.perf_counter() - start:.1f} s")
    records: dict[str, dict[str, Any]] = {}

    class Progress(tune.Callback):  # type: ignore[misc,name-defined]
        """Says each configuration as its trial reports (Tuner.fit returns only at the end)."""

        def on_trial_result(self, iteration: int, trials: Any, trial: Any, result: dict[str, Any],
                            **info: Any) -> None:
            name = trial.config.get("run")
            if name in configs and "record" in result:
                records[name] = announce(_record(result["record"], configs[name], name, root),
                                         notify)

    storage = root / ".ray"
    shutil.rmtree(storage / "tune", ignore_errors=True)  # the previous sweep's trial logs
    previous = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # the classic reporter: silent at verbose=0
    try:
        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(trial, configs=configs, root=str(root)),
                                {"cpu": 1}),
            param_space={"run": tune.grid_search(list(configs))},
            tune_config=tune.TuneConfig(max_concurrent_trials=workers, reuse_actors=True),
            run_config=tune.RunConfig(storage_path=str(storage), name="tune", verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=0),
                                      callbacks=[Progress()]),
        )
        results = tuner.fit()
    finally:
        if previous is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = previous
        if started:
            ray.shutdown()
    seen = set()
    for result in results:
        name = (result.config or {}).get("run")
        if name not in configs:
            continue
        seen.add(name)
        yield records[name] if name in records and result.error is None else \
            announce(_collect(result, configs[name], name, root), notify)
    for name in configs.keys() - seen:
        yield announce(failed(configs[name], name, "Ray Tune returned no result for this "
                              "configuration"), notify)


def _collect(result: Any, config: TaskConfig, name: str, root: Path) -> dict[str, Any]:
    """A trial's record; an error if the trial failed or its run is not in ``root`` (written
    on another machine of the cluster)."""
    text = (result.metrics or {}).get("record")
    if result.error is not None or text is None:
        why = result.error if result.error is not None else "the trial reported nothing"
        return failed(config, name, f"Ray trial failed: {' '.join(str(why).split())[:300]}")
    return _record(text, config, name, root)


def _record(text: str, config: TaskConfig, name: str, root: Path) -> dict[str, Any]:
    """The record a trial reported (JSON), checked to be readable in ``root``."""
    record: dict[str, Any] = json.loads(text)
    if not record.get("error") and read_record(root / name) is None:
        return failed(config, name, f"the run was written where this machine cannot see it: "
                      f"with a Ray cluster, --out must be a folder every node shares ({root})")
    return record


__all__ = ["announce", "failed", "import_ray", "local_pool", "one_thread", "ray_pool", "trial"]
