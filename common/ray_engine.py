"""Ray Data for the corpus-sized jobs (`compute.engine=ray`): a function over batches of segment ids, run on actors.

A job (corpus embedding, prefix precomputation) plans its batches of segment ids exactly as its single-process
path does, and hands them to `run_batches` with a *worker factory*: a picklable zero-argument callable that
each Ray actor calls once (loading the model there) and that returns the function the local path applies to a
batch, `ids (n,) int64 -> {name: array}`. The outputs come back in the order of the batches, so the job writes
them through its own shard and manifest code, and the artifacts are those of the local path.

What crosses Ray is small and typed: a row per batch (`seq`, the ids padded to the widest batch with -1, the
count), and per batch one `.npz` byte string of the worker's arrays (numpy's own format, read back with
`allow_pickle=False`). Ray Data schedules, retries and streams; nothing here is a scheduler of its own.

`ray_session` starts a local Ray (`address=None`: no dashboard, workers' logs kept out of the terminal) or joins
`address`, and stops only a Ray it started; a Ray the caller already runs (a test's fixture) is reused as it is.
Workers get the repo on PYTHONPATH and the driver's offline settings, so they import this code and load models
from the same local files.
"""

from __future__ import annotations

import io
import logging
import os
import re
import socket
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.errors import UserError

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
# Environment a worker needs to load the same local models offline as the driver (copied when set).
_FORWARDED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "HF_HUB_CACHE", "PREFIXRAG_CACHE",
                  "TOKENIZERS_PARALLELISM")

_ERROR_LINE = re.compile(r"^[\w.]*(?:Error|Exception): .*$", re.MULTILINE)

BatchFn = Callable[[np.ndarray], dict[str, np.ndarray]]
WorkerFactory = Callable[[], BatchFn]


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide a job runs on Ray (from `compute.*`; `RayOptions.from_config`)."""

    address: str | None = None  # None: a local Ray for this job
    workers: int = 2  # actors, each with its own copy of the model
    cpus_per_worker: float = 1.0  # Ray CPUs per actor, also its torch threads (at least 1)
    gpus_per_worker: float = 0.0
    progress: bool = False  # Ray Data's progress bars

    @classmethod
    def from_config(cls, compute, progress: bool = False) -> RayOptions:
        return cls(address=compute.ray_address, workers=compute.ray_workers,
                   cpus_per_worker=compute.ray_cpus_per_worker, gpus_per_worker=compute.ray_gpus_per_worker,
                   progress=progress)


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401  (ray without the [data] extra lacks it)
    except ImportError as err:
        raise UserError(
            f"compute.engine=ray needs Ray Data ({err}); install it with `pip install \"ray[data]==2.60.0\"` "
            "(requirements.txt) or set compute.engine=local"
        ) from err
    return ray


def _runtime_env() -> dict:
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {"PYTHONPATH": path, **{k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}}
    return {"env_vars": env}


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Refuse a `host:port` (or `ray://host:port`) nobody answers on, at once: Ray itself retries for minutes."""
    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        return  # `auto`, `local`: Ray resolves these itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as err:
        raise UserError(
            f"compute.ray_address={address!r}: nothing answers at {host}:{port} ({err.strerror or err}); start the "
            "cluster (`ray start --head`) or give its address, or set compute.ray_address=null for a local Ray"
        ) from err


def _reasons(err: BaseException) -> str:
    """The first line of `err` and of each exception it was raised from (Ray puts the real reason, e.g. a
    missing auth token, two causes deep under `Failed to connect`)."""
    lines, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        text = str(err).strip()
        # The first line, and the last `SomeError: …` line of a traceback Ray pasted into the message.
        found = [text.splitlines()[0] if text else type(err).__name__]
        found += [m.group(0) for m in _ERROR_LINE.finditer(text)][-1:]
        lines += [line for line in found if line not in lines]
        err = err.__cause__ or err.__context__
    return "; ".join(lines)


