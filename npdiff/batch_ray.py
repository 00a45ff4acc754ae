"""`npdiff batch --ray ADDRESS`: the same jobs on a Ray cluster (pip install 'npdiff[cluster]').

  1. connect: ADDRESS is a cluster address (host:port, ray://host:10001), 'auto' (the cluster this
     machine belongs to) or 'local' (start a Ray on this machine, shut down at the end); a Ray that
     is already initialised in this process is used as it is;
  2. start one actor per worker (default: one per CPU of the cluster), each an npdiff.batch_workers.Renderer
     holding the model, with its CPUs' worth of BLAS/Numba threads set in its environment before
     it imports NumPy; wait until every actor has loaded the model (a model that does not load is an
     error before any job runs);
  3. give each actor one job; ray.wait for the first to finish, give that actor the next job, and
     hand the result (PNG bytes + parameters) to the driver, which writes it (npdiff/batch.py);
  4. an actor lost mid-run (its node died, it was killed) raises RayActorError for its job: start a
     new actor in its place and run the job again there. Only the driver writes files, once per line,
     so nothing is lost and nothing written twice.
The pictures are byte for byte those of a local run: same seeds, same kernels, same PNG encoder.
"""

from collections import deque

from npdiff.batch_workers import Renderer, thread_variables
from npdiff.errors import NpdiffError

MAX_ATTEMPTS = 3  # a job whose worker is lost this many times is reported as failed
READY_TIMEOUT_S = 600  # for every actor to load the model


def connect(ray, address):
    """ray.init for --ray ADDRESS; -> True if this call started Ray (so close() shuts it down)."""
    if ray.is_initialized():
        return False
    try:
        if address == "local":
            ray.init(include_dashboard=False)
        else:
            ray.init(address=address)
    except ConnectionError as exc:
        raise NpdiffError(f"--ray {address}: no Ray cluster reachable there ({exc}); start one with "
                          "`ray start --head`, or pass --ray local") from exc
    return True


class RayPool:
    """Ray actors holding the model; results(payloads) yields one result per payload, as they finish."""

    def __init__(self, address, model, workers=None, max_replacements=None, precision="fp32"):
        try:
            import ray
        except ImportError as exc:
            raise NpdiffError("--ray needs Ray: pip install 'npdiff[cluster]'") from exc
        self.ray = ray
        self.started_ray = connect(ray, address)
        # 2. one actor per worker, each reserving its share of the cluster's CPUs
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.workers = workers or cpus
        self.threads = max(1, cpus // self.workers)
        num_cpus = self.threads if self.workers <= cpus else cpus / self.workers
        self.actor_class = ray.remote(Renderer).options(
            num_cpus=num_cpus, max_restarts=0, runtime_env={"env_vars": thread_variables(self.threads)})
        self.model = model
        self.model_args = (model, self.threads, precision)
        self.max_replacements = 2 * self.workers + 2 if max_replacements is None else max_replacements
        self.replaced = 0
        self.actors = [self.actor_class.remote(*self.model_args) for _ in range(self.workers)]
        self.wait_until_ready()

    def wait_until_ready(self):
        from ray.exceptions import GetTimeoutError, RayActorError

        try:
            self.ray.get([actor.ready.remote() for actor in self.actors], timeout=READY_TIMEOUT_S)
        except RayActorError as exc:
            self.close()
            model = "shipped with npdiff" if self.model is None else self.model
            raise NpdiffError(f"a Ray worker could not load the model {model} (is it at that path on every "
                              f"node?): {exc}") from exc
        except GetTimeoutError as exc:
            self.close()
            raise NpdiffError(f"the Ray workers did not load the model within {READY_TIMEOUT_S} s: asked for "
                              f"{self.workers} workers of {self.threads} CPUs each; are there enough?") from exc

    def replace(self, lost):
        """Drop a lost actor; -> a new one in its place, or None once max_replacements are used."""
        if lost in self.actors:
            self.actors.remove(lost)
        if self.replaced >= self.max_replacements:
            return None
        self.replaced += 1
        actor = self.actor_class.remote(*self.model_args)
        self.actors.append(actor)
        return actor

    def results(self, payloads):
        from ray.exceptions import RayActorError, RayError

        payloads = ((payload, 1) for payload in payloads)
        retry = deque()  # (payload, attempt) of jobs whose worker was lost and had no replacement
        in_flight = {}  # ObjectRef -> (actor, payload, attempt)

        def feed(actor):
            task = retry.popleft() if retry else next(payloads, None)
            if task is not None:
                payload, attempt = task
                in_flight[actor.render.remote(payload)] = (actor, payload, attempt)

        # 3. one job per actor, then one more each time an actor frees up
        for actor in list(self.actors):
            feed(actor)
        while in_flight:
            [ref], _ = self.ray.wait(list(in_flight), num_returns=1)
            actor, payload, attempt = in_flight.pop(ref)
            try:
                result = self.ray.get(ref)
            except RayActorError as exc:
                # 4. the worker was lost: run its job again on a new worker (or a free one later)
                if attempt >= MAX_ATTEMPTS:
                    yield {"line": payload["line"], "error": f"its Ray worker was lost {attempt} times: {exc}"}
                    continue
                replacement = self.replace(actor)
                retry.appendleft((payload, attempt + 1))
                if replacement is not None:
                    feed(replacement)
                continue
            except RayError as exc:
                result = {"line": payload["line"], "error": f"Ray: {type(exc).__name__}: {exc}"}
            feed(actor)
            yield result
        # every worker lost and none could be started: say so for what is left
        for payload, _ in [*retry, *payloads]:
            yield {"line": payload["line"], "error": "no Ray worker left to run it (all lost)"}

    def close(self, abort=False):
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []
        if self.started_ray:
            self.ray.shutdown()
