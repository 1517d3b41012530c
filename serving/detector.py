"""The detector: one model per replica, fed in batches, swapped without downtime when `champion` moves.

`DetectorCore` is the whole of it without Ray Serve (a model keeper, a continuous batcher, the model runtime);
`DetectorDeployment` is its Serve replica. Batching (serving/batcher.py): requests queue on the replica's event
loop and one worker thread takes everything queued, up to `max_batch_size`, whenever it is free, so a lone request
runs at once and batches fill under load while the loop stays free to receive. `max_ongoing_requests` must be at
least `max_batch_size` or a batch can never fill; the app builder sets it far higher (serving.config).

Model updates: a keeper thread per replica reconciles the loaded model with the wanted one - the `model_uri` of the
`user_config` and, for an alias URI (`models:/NAME@ALIAS`), the version the alias points at now, polled every
`champion_poll_s`. A new version is loaded and warmed up beside the old one (on a GPU: on the worker thread, between
two batches), then swapped in with one assignment; batches in flight finish on the model they started with. No
request fails and no replica restarts; each answer names the version that made it.

The registry going away (an MLflow server that stops answering) costs no answer. Before each look the keeper probes
the server, which takes seconds where MLflow's client would retry for minutes; while it does not answer, the loaded
model keeps serving, `/health` says the registry is unreachable (still 200), and the next poll looks again, so a
champion moved meanwhile is picked up once the registry is back.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import threading
import time
from datetime import datetime, timezone
from typing import Any, Literal

import numpy as np
from ray import serve

from app.config import DetectorSettings, Settings
from app.model_ref import parse_model_ref
from app.rollout import Arm, Ended, Rollout
from serving.batcher import Batcher, BatchTiming
from serving.results import DetectorStatus, Explained, Refused, Scored
from serving.runtime import (
    ActiveModel,
    ModelNotFoundYet,
    alias_version,
    available_cores,
    explain_crop,
    load_active,
    model_facts,
    pick_device,
    score_batch,
    source_scores,
    use_bf16,
    warm_up,
    warmup_sizes,
)

# One ingress-to-detector call carries at most this many crops and bytes (Serve's gRPC messages stop at 4 MiB), and
# each ingress replica keeps at most this many calls in flight.
COALESCE_MAX_CROPS = 16
COALESCE_MAX_BYTES = 3 * 1024 * 1024
COALESCE_CALLS_IN_FLIGHT = 2

RegistryState = Literal["reachable", "unreachable"]
# What a photo reaches the detector as: its uint8 crop (decoded by the ingress) or its checked bytes, decoded in the
# batch on the model's device (`serve.decode_on`, app/pixels.py).
Pixels = np.ndarray | bytes


class DetectorCore:
    """Batched inference on one model, kept current; what a detector replica holds, usable without Serve."""

    def __init__(self, settings: Settings, metrics: Any) -> None:
        from app.logging import get_logger

        self._settings = settings
        self._log = get_logger("serving.detector")
        self._metrics = metrics
        self._device = pick_device(settings.serve.use_gpu)
        self._config = settings.serve.detector(settings.default_model_uri)
        self._batcher: Batcher[tuple[Pixels, Arm], Scored | Refused] = Batcher(
            self._run, max_batch_size=self._config.max_batch_size, on_batch=self._record
        )
        self._active: ActiveModel | None = None
        # The version on trial beside the champion, and the registry's rollout it is tried under (app/rollout.py).
        self._challenger: ActiveModel | None = None
        self._rollout: Rollout | None = None
        self._ended: Ended | None = None
        self._problem = "the model is loading"
        self._load_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._keeper: threading.Thread | None = None
        self._mlflow_ready = False
        self._failed: tuple[str, str | None] | None = None
        # What the last look at the registry found, and why it failed; None while no registry is followed.
        self._registry: tuple[RegistryState, str | None] | None = None

    # ---------------------------------------------------------------------------------------------- configuration
    def configure(self, user_config: dict[str, Any], max_ongoing_requests: int | None = None) -> None:
        """Batch size and wait apply to the next batch; a new model URI loads beside the current model.

        The first call (a replica starting) loads and warms the first model before returning, so Serve routes no
        request to the replica before it can answer.
        """
        import torch

        config = DetectorSettings(**user_config)
        if config.model_uri is None:
            config.model_uri = self._settings.default_model_uri
        self._batcher.max_batch_size = config.max_batch_size
        self._batcher.max_wait_s = config.batch_wait_timeout_s
        if max_ongoing_requests is not None and max_ongoing_requests < config.max_batch_size:
            self._log.warning(
                "max_ongoing_requests is below max_batch_size: batches can never fill; raise it",
                max_ongoing_requests=max_ongoing_requests,
                max_batch_size=config.max_batch_size,
            )
        if self._device.type == "cpu":
            torch.set_num_threads(config.torch_threads or available_cores())
        self._config = config
        if self._active is None and self._keeper is None:
            self._reconcile(first=True)
        self._ensure_keeper()
        self._wake.set()

    def check_health(self) -> None:
        """Liveness only; a replica waiting for its first model is alive and answers 503 through the ingress."""
        if self._keeper is None:
            self._reconcile(first=True)
            self._ensure_keeper()

    def _ensure_keeper(self) -> None:
        if self._keeper is None:
            self._keeper = threading.Thread(target=self._keep, name="aipd-model-keeper", daemon=True)
            self._keeper.start()

    def _keep(self) -> None:
        while not self._stop.is_set():
            poll = self._config.champion_poll_s
            timeout = poll if poll > 0 else None
            if self._active is None:  # waiting for a first model: keep looking even with polling off
                timeout = min(timeout or 5.0, 5.0)
            self._wake.wait(timeout=timeout)
            self._wake.clear()
            if self._stop.is_set():
                return
            self._reconcile()
            self._reconcile_challenger()

    def _reconcile(self, first: bool = False) -> None:
        """Load the wanted model if it differs from the active one; errors leave the active model serving."""
        config = self._config
        uri = config.model_uri or self._settings.default_model_uri
        with self._load_lock:
            active = self._active
            target: str | None = None
            ref = None
            try:
                ref = parse_model_ref(uri)
                following = ref.kind == "alias" and (active is None or config.champion_poll_s > 0)
                if not (ref.in_registry and (active is None or following)):
                    self._registry = None
                elif not self._registry_answers():
                    return
                if ref.kind == "alias" and not self._mlflow_ready:
                    from app.registry import setup_mlflow

                    setup_mlflow(self._settings)  # the registry the alias lives in: this replica's settings
                    self._mlflow_ready = True
                target = alias_version(ref) if following else None
                same_precision = active is not None and active.bf16 == use_bf16(self._device, config.precision)
                if active is not None and active.uri == uri and target in (None, active.version) and same_precision:
                    return
                if (uri, target) == self._failed:
                    return  # this exact model failed to load already; wait for the alias or the config to move
                started = time.perf_counter()
                promoted = self._challenger
                if promoted is not None and target == promoted.version and same_precision:
                    # the challenger was promoted: it is loaded and warm already, so it answers from the next batch
                    self._swap_in(dataclasses.replace(promoted, uri=uri), active, started)
                    return
                loaded = self._load(uri)  # on a CPU, traced and warm before it answers: every answer from one graph
            except ModelNotFoundYet as err:
                if active is None:
                    if self._problem != str(err):  # once, not at every poll
                        self._log.warning("waiting for a model", uri=uri, detail=str(err))
                    self._problem = str(err)
                return
            except Exception as err:
                if ref is not None and ref.in_registry and not self._registry_answers():
                    return  # the registry went away mid-load: not the model's fault; the next poll tries again
                self._metrics.inc("model_loads_total", {"version": target or "unknown", "result": "error"})
                if first and parse_model_ref(uri).kind != "alias":
                    raise  # a wrong path or a corrupt checkpoint fails the deploy with its message
                self._failed = (uri, target)
                if active is None:
                    self._problem = f"cannot load {uri}: {err}"
                self._log.error("model load failed; keeping the current model", uri=uri, error=str(err))
                return
            self._swap_in(loaded, active, started)

    def _swap_in(self, loaded: ActiveModel, previous: ActiveModel | None, started: float) -> None:
        """One assignment: batches in flight finish on the model they started with."""
        loaded.answering_since = datetime.now(timezone.utc)
        self._active = loaded
        self._problem = ""
        self._metrics.inc("model_loads_total", {"version": loaded.version, "result": "ok"})
        self._log.info(
            "model ready",
            uri=loaded.uri,
            version=loaded.version,
            previous=previous.version if previous else None,
            device=str(self._device),
            graphs=sorted(loaded.graphs),
            seconds=round(time.perf_counter() - started, 2),
        )

    def _load(self, uri: str) -> ActiveModel:
        """A model warm for this replica's batches: traced on a CPU, its CUDA graphs on the batcher's thread."""
        config = self._config
        sizes = warmup_sizes(config.max_batch_size, self._device.type)
        on_gpu = self._device.type == "cuda"
        loaded = load_active(
            self._settings,
            uri,
            self._device,
            warmup_sizes=sizes,
            precision=config.precision,
            warm=not on_gpu,
            cuda_graphs=config.cuda_graphs,
        )
        if on_gpu:  # cuDNN plans and CUDA graphs belong to the thread that runs the batches
            self._batcher.call_on_worker(functools.partial(warm_up, loaded, sizes, explain=True))
        return loaded

    # ------------------------------------------------------------------------------------------------ rollout
    def _reconcile_challenger(self) -> None:
        """Load the version on trial (or drop it once the trial ended), then judge it: a challenger that fails the
        rollout's rule is rolled back here, by whichever replica sees it first."""
        ref = parse_model_ref(self._config.model_uri or self._settings.default_model_uri)
        if ref.kind != "alias" or not self._mlflow_ready or self._registry != ("reachable", None):
            return  # pinned models are never tried against; an unreachable registry leaves things as they are
        from app.model_ref import version_uri
        from app.rollout import current_rollout, last_ended

        try:
            rollout, self._ended = current_rollout(self._settings), last_ended(self._settings)
            if rollout is None:
                if self._challenger is not None:
                    self._log.info("challenger dropped", version=self._challenger.version)
                self._challenger, self._rollout = None, None
                return
            if self._challenger is None or self._challenger.version != rollout.version:
                if self._active is not None and self._active.version == rollout.version:
                    self._challenger = self._active
                else:
                    self._challenger = self._load(version_uri(self._settings.registered_model, rollout.version))
                self._log.info("challenger ready", version=rollout.version, mode=rollout.mode, percent=rollout.percent)
            self._rollout = rollout
            self._judge(rollout)
        except Exception as err:  # noqa: BLE001 - a trial that cannot be set up leaves the champion answering alone
            self._log.error("challenger not loaded; the champion answers every photo", error=str(err))

    def _judge(self, rollout: Rollout) -> None:
        from app.rollout import abort
        from serving.rollout_stats import ROLLOUT_METRICS, roll_back_reason, version_figures

        if self._active is None:
            return
        figures = version_figures(self._metrics.read(ROLLOUT_METRICS, timeout_s=5.0))
        reason = roll_back_reason(
            figures.get(self._active.version), figures.get(rollout.version), self._config, rollout.mode == "shadow"
        )
        if reason is not None and abort(self._settings, reason, outcome="rolled_back") is not None:
            self._log.warning("challenger rolled back", version=rollout.version, reason=reason)
            self._challenger, self._rollout = None, None

    def rollout(self) -> Rollout | None:
        """The trial this replica runs now (None: the champion answers every photo)."""
        return self._rollout if self._challenger is not None else None

    def _registry_answers(self) -> bool:
        """Probe the registry and record the answer for /health; False (and the reason logged once) while it is
        unreachable."""
        from app.registry import registry_unreachable

        problem = registry_unreachable(self._settings)
        was = self._registry[0] if self._registry else None
        self._registry = ("unreachable", problem) if problem else ("reachable", None)
        if problem is None:
            if was == "unreachable":
                self._log.info("the model registry answers again")
            return True
        if was != "unreachable":
            self._log.warning("the model registry is unreachable; keeping the current model", error=problem)
        if self._active is None:
            self._problem = problem
        return False

    # ------------------------------------------------------------------------------------------------- requests
    async def predict(self, photo: Pixels, arm: Arm = "champion") -> Scored | Refused:
        """One uint8 crop or checked upload in, with the arm its content hash chose (app/rollout.py); joins the next
        batch. Its score (with its queue, decode and forward time), or a refusal."""
        submitted = time.perf_counter()
        try:
            result = await self._batcher.submit((photo, arm))
        except Exception as err:  # noqa: BLE001 - one bad batch must not take the replica down
            self._log.error("inference failed", error=str(err))
            return Refused("inference_failed", f"the model failed on this batch: {err}")
        if isinstance(result, Scored):
            waited_ms = (time.perf_counter() - submitted) * 1000.0
            busy_ms = result.forward_ms + result.decode_ms
            result = dataclasses.replace(result, queue_ms=max(0.0, waited_ms - busy_ms))
        return result

    async def predict_many(self, items: list[tuple[Pixels, Arm]]) -> list[Scored | Refused]:
        """Several crops from one ingress call; each joins the batches like a single one, with other callers' crops."""
        return list(await asyncio.gather(*(self.predict(photo, arm) for photo, arm in items)))

    def _run(self, items: list[tuple[Pixels, Arm]]) -> list[Scored | Refused]:
        """One batch, on the batcher's worker thread: the champion scores what it answers and what a shadow is
        compared on, the challenger what its arm sends it; a model that fails fails its own photos only."""
        champion, challenger = self._active, self._challenger
        if champion is None:
            return [Refused("not_ready", self._problem)] * len(items)
        results: list[Scored | Refused] = [Refused("not_ready", self._problem)] * len(items)
        items, decode_ms = self._decoded(champion, items, results)
        tried = challenger is not None and challenger is not champion
        ok = [i for i, result in enumerate(results) if not isinstance(result, Refused) or result.kind != "bad_image"]
        main = [i for i in ok if items[i][1] != "challenger" or not tried]
        trial = [i for i in ok if items[i][1] != "champion" and tried]
        champion_p = self._score(champion, items, main, results, decode_ms=decode_ms)
        if tried:
            assert challenger is not None
            challenger_p = self._score(
                challenger,
                items,
                trial,
                results,
                answers=[i for i in trial if items[i][1] == "challenger"],
                decode_ms=decode_ms,
            )
            self._compare(champion, challenger, main, champion_p, trial, challenger_p, items)
        return results

    def _decoded(
        self, active: ActiveModel, items: list[tuple[Pixels, Arm]], results: list[Scored | Refused]
    ) -> tuple[list[tuple[Pixels, Arm]], dict[int, float]]:
        """The batch with every photo sent as bytes decoded and cropped on the model's device, in one go; a photo that
        does not decode gets its refusal in ``results``. The decode time is shared out over the photos it decoded."""
        sent = [i for i, (photo, _) in enumerate(items) if isinstance(photo, bytes)]
        if not sent:
            return items, {}
        from app.pixels import decode_crops

        started = time.perf_counter()
        crops = decode_crops([items[i][0] for i in sent], active.crop_size, active.device, self._settings.images)
        decode_ms = (time.perf_counter() - started) * 1000.0
        decoded = list(items)
        for i, crop in zip(sent, crops, strict=True):
            if isinstance(crop, Exception):
                results[i] = Refused("bad_image", str(crop), getattr(crop, "reason", "corrupt"))
            else:
                decoded[i] = (crop, items[i][1])
        return decoded, dict.fromkeys(sent, decode_ms)

    def _score(
        self,
        active: ActiveModel,
        items: list[tuple[Pixels, Arm]],
        indices: list[int],
        results: list[Scored | Refused],
        answers: list[int] | None = None,
        decode_ms: dict[int, float] | None = None,
    ) -> dict[int, float]:
        """Run one model on its share of the batch; the photos it answers (``answers``, default all) get results."""
        if not indices:
            return {}
        answers = indices if answers is None else answers
        started = time.perf_counter()
        try:
            rows = score_batch(active, [items[i][0] for i in indices])
        except Exception as err:  # noqa: BLE001 - one model's failure is its photos' 500, not the other model's
            self._log.error("inference failed", version=active.version, error=str(err))
            self._metrics.inc("model_scores_total", {"version": active.version, "verdict": "error"}, len(indices))
            for i in answers:
                results[i] = Refused("inference_failed", f"the model failed on this batch: {err}")
            return {}
        forward_s = time.perf_counter() - started
        facts = model_facts(active)
        scored = dict(zip(indices, (float(row[0]) for row in rows), strict=True))
        sources = dict(zip(indices, (source_scores(active, row) for row in rows), strict=True))
        for i in answers:
            results[i] = Scored(
                scored[i],
                facts,
                batch_size=len(items),
                forward_ms=forward_s * 1000.0,
                decode_ms=(decode_ms or {}).get(i, 0.0),
                source_scores=sources[i],
            )
        for p in scored.values():
            verdict = "ai_generated" if p >= active.threshold else "real"
            self._metrics.inc("model_scores_total", {"version": active.version, "verdict": verdict})
            self._metrics.observe("model_latency_seconds", forward_s, {"version": active.version})
        return scored

    def _compare(
        self,
        champion: ActiveModel,
        challenger: ActiveModel,
        main: list[int],
        champion_p: dict[int, float],
        trial: list[int],
        challenger_p: dict[int, float],
        items: list[tuple[Pixels, Arm]],
    ) -> None:
        """A shadow's verdict against the champion's on the same photo."""
        for i in trial:
            if items[i][1] != "shadow" or i not in champion_p or i not in challenger_p:
                continue
            agree = (champion_p[i] >= champion.threshold) == (challenger_p[i] >= challenger.threshold)
            self._metrics.inc("shadow_comparisons_total", {"version": challenger.version, "agree": str(agree).lower()})

    def _record(self, timing: BatchTiming) -> None:
        self._metrics.observe("prediction_batch_size", timing.size)
        self._metrics.observe("model_inference_seconds", timing.run_s)

    async def explain(self, crop: np.ndarray) -> Explained | Refused:
        """Grad-CAM for one crop, on the worker thread between two batches."""
        from serving.gradcam import ExplainUnsupportedError

        active = self._active
        if active is None:
            return Refused("not_ready", self._problem)
        try:
            return await self._batcher.on_worker(explain_crop, active, crop)
        except ExplainUnsupportedError as err:
            return Refused("explain_unsupported", str(err))
        except Exception as err:  # noqa: BLE001 - a failed heatmap is this request's 500, not the replica's end
            self._log.error("explain failed", error=str(err))
            return Refused("inference_failed", f"Grad-CAM failed: {err}")

    def active_version(self) -> str | None:
        """The version that answers the next batch (None before the first model is loaded)."""
        active = self._active
        return None if active is None else active.version

    def status(self) -> DetectorStatus:
        """Readiness and the loaded model, with its evaluation metrics (read when it was loaded) for /health.

        An unreachable registry leaves a loaded model ready: it still answers, only a new champion cannot arrive.
        """
        active, registry = self._active, self._registry
        state, problem = registry or (None, None)
        if active is None:
            return DetectorStatus(ready=False, detail=self._problem, model_uri=self._config.model_uri, registry=state)
        since = active.answering_since
        return DetectorStatus(
            ready=True,
            model_uri=active.uri,
            device=str(active.device),
            metrics=dict(active.evaluation),
            registry=state,
            detail=None
            if state != "unreachable"
            else f"model registry unreachable ({problem}); serving version {active.version} until it is back",
            model_loaded_at=None if since is None else since.isoformat(timespec="milliseconds"),
            model=model_facts(active),
            rollout=self.rollout(),
            challenger=None if self.rollout() is None or self._challenger is None else model_facts(self._challenger),
            rollout_ended=self._ended,
        )

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._batcher.close()


class LocalDetector:
    """The ingress's view of a detector in its own process (the colocated layout): plain awaits on the core."""

    def __init__(self, core: DetectorCore) -> None:
        self.core = core

    async def predict(self, photo: Pixels, arm: Arm = "champion") -> Scored | Refused:
        return await self.core.predict(photo, arm)

    async def explain(self, crop: np.ndarray) -> Explained | Refused:
        return await self.core.explain(crop)

    async def status(self) -> DetectorStatus:
        return self.core.status()


class RemoteDetector:
    """The ingress's view of the detector deployment (the split layout): calls through its Serve handle.

    Crops that queue in this ingress replica while its calls are in flight travel together in the next call: a call
    between deployments costs far more than the bytes of one more crop, so under load this divides the calls the
    detector has to take by the number of crops each carries.
    """

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self._calls: Batcher[tuple[Pixels, Arm], Scored | Refused] = Batcher(
            self._send, max_batch_size=COALESCE_MAX_CROPS, max_in_flight=COALESCE_CALLS_IN_FLIGHT
        )

    async def predict(self, photo: Pixels, arm: Arm = "champion") -> Scored | Refused:
        size = len(photo) if isinstance(photo, bytes) else photo.nbytes
        self._calls.max_batch_size = max(1, min(COALESCE_MAX_CROPS, COALESCE_MAX_BYTES // max(1, size)))
        return await self._calls.submit((photo, arm))

    async def _send(self, items: list[tuple[Pixels, Arm]]) -> list[Scored | Refused]:
        return await self.handle.predict_many.remote(items)

    async def explain(self, crop: np.ndarray) -> Explained | Refused:
        return await self.handle.explain.remote(crop)

    async def status(self) -> DetectorStatus:
        return await self.handle.status.remote()


@serve.deployment(name="DetectorDeployment")
class DetectorDeployment:
    """A detector replica: `DetectorCore` behind Serve's handle calls, its metrics merged application-wide."""

    def __init__(self, settings: dict[str, Any]) -> None:
        from app.logging import configure_logging
        from serving.metrics import MetricsRecorder

        parsed = Settings(**settings)
        configure_logging(parsed.log_format, parsed.log_level)
        self._metrics = MetricsRecorder(serve.get_replica_context().app_name)
        self._core = DetectorCore(parsed, self._metrics)

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        deployment_config = getattr(serve.get_replica_context(), "_deployment_config", None)
        self._core.configure(user_config, getattr(deployment_config, "max_ongoing_requests", None))

    def check_health(self) -> None:
        self._core.check_health()

    async def predict(self, photo: Pixels, arm: Arm = "champion") -> Scored | Refused:
        return await self._core.predict(photo, arm)

    async def predict_many(self, items: list[tuple[Pixels, Arm]]) -> list[Scored | Refused]:
        return await self._core.predict_many(items)

    async def explain(self, crop: np.ndarray) -> Explained | Refused:
        return await self._core.explain(crop)

    async def status(self) -> DetectorStatus:
        return self._core.status()

    def __del__(self) -> None:
        core = getattr(self, "_core", None)
        if core is not None:
            core.close()
        metrics = getattr(self, "_metrics", None)
        if metrics is not None:
            metrics.close()