@contextmanager
def ray_session(options: RayOptions, num_cpus: int | None = None) -> Iterator[None]:
    """Ray running for the duration: reused when this process already runs one, else started (local, with
    `num_cpus` or the machine's cores, at least what the actors ask for) or joined (`options.address`)."""
    ray = _import_ray()
    if ray.is_initialized():
        yield
        return
    local = options.address is None
    if not local:
        _check_reachable(options.address)
    need = max(1, int(np.ceil(options.workers * options.cpus_per_worker)))
    try:
        ray.init(
            address=options.address,
            # At least what the actors ask for, else they would wait forever for a CPU.
            num_cpus=max(need, num_cpus or os.cpu_count() or 1) if local else None,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env=_runtime_env(),
        )
    except (ConnectionError, TimeoutError, RuntimeError, ValueError) as err:
        where = "a local Ray" if local else f"the Ray cluster at compute.ray_address={options.address!r}"
        raise UserError(f"could not start or reach {where}: {_reasons(err)}") from err
    try:
        yield
    finally:
        ray.shutdown()


def pad_batches(batches: Sequence[np.ndarray]) -> list[dict]:
    """One row per batch: `seq`, `ids` padded with -1 to the widest batch (a fixed-shape tensor column), `count`."""
    width = max((len(b) for b in batches), default=0)
    rows = []
    for seq, ids in enumerate(batches):
        padded = np.full(width, -1, dtype=np.int64)
        padded[: len(ids)] = ids
        rows.append({"seq": seq, "ids": padded, "count": len(ids)})
    return rows


def to_npz(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def from_npz(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


class _BatchActor:
    """The callable class of `map_batches`: one per actor; builds its worker once, then serves batches.

    A UserError of the worker (a model that does not load, another encoder) is returned with the batch rather
    than raised: Ray would restart an actor whose constructor raises, and wrap the message in its own error;
    the driver raises it as it was.
    """

    def __init__(self, make_worker: WorkerFactory, threads: int):
        try:
            import torch

            torch.set_num_threads(threads)
        except ImportError:
            pass
        self.fn, self.error = None, ""
        try:
            self.fn = make_worker()
        except UserError as err:
            self.error = str(err)

    def _run(self, ids: np.ndarray) -> tuple[bytes, str]:
        if self.fn is None:
            return b"", self.error
        try:
            return to_npz(self.fn(ids)), ""
        except UserError as err:
            return b"", str(err)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        done = [self._run(ids[:count]) for ids, count in zip(batch["ids"], batch["count"])]
        return {"seq": batch["seq"], "out": np.array([d for d, _ in done], dtype=object),
                "error": np.array([e for _, e in done], dtype=object)}


def run_batches(batches: Sequence[np.ndarray], make_worker: WorkerFactory, options: RayOptions) -> Iterator[dict]:
    """Yield `make_worker()(ids)` for every batch of `batches`, in order, computed on `options.workers` actors.

    Each batch goes to one actor whole, so a batch holds the same segments as in the local path. A UserError
    raised in a worker (a model that does not load, another encoder) is raised here with its message.
    """
    if not batches:
        return
    ray = _import_ray()
    with ray_session(options):
        ctx = ray.data.DataContext.get_current()
        saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars)
        ctx.execution_options.preserve_order = True
        ctx.enable_progress_bars = options.progress
        try:
            ds = ray.data.from_items(pad_batches(batches)).map_batches(
                _BatchActor,
                fn_constructor_kwargs={"make_worker": make_worker,
                                       "threads": max(1, int(options.cpus_per_worker))},
                batch_size=1,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=options.workers),
                num_cpus=options.cpus_per_worker,
                num_gpus=options.gpus_per_worker or None,
            )
            expected = 0
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1):
                for seq, data, error in zip(batch["seq"], batch["out"], batch["error"]):
                    if error:
                        raise UserError(str(error))
                    if int(seq) != expected:
                        raise RuntimeError(f"Ray returned batch {int(seq)} where batch {expected} was due")
                    expected += 1
                    yield from_npz(data)
            if expected != len(batches):
                raise RuntimeError(f"Ray returned {expected} of {len(batches)} batches")
        finally:
            ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved
