"""Plan and run a build of part of the graph: keys, cache lookups, parallel execution.

Packages are started as soon as every input is available and a CPU slot is free (see
:mod:`hadron.jobs`). A failure stops only the packages that depend on it, unless ``keep_going`` is
off, in which case no new package starts after the first failure.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from hadron.config import Settings
from hadron.engine import buildsys
from hadron.engine.buildenv import BuildEnv, LockedIdentity, extra_path
from hadron.engine.cache import Cache, Output, compute_key
from hadron.engine.executor import BuildRequest, Executor
from hadron.engine.fetch import SourceStore, fetch_recipe
from hadron.engine.graph import Graph
from hadron.engine.mirrors import MirrorProvider
from hadron.engine.progress import Reporter
from hadron.engine.recipe import Recipe
from hadron.engine.remote import Refused, RemoteCache
from hadron.engine.toolchain import Toolchain
from hadron.errors import HadronError
from hadron.host import EnvIdentity, missing_tools_error, sandbox_path


@dataclass
class Result:
    name: str
    status: str  # cached | pulled (from the remote cache) | built | failed | skipped
    key: str | None = None
    output: Output | None = None
    error: str | None = None
    log: str | None = None
    seconds: float = 0.0
    remote: str | None = None  # what the remote cache did: "signed by NAME", "pushed", "refused: …"


@dataclass
class Summary:
    results: dict[str, Result] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def failed(self) -> list[Result]:
        return [r for r in self.results.values() if r.status == "failed"]

    @property
    def ok(self) -> bool:
        return all(r.status in ("cached", "built", "pulled") for r in self.results.values())

    def count(self, status: str) -> int:
        return sum(1 for r in self.results.values() if r.status == status)


# Programs each build-system helper runs.
SYSTEM_TOOLS: dict[str, tuple[str, ...]] = {
    "autotools": ("make",),
    "meson": ("meson", "ninja"),
    "cmake": ("cmake", "ninja"),
    "make": ("make",),
    "kbuild": ("make", "flex", "bison", "bc", "perl"),
    "custom": (),
}


def recipe_host_tools(r: Recipe, toolchain: Toolchain) -> list[str]:
    """Programs a recipe's build steps may run: its build system's, its own, its toolchain's."""
    tools = [*SYSTEM_TOOLS[r.build.system], *r.depends.host]
    if r.depends.toolchain:
        tools += toolchain.host_tools
    return tools


MAX_KEY_CANDIDATES = 16


class Planner:
    """Computes cache keys. A key needs the content digests of the package's inputs, so it is
    known once they are built (or found in the cache)."""

    def __init__(self, settings: Settings, graph: Graph, cache: Cache, store: SourceStore, toolchain: Toolchain,
                 env: BuildEnv | None = None):
        self.settings = settings
        self.graph = graph
        self.cache = cache
        self.store = store
        self.toolchain = toolchain
        self.env = env
        # Directories searched before the standard PATH: the project's, and in an environment its tools.
        self.extra_path = settings.extra_path if env is None else extra_path(settings.extra_path)
        self.envid: EnvIdentity | LockedIdentity = (
            EnvIdentity(settings.extra_path, cache.layout.envid) if env is None
            else LockedIdentity(env, sandbox_path(self.extra_path)))
        self._inputs: dict[str, list[str]] = {}

    def inputs(self, name: str) -> list[str]:
        if name not in self._inputs:
            self._inputs[name] = self.graph.transitive_build_inputs(name)
        return self._inputs[name]

    def host_tools(self, name: str) -> list[str]:
        return recipe_host_tools(self.graph.recipes[name].recipe, self.toolchain)

    def check_host_tools(self, names: list[str]) -> None:
        missing: dict[str, list[str]] = {}
        for n in names:
            for t in self.envid.missing(self.host_tools(n)):
                missing.setdefault(t, []).append(f"{n} ({self.graph.recipes[n].path})")
        if missing:
            raise missing_tools_error(missing, self.env.digest if self.env is not None else None)

    def source_digests(self, name: str) -> list[str]:
        """Per source, the digest the key uses: the first one in the store (upstream's if none is)."""
        return [choices[0] for choices in self._digest_choices(name)]

    def _digest_choices(self, name: str) -> list[list[str]]:
        out = []
        for s in self.graph.recipes[name].recipe.sources:
            ds = s.digests()
            stored = [d for d in ds if self.store.has(d)]
            out.append(stored + [d for d in ds if d not in stored])
        return out

    def candidate_keys(self, name: str, outputs: dict[str, Output]) -> list[str]:
        """Keys of ``name`` for every choice among its sources' equivalent digests (upstream's file or a
        mirror's repack, each verified by the recipe), the store's choice first: an output built from
        either is the package's."""
        lr = self.graph.recipes[name]
        recipe_digest, steps_digest = lr.digest(), buildsys.steps_digest(lr.recipe)
        inputs = {d: outputs[d].digest() for d in self.inputs(name)}
        env = self.envid.identity(self.host_tools(name))
        toolchain = self.toolchain.digest() if lr.recipe.depends.toolchain else "none"
        combos = itertools.islice(itertools.product(*self._digest_choices(name)), MAX_KEY_CANDIDATES)
        return [compute_key(recipe_digest=recipe_digest, steps_digest=steps_digest, source_digests=list(c),
                            input_digests=inputs, env_identity=env, toolchain=toolchain, arch=self.settings.arch)
                for c in combos]

    def key(self, name: str, outputs: dict[str, Output]) -> str:
        """The package's key: the first candidate already in the cache, else the store's choice."""
        cands = self.candidate_keys(name, outputs)
        return next((k for k in cands if self.cache.get(k) is not None), cands[0])

    def resolve_cached(self, targets: list[str]) -> tuple[dict[str, Output], dict[str, str]]:
        """Walk the closure in order while everything is cached; returns outputs and keys found."""
        outputs: dict[str, Output] = {}
        keys: dict[str, str] = {}
        for n in self.graph.closure(targets):
            if any(d not in outputs for d in self.inputs(n)):
                continue
            k = self.key(n, outputs)
            keys[n] = k
            out = self.cache.get(k)
            if out is not None:
                outputs[n] = out
        return outputs, keys


class Scheduler:
    def __init__(
        self,
        planner: Planner,
        executor: Executor,
        store: SourceStore,
        mirrors: list[MirrorProvider],
        reporter_factory: Callable[[int], Reporter],
        remote: RemoteCache | None = None,
        push: bool = False,
    ) -> None:
        self.remote = remote
        self.push = push and remote is not None and remote.signing_key is not None
        self.planner = planner
        self.executor = executor
        self.store = store
        self.mirrors = mirrors
        self.reporter_factory = reporter_factory
        self.settings = planner.settings

    def run(self, targets: list[str], *, run_check: bool = True) -> Summary:
        t_start = time.monotonic()
        graph = self.planner.graph
        order = graph.closure(targets)
        self.planner.check_host_tools(order)
        summary = Summary()
        outputs: dict[str, Output] = {}
        pending = list(order)
        running: set[str] = set()
        done_q: queue.Queue[tuple[str, Result, bytes]] = queue.Queue()
        stop = False
        js = getattr(self.executor, "jobserver", None)

        def blocked_by_failure(n: str) -> str | None:
            for d in self.planner.inputs(n):
                r = summary.results.get(d)
                if r is not None and r.status in ("failed", "skipped"):
                    return d
            return None

        remote_down = threading.Event()

        def pull(n: str, rep: Reporter) -> tuple[Output | None, str | None]:
            assert self.remote is not None
            rep.phase(n, "pull")
            try:
                pulled = None
                for k in self.planner.candidate_keys(n, outputs):
                    pulled = self.remote.pull(k)
                    if pulled is not None:
                        break
            except Refused as e:
                rep.note(n, f"remote artifact refused: {e.message}; building it here")
                return None, f"refused: {e.message}"
            except HadronError as e:
                # The registry is down or unreachable: say so once and stop asking for this run.
                if not remote_down.is_set():
                    remote_down.set()
                    rep.note(n, f"remote cache unavailable: {e.message}; building here, and not asking it "
                             "again in this run")
                return None, f"unavailable: {e.message}"
            return (pulled.output, f"signed by {pulled.signer}") if pulled else (None, None)

        def work(n: str, key: str, slot: bytes, rep: Reporter) -> None:
            t0 = time.monotonic()
            lr = graph.recipes[n]
            remote_note: str | None = None
            try:
                if self.remote is not None and not remote_down.is_set():
                    pulled, remote_note = pull(n, rep)
                    if pulled is not None:
                        done_q.put((n, Result(n, "pulled", pulled.key, pulled, seconds=time.monotonic() - t0,
                                              log=str(pulled.log), remote=remote_note), slot))
                        return
                rep.phase(n, "fetch")
                fetched = fetch_recipe(
                    self.store, lr, self.mirrors, offline=self.settings.offline, upstream=self.settings.upstream
                )
                # The planned key assumed the upstream digest for sources not yet in the store; the
                # file actually fetched (e.g. a mirror's repack) decides the key the output is stored
                # under, the one every later run computes.
                key = self.planner.key(n, outputs)
                req = BuildRequest(
                    recipe=lr,
                    key=key,
                    sources=fetched,
                    inputs={d: outputs[d] for d in self.planner.inputs(n)},
                    env_identity=self.planner.envid.identity(self.planner.host_tools(n)),
                    toolchain=self.planner.toolchain,
                    source_date_epoch=self.settings.source_date_epoch,
                    arch=self.settings.arch,
                    extra_path=self.planner.extra_path,
                    run_check=run_check,
                    env_root=self.planner.env.root if self.planner.env is not None else None,
                    on_phase=lambda p: rep.phase(n, p),
                )
                out = self.executor.build(req)
                if self.push and self.remote is not None and not out.reused:
                    rep.phase(n, "push")
                    try:
                        self.remote.push(out)
                        remote_note = "pushed"
                    except HadronError as e:
                        rep.note(n, f"could not push to the remote cache: {e.message}")
                        remote_note = f"push failed: {e.message}"
                res = Result(n, "cached" if out.reused else "built", key, out,
                             seconds=time.monotonic() - t0, log=str(out.log), remote=remote_note)
            except HadronError as e:
                res = Result(n, "failed", key, error=str(e), seconds=time.monotonic() - t0,
                             log=str(self.planner.cache.log_path(n)))
            except Exception as e:  # an engine bug must not hang the scheduler
                res = Result(n, "failed", key, error=f"internal error: {e!r}", seconds=time.monotonic() - t0,
                             log=str(self.planner.cache.log_path(n)))
            done_q.put((n, res, slot))

        rep = self.reporter_factory(len(order))
        with rep, ThreadPoolExecutor(max_workers=max(1, self.settings.jobs)) as pool:
            while pending or running:
                progressed = False
                for n in list(pending):
                    if stop:
                        break
                    failed_dep = blocked_by_failure(n)
                    if failed_dep is not None:
                        pending.remove(n)
                        summary.results[n] = Result(n, "skipped", error=f"input {failed_dep} failed")
                        rep.finished(n, "skipped", f"(input {failed_dep} failed)")
                        progressed = True
                        continue
                    if any(d not in outputs for d in self.planner.inputs(n)):
                        continue
                    key = self.planner.key(n, outputs)
                    hit = self.planner.cache.get(key)
                    if hit is not None:
                        pending.remove(n)
                        outputs[n] = hit
                        summary.results[n] = Result(n, "cached", key, hit, log=str(hit.log))
                        rep.finished(n, "cached")
                        progressed = True
                        continue
                    slot = js.acquire_slot() if js is not None else b""
                    if slot is None:
                        break  # no CPU slot free; wait for one
                    pending.remove(n)
                    running.add(n)
                    pool.submit(work, n, key, slot, rep)
                    progressed = True
                if stop:
                    for n in pending:
                        summary.results[n] = Result(n, "skipped", error="stopped after a failure")
                    pending.clear()
                if progressed:
                    continue
                if not running:
                    if pending:  # inputs that can never be satisfied (should not happen)
                        raise HadronError("scheduler stalled on: " + ", ".join(pending))
                    break
                try:
                    n, res, slot = done_q.get(timeout=0.05)
                except queue.Empty:
                    continue
                while True:
                    running.discard(n)
                    if js is not None:
                        js.release_slot(slot)
                    summary.results[n] = res
                    if res.output is not None:
                        outputs[n] = res.output
                        rep.finished(n, res.status, f"in {res.seconds:.1f}s")
                    else:
                        rep.finished(n, "FAILED", f"(log: {res.log})")
                        if not self.settings.keep_going:
                            stop = True
                    try:
                        n, res, slot = done_q.get_nowait()
                    except queue.Empty:
                        break
        self.planner.envid.save()
        summary.seconds = time.monotonic() - t_start
        return summary

