"""Running convscope's work on a Ray cluster: the one module that imports Ray.

Ray is an optional extra (``pip install 'convscope[ray]'``) and is imported only when a run asks
for it. Everything else sees three values:

* :class:`RayTarget`: where to run (``--ray auto`` or ``--ray HOST:PORT``), resolved once at the
  edge by :func:`parse_ray`; :meth:`RayTarget.session` connects (or starts a local cluster) and
  disconnects afterwards.
* an executor: :class:`LocalExecutor` runs work units in this process, :class:`RayExecutor` on a
  pool of actors, each of which loads the model once. Both have the same :meth:`~LocalExecutor.map`
  (work units) and :meth:`~LocalExecutor.scan` (a dataset scan), so the atlas stages and the CLI
  call one interface and never touch Ray.
* :func:`scan_shards`: the dataset scan as a Ray Data pipeline (``map_batches`` over shards of the
  file list, one partial :class:`~convscope.methods.scan.TopK` per shard, folded on the driver
  with the associative :meth:`TopK.merge <convscope.methods.scan.TopK.merge>`).

A worker loads the network from the arguments of :func:`~convscope.sources.load_model` that made
the driver's (``LoadedModel.source``), or, for a user's own module, from a pickled copy; either
way its fingerprint must equal the driver's, so a node with other weights in its cache is refused
rather than mixed in. Actors are restarted and their calls retried when a worker process dies
(``max_restarts``/``max_task_retries``); when every worker is gone for good the run stops with a
:class:`~convscope.errors.ConvscopeError` and the units already done stay written.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import ConvscopeError
from .models import LoadedModel, fingerprint
from .precision import FP32, Precision

__all__ = ["RayTarget", "parse_ray", "require_ray", "local_cluster_options", "LocalExecutor", "RayExecutor",
           "load_worker_model", "scan_shards", "RESTARTS", "PRELOAD_MODULES"]

INSTALL_HINT = "pip install 'convscope[ray]'"
# How often a dead worker is restarted (and its unit retried) before the run gives up on it.
RESTARTS = 3
# Each actor asks Ray for this share of a CPU: on a small machine a pool of whole-CPU actors
# leaves nothing for Ray Data's read tasks and the pipeline stalls. The actor's torch threads
# are set separately (``threads``).
ACTOR_CPUS = 0.5
# Modules a local cluster's worker processes import as they start (Ray's ``preload_python_modules``):
# a worker's own start is mostly these imports (torch ~3 s, timm ~6 s on an idle 2-core machine), so
# the raylet's first workers do them while the driver is still busy and an actor then starts in
# about a second. On a real cluster the same comes from ``RAY_preload_python_modules`` (README).
PRELOAD_MODULES = ("torch", "timm", "convscope")


def require_ray():
    """The ``ray`` module, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ConvscopeError(f"--ray needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


@dataclass(frozen=True)
class RayTarget:
    """Where a run's workers are: a cluster address, or ``None`` for ``auto``.

    Attributes:
        address: ``HOST:PORT`` of a running cluster's head (or ``ray://...``); None means ``auto``:
            the cluster in ``RAY_ADDRESS`` when set, else a new local one on 127.0.0.1.
        workers: actors in the pool (default: one per GPU, else the cluster's CPUs divided by ``threads``).
        threads: torch threads per actor (default: this process's torch threads, so that each actor
            computes exactly what a local run would; with ``workers`` given, the CPUs shared among them).
    """

    address: str | None = None
    workers: int | None = None
    threads: int | None = None

    def describe(self) -> str:
        return self.address or (f"RAY_ADDRESS={os.environ['RAY_ADDRESS']}" if os.environ.get("RAY_ADDRESS")
                                else "a local cluster")

    @contextlib.contextmanager
    def session(self) -> Iterator[Any]:
        """Connected to the cluster inside; a cluster this call started is stopped after.

        A Ray already initialised in this process (a notebook, the test suite) is used as it is
        and left running.
        """
        ray = require_ray()
        address = self.address or os.environ.get("RAY_ADDRESS") or None
        if address and not address.startswith("ray://") and address != "auto":
            _check_reachable(address)
        if ray.is_initialized():
            yield ray
            return
        try:
            if address:
                ray.init(address=address, log_to_driver=False, configure_logging=False)
            else:
                ray.init(**local_cluster_options())
        except ConvscopeError:
            raise
        except Exception as err:
            where = f"the Ray cluster at {address}" if address else "a local Ray cluster"
            raise ConvscopeError(f"could not connect to {where} ({type(err).__name__}: "
                                 f"{_last_line(err)[:200]}); start it with `ray start --head` or use --ray auto"
                                 ) from None
        try:
            yield ray
        finally:
            ray.shutdown()

    def plan(self, ray) -> tuple[int, int, float]:
        """``(workers, torch threads per worker, GPUs per worker)`` for the connected cluster."""
        resources = ray.cluster_resources()
        cpus = max(1, int(resources.get("CPU", 1)))
        gpus = int(resources.get("GPU", 0))
        if self.threads:
            threads = self.threads
        elif self.workers:
            threads = max(1, cpus // self.workers)
        else:
            # Each worker does the arithmetic of a local run in this process (its torch threads), so
            # by default the distributed result is the local one; --ray-workers trades that for more,
            # thinner workers (an optimization amplifies another thread count's rounding).
            threads = max(1, min(torch.get_num_threads(), cpus))
        workers = self.workers or (gpus if gpus else max(1, cpus // threads))
        return workers, threads, (1.0 if gpus and workers <= gpus else 0.0)


def local_cluster_options(**overrides) -> dict:
    """``ray.init`` keywords of the private cluster ``--ray auto`` starts on this machine: nothing listens
    beyond 127.0.0.1, no dashboard, Ray's own logs kept out of the terminal, and worker processes
    that import :data:`PRELOAD_MODULES` (those installed) as they start."""
    import importlib.util

    preload = [name for name in PRELOAD_MODULES if importlib.util.find_spec(name) is not None]
    options = {"include_dashboard": False, "_node_ip_address": "127.0.0.1", "log_to_driver": False,
               "configure_logging": False, "_system_config": {"preload_python_modules": preload}}
    return {**options, **overrides}


def parse_ray(text: str | None, workers: int | None = None, threads: int | None = None) -> RayTarget | None:
    """``--ray auto|HOST:PORT`` (None when the flag is absent) as a :class:`RayTarget`; checks Ray is installed."""
    if text is None:
        return None
    text = text.strip()
    if not text:
        raise ConvscopeError("--ray needs 'auto' or a cluster address HOST:PORT (e.g. --ray 10.0.0.5:6379)")
    require_ray()
    if text == "auto":
        return RayTarget(None, workers, threads)
    if not text.startswith("ray://"):
        host, _, port = text.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConvscopeError(f"--ray {text}: expected 'auto' or HOST:PORT of the head node (e.g. 10.0.0.5:6379)")
    return RayTarget(text, workers, threads)


def _check_reachable(address: str, timeout: float = 3.0) -> None:
    """Fail in seconds, not after Ray's minute of retries, when nothing listens at ``address``."""
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except (OSError, ValueError) as err:
        raise ConvscopeError(f"no Ray cluster answers at {address} ({err.__class__.__name__}: {err}); "
                             "start one with `ray start --head` there, or use --ray auto") from None


def _last_line(err: BaseException) -> str:
    """The last meaningful line of an error, which for a worker's failure is the original exception."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip() and not set(line.strip()) <= set("^~")]
    last = lines[-1] if lines else type(err).__name__
    for prefix in ("convscope.errors.ConvscopeError: ", "ConvscopeError: "):
        if last.startswith(prefix):
            return last[len(prefix):]
    return last


# ---------------------------------------------------------------------------- the model on a worker

def model_payload(loaded: LoadedModel) -> dict:
    """What a worker needs to build the driver's network: load arguments, or the pickled model."""
    if loaded.source is not None:
        # the preprocessing too: the driver's may have been set apart from the load (--input-size, --mean)
        return {"source": dict(loaded.source), "preprocessing": loaded.preprocessing,
                "fingerprint": fingerprint(loaded.module)}
    return {"model": loaded.module,
            "loaded": LoadedModel(torch.nn.Identity(), loaded.name, loaded.weights, loaded.preprocessing,
                                  loaded.class_names, loaded.random_init, loaded.seed),
            "fingerprint": fingerprint(loaded.module)}


def load_worker_model(payload: dict, threads: int) -> LoadedModel:
    """The driver's network in this worker, on its GPU when Ray gave it one; refused if it differs."""
    torch.set_num_threads(max(1, int(threads)))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if "source" in payload:
        from .sources import load_model

        source = payload["source"]
        loaded = load_model(source["spec"], weights=source["weights"], random=source["random"],
                            seed=source["seed"], trust_file=source["trust_file"], device=device)
        loaded.preprocessing = payload.get("preprocessing", loaded.preprocessing)
    else:
        shell = payload["loaded"]
        loaded = LoadedModel(payload["model"].to(device).eval(), shell.name, shell.weights, shell.preprocessing,
                             shell.class_names, shell.random_init, shell.seed, torch.device(device))
    mine = fingerprint(loaded.module)
    if mine != payload["fingerprint"]:
        raise ConvscopeError(f"the worker on {socket.gethostname()} loaded other weights than the driver "
                             f"(fingerprint {mine}, driver {payload['fingerprint']}): give every node the same "
                             "weights files and caches")
    return loaded


class _Worker:
    """A Ray actor: the model, loaded once; runs work units on it."""

    def __init__(self, payload: dict, threads: int):
        self.loaded = load_worker_model(payload, threads)

    def ready(self) -> int:
        return os.getpid()

    def run(self, work: Callable, unit: Any, shared: Any) -> Any:
        return work(self.loaded, unit, shared)


# ---------------------------------------------------------------------------- executors

# ``work(loaded, unit, shared) -> result``: a module-level function (it is pickled to the workers).
Work = Callable[[LoadedModel, Any, Any], Any]


class LocalExecutor:
    """Runs work units one after another in this process, on the caller's model."""

    name = "local"

    def map(self, loaded: LoadedModel, work: Work, units: Sequence, shared: Any = None) -> Iterator[tuple[Any, Any]]:
        """``(unit, work(loaded, unit, shared))`` for each unit, in order."""
        for unit in units:
            yield unit, work(loaded, unit, shared)

    def scan(self, loaded: LoadedModel, images, layers, **options):
        """:func:`convscope.methods.scan.scan` in this process (``options`` as there)."""
        from .methods.scan import scan

        return scan(loaded, images, layers, **options)


class RayExecutor:
    """Runs work units on a pool of Ray actors, each holding its own copy of the model.

    Units are handed out one at a time to whichever actor is free, and results come back as
    they finish (not in order), so the caller writes each as it arrives and a cancelled run
    keeps them. An actor whose process dies is restarted up to :data:`RESTARTS` times and its
    unit retried; a unit whose actor is gone for good goes to another actor; when none is
    left, :meth:`map` raises a :class:`ConvscopeError`.

    Used as a context manager (``with RayExecutor(target) as executor:``), it stays connected to
    the cluster and keeps its actors, with their loaded models, from one :meth:`map` to the next
    (an atlas's stages, say): the actors' start-up and ``ray.init`` are paid once. Used bare, each
    call connects, starts its actors and lets them go.
    """

    name = "ray"

    def __init__(self, target: RayTarget, restarts: int = RESTARTS):
        self.target = target
        self.restarts = restarts
        self._held: contextlib.ExitStack | None = None
        self._ray = None
        self._actors: list = []
        self._pool_key: tuple | None = None

    def __enter__(self) -> RayExecutor:
        stack = contextlib.ExitStack()
        self._ray = stack.enter_context(self.target.session())
        stack.callback(self._release)
        self._held = stack
        return self

    def __exit__(self, *exc) -> None:
        held, self._held = self._held, None
        try:
            if held is not None:
                held.close()
        finally:
            self._ray = None

    @contextlib.contextmanager
    def _connected(self) -> Iterator[Any]:
        if self._ray is not None:
            yield self._ray
            return
        with self.target.session() as ray:
            try:
                yield ray
            finally:
                self._release()

    def _release(self) -> None:
        actors, self._actors, self._pool_key = self._actors, [], None
        if actors:
            ray = require_ray()
            for actor in actors:
                with contextlib.suppress(Exception):
                    ray.kill(actor, no_restart=True)

    def _pool(self, ray, loaded: LoadedModel, wanted: int) -> list:
        """At least ``min(wanted, workers)`` live actors holding ``loaded``'s network (reused when they do)."""
        workers, threads, gpus = self.target.plan(ray)
        payload = model_payload(loaded)
        key = (id(loaded.module), payload["fingerprint"], threads, gpus)
        if key != self._pool_key:
            self._release()
            self._pool_key = key
        missing = min(workers, wanted) - len(self._actors)
        if missing > 0:
            actor_class = ray.remote(_Worker).options(
                num_cpus=ACTOR_CPUS, num_gpus=gpus, max_restarts=self.restarts, max_task_retries=self.restarts,
                scheduling_strategy="SPREAD")
            # The payload goes inline with the constructor (it is a few load arguments for a model
            # loaded by name): Ray keeps it with the actor, so a restart never depends on an
            # object-store copy (and says nothing about one).
            self._actors += [actor_class.remote(payload, threads) for _ in range(missing)]
        return self._actors[:max(1, min(workers, wanted))]

    def map(self, loaded: LoadedModel, work: Work, units: Sequence, shared: Any = None) -> Iterator[tuple[Any, Any]]:
        units = list(units)
        if not units:
            return
        with self._connected() as ray:
            actors = self._pool(ray, loaded, len(units))
            dead: set[int] = set()
            try:
                yield from self._run(ray, actors, work, units, ray.put(shared), dead)
            except BaseException:
                # an error, or a caller that stopped early: no actor is left busy with this call's units
                self._release()
                raise
            if dead:   # gone for good: the pool keeps the others
                gone = [actors[i] for i in dead]
                self._actors = [a for a in self._actors if all(a is not g for g in gone)]

    def speedup(self, local_threads: int | None = None) -> tuple[float, str]:
        """How many times a local run's rate this executor's pool computes at, and in words: its
        workers' torch threads over ``local_threads`` (default this process's), taking the cluster's
        CPUs as fast as this machine's and Ray's cost as nil (its steady overhead measured negative
        here, ``benchmarks/ray_scaling.py``); a GPU worker is counted as its CPU share, far too low."""
        local = max(1, int(local_threads or torch.get_num_threads()))
        with self._connected() as ray:
            workers, threads, gpus = self.target.plan(ray)
        factor = workers * threads / local
        kind = f"{workers} Ray worker{'s' if workers != 1 else ''} x {threads} thread{'s' if threads != 1 else ''}"
        return factor, (f"on {kind} ({factor:g}x this process's {local} thread{'s' if local != 1 else ''}, "
                        "if the cluster's CPUs are as fast as this machine's)")

    def scan(self, loaded: LoadedModel, images, layers, **options):
        """:func:`convscope.methods.scan.scan` on this executor's cluster, as a Ray Data actor pool."""
        from .methods.scan import scan

        with self._connected():
            return scan(loaded, images, layers, ray=self.target, **options)

    def _run(self, ray, actors: list, work: Work, units: list, shared, dead: set[int]) -> Iterator[tuple[Any, Any]]:
        from ray.exceptions import RayActorError, RayTaskError

        queue = deque(range(len(units)))
        idle = deque(range(len(actors)))
        pending: dict = {}
        done, last_death = 0, ""
        while queue or pending:
            while queue and idle:
                actor, index = idle.popleft(), queue.popleft()
                pending[actors[actor].run.remote(work, units[index], shared)] = (actor, index)
            if not pending:
                raise ConvscopeError(
                    f"no Ray worker is left ({len(actors)} started, each restarted up to {self.restarts} times; "
                    f"last failure: {last_death or 'unknown'}); {done} of {len(units)} work units are done "
                    "and kept. Fix the cause (memory? a node gone?) and run the same command again to resume.")
            ready, _ = ray.wait(list(pending), num_returns=1)
            actor, index = pending.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except RayActorError as err:
                last_death = _last_line(err)[:200]
                if "creation task" in str(err):   # the constructor failed (model did not load): no retry helps
                    raise ConvscopeError(f"a Ray worker could not start: {last_death}") from None
                queue.appendleft(index)           # this actor is gone for good; another takes the unit
                dead.add(actor)
                continue
            except RayTaskError as err:
                cause = err.cause if isinstance(getattr(err, "cause", None), BaseException) else None
                if isinstance(cause, ConvscopeError):
                    raise ConvscopeError(str(cause)) from None
                raise
            idle.append(actor)
            done += 1
            yield units[index], result


# ---------------------------------------------------------------------------- the scan on Ray Data

class _ScanShards:
    """Ray Data's callable class: the model loaded once per actor; one partial TopK per shard."""

    def __init__(self, payload: dict, threads: int, images, channels: dict[str, int], top: int,
                 precision: Precision):
        from .hooks import frozen, recording
        from .methods.scan.engine import _modified_in_place

        self.loaded = load_worker_model(payload, threads)
        # The driver resolved the layers and their channel counts: tracing a catalogue here would add
        # seconds to every actor's start for nothing (fold_batch checks each recorded map's shape).
        self.images, self.channels, self.top, self.precision = images, dict(channels), top, precision
        self.names = list(channels)
        # Frozen and recording for the actor's life: the model is this actor's own copy.
        self.stack = contextlib.ExitStack()
        module = self.loaded.module
        self.stack.enter_context(frozen(module))
        self.copied = _modified_in_place(module, self.names, images.size, self.loaded.device)
        self.store = self.stack.enter_context(recording(module, self.names, clone=self.copied, stop_after_last=True))

    def __call__(self, batch: dict) -> dict:
        from .datasets import collate_images
        from .methods.scan import TopK
        from .methods.scan.engine import fold_batch

        states, bad_lists = [], []
        for first, end in zip(batch["start"].tolist(), batch["stop"].tolist()):
            pixels, ids, bad = collate_images([self.images[i] for i in range(int(first), int(end))])
            state = TopK.empty(self.top, self.channels, self.loaded.device)
            if len(ids):
                with torch.no_grad():
                    fold_batch(self.loaded, self.store, self.names, state, pixels, ids, copied=self.copied,
                               precision=self.precision)
            buffer = io.BytesIO()
            torch.save(state.state_dict(), buffer)
            states.append(buffer.getvalue())
            bad_lists.append(json.dumps([(int(i), str(r)) for i, r in bad]))
        return {"start": batch["start"], "stop": batch["stop"], "state": states, "bad": bad_lists}


@contextlib.contextmanager
def _ordered_and_quiet(data) -> Iterator[None]:
    """Ray Data set to give rows back in order (a resumable cursor) with no bars or notes of its own
    (the driver's one bar); the caller's settings and the ``ray.data`` logger's level restored after."""
    context = data.DataContext.get_current()
    logger = logging.getLogger("ray.data")
    previous = (context.execution_options.preserve_order, context.enable_progress_bars, logger.level)
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        context.execution_options.preserve_order, context.enable_progress_bars = previous[:2]
        logger.setLevel(previous[2])


def scan_shards(target: RayTarget, loaded: LoadedModel, images, names: list[str], topk, skipped: list,
                *, start: int, cursor: int, stop: int, batch_size: int, checkpoint, checkpoint_every: int,
                progress: bool, precision: Precision = FP32) -> tuple[int, float]:
    """The Ray counterpart of :func:`convscope.methods.scan.engine.fold`, with the same contract.

    Items ``cursor..stop`` are cut into shards of ``batch_size`` (the local scan's batches), each
    scanned by an actor of a Ray Data pool into a partial TopK; the driver merges them in shard
    order, so the checkpoint's "next item" stays meaningful and ``resume`` works as locally.
    """
    from tqdm import tqdm

    from .methods.scan import TopK

    bounds = [(a, min(a + batch_size, stop)) for a in range(cursor, stop, batch_size)]
    state, position, n_skipped = topk, cursor, len(skipped)
    bar = tqdm(total=stop - start, initial=cursor - start, unit="img", desc="scan (ray)", disable=not progress,
               dynamic_ncols=True, smoothing=0.05)
    began, scanned, folded = time.perf_counter(), 0, 0
    try:
        with target.session() as ray, _ordered_and_quiet(ray.data):
            workers, threads, gpus = target.plan(ray)
            data = ray.data
            try:
                shards = data.from_items([{"start": a, "stop": b} for a, b in bounds],
                                         override_num_blocks=max(1, min(len(bounds), 4 * workers)))
                mapped = shards.map_batches(
                    _ScanShards, batch_size=1, compute=data.ActorPoolStrategy(size=max(1, min(workers, len(bounds)))),
                    num_cpus=ACTOR_CPUS, num_gpus=gpus,
                    fn_constructor_kwargs={"payload": model_payload(loaded), "threads": threads, "images": images,
                                           "channels": {n: int(topk.values[n].shape[0]) for n in names},
                                           "top": topk.k, "precision": precision},
                    # Actor options go to map_batches as keyword arguments (Ray Data's own way to
                    # bound its default of endless restarts; only ray_remote_args_fn is deprecated).
                    max_restarts=RESTARTS, max_task_retries=RESTARTS)
                for row in mapped.iter_rows():
                    part = TopK.from_state_dict(torch.load(io.BytesIO(row["state"]), weights_only=True),
                                                state.values[names[0]].device)
                    bad = [(int(i), str(r)) for i, r in json.loads(row["bad"])]
                    state = state.merge(part)
                    skipped.extend(bad)
                    position, n_skipped = int(row["stop"]), len(skipped)
                    scanned += part.images_seen
                    folded += 1
                    bar.update(int(row["stop"]) - int(row["start"]))
                    if checkpoint is not None and folded % checkpoint_every == 0:
                        checkpoint.save(state, position, skipped[:n_skipped])
            except ConvscopeError:
                raise
            except Exception as err:
                if type(err).__module__.startswith("ray"):
                    raise ConvscopeError(f"the Ray scan failed ({type(err).__name__}: {_last_line(err)[:200]}); "
                                         f"{position - start} of {stop - start} images are done"
                                         + (" and kept in the checkpoint: run again with --resume"
                                            if checkpoint is not None else "")) from None
                raise
    except BaseException:
        if checkpoint is not None:
            checkpoint.save(state, position, skipped[:n_skipped])
        raise
    finally:
        bar.close()
    seconds = time.perf_counter() - began
    _adopt(topk, state)
    if checkpoint is not None:
        checkpoint.save(state, position, skipped[:n_skipped])
    return scanned, seconds


def _adopt(topk, state) -> None:
    """Make the caller's TopK hold ``state`` (``fold`` updates its argument in place; so does this)."""
    topk.values, topk.images, topk.positions = state.values, state.images, state.positions
    topk.map_sizes, topk.seen, topk.images_seen = state.map_sizes, state.seen, state.images_seen
