"""The ``triton`` backend: the ensemble ``pfjet_<variant>`` (image → jets) on a Triton server.

Contract (model_repository/README.md): input ``image`` FP32 [N, 3, 340, 360]; outputs ``jets`` FP32 [N, M, 5],
rows (label, score, eta, phi, pt) sorted by score and zero-padded to the request's largest count, and
``num_jets`` INT32 [N, 1]. Requests larger than the ensemble's ``max_batch_size`` are split into chunks
that are sent concurrently, so Triton's dynamic batcher sees them as it sees concurrent clients.

Transports (``JETSSD_TRITON_TRANSPORT``), all through ``tritonclient``'s asyncio clients:

* ``shm``: the image goes through a POSIX shared-memory region registered with Triton (the request carries
  only its name); jets come back as binary HTTP data. Same host (or shared IPC namespace) only.
* ``http``: binary tensor data in the HTTP body (1.47 MB per event).
* ``grpc``: protobuf over gRPC.
* ``auto`` (default): ``shm`` when Triton is on this host and accepts the region, else ``http``.

Measured p50 over in-process ORT + post-processing, one event per request, 2-core machine: shm +1.5–1.8 ms,
HTTP +3.5 ms, gRPC +6 ms on a quiet machine (reference/triton-without-docker.md); through this backend on a
saturated one (load 5–6): shm +0.9…+4.2 ms, HTTP +5.7…+12.7 ms, gRPC +1.9…+15.8 ms. Shared memory was the
cheapest in every run, hence the default.

Triton may start after the gateway, go away and come back. A request that cannot reach it fails fast with
503 + ``Retry-After``; for ``retry_after_s`` afterwards requests fail (or fall back) without trying, then
the next one tries again. A successful readiness probe closes that window at once. Shared-memory regions
are registered again whenever the connection is re-established (a restarted Triton forgets them).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import aiohttp
import numpy as np
from numpy.typing import NDArray

from jetssd import geometry
from jetssd.triton import unpack_jets
from jetssd_service.backends.base import BackendStatus, BatchResult
from jetssd_service.errors import ApiError, BackendUnavailableError
from jetssd_service.repository import SSD_PREFIX, ModelRepository, ensemble_name
from jetssd_service.settings import Settings

log = logging.getLogger(__name__)

INPUT = "image"
OUTPUT_JETS = "jets"
OUTPUT_NUM = "num_jets"
SHM_SLOT_EVENTS = 16
"""Events one shared-memory region holds (the ensemble's max_batch_size in the contract)."""
_IMAGE_BYTES = int(np.prod(geometry.IMAGE_SHAPE)) * 4
_LOOPBACK = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}


@dataclass(frozen=True)
class _ModelInfo:
    max_batch_size: int
    version: int


class _ShmSlot:
    """One registered region: a float32 [SHM_SLOT_EVENTS, 3, 340, 360] array Triton reads the images from."""

    def __init__(self, name: str) -> None:
        from tritonclient.utils import shared_memory as shm

        self.name = name
        self.key = f"/{name}"
        self.byte_size = SHM_SLOT_EVENTS * _IMAGE_BYTES
        self.handle = shm.create_shared_memory_region(name, self.key, self.byte_size, create_only=True)
        self.array: NDArray[np.float32] = shm.get_contents_as_numpy(
            self.handle, np.float32, (SHM_SLOT_EVENTS, *geometry.IMAGE_SHAPE))

    def destroy(self) -> None:
        from tritonclient.utils import shared_memory as shm

        del self.array
        shm.destroy_shared_memory_region(self.handle)


def _status_code(exc: Exception) -> str:
    status = getattr(exc, "status", None)
    value = status() if callable(status) else status
    return str(value or "")


def _is_connection_error(exc: BaseException) -> bool:
    """Triton not reachable (refused, reset, DNS, gRPC UNAVAILABLE), as opposed to an answer with an error."""
    if isinstance(exc, aiohttp.ClientConnectionError | ConnectionError | OSError):
        return True
    return _status_code(exc if isinstance(exc, Exception) else Exception()) in (
        "StatusCode.UNAVAILABLE", "StatusCode.CANCELLED")


class TritonBackend:
    """Calls the ``pfjet_<variant>`` ensembles of a Triton server.

    Args:
        settings: host, ports, transport, timeouts and the Retry-After of 503s.
        repository: the variants (the gateway's list of model names).
    """

    name = "triton"

    def __init__(self, settings: Settings, repository: ModelRepository) -> None:
        self._settings = settings
        self._repository = repository
        self._retry_after = settings.triton_retry_after_s
        self._requested = settings.triton_transport
        # auto: shared memory only when Triton is on this host; an explicit "shm" is also tried for other hosts
        # (containers that share the IPC namespace, e.g. docker compose `ipc: service:triton`).
        self.transport = "grpc" if self._requested == "grpc" else "http"
        if self._requested == "shm" or (self._requested == "auto" and settings.triton_host in _LOOPBACK):
            self.transport = "shm"
        self._client: Any = None
        self._api: ModuleType | None = None  # tritonclient.http or tritonclient.grpc (InferInput & co.)
        self._connected = False
        self._down_until = 0.0
        self._last_error = "not contacted yet"
        self._models: dict[str, _ModelInfo] = {}
        self._slots: list[_ShmSlot] = []
        self._free: asyncio.Queue[_ShmSlot] | None = None
        self._connect_lock: asyncio.Lock | None = None

    # ------------------------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._connect_lock = asyncio.Lock()
        timeout = self._settings.triton_timeout_s
        if self.transport == "grpc":
            import tritonclient.grpc as api
            import tritonclient.grpc.aio as grpc_aio

            self._api = api
            self._client = grpc_aio.InferenceServerClient(self._settings.triton_grpc_url)
        else:
            import tritonclient.http as api
            import tritonclient.http.aio as http_aio

            self._api = api
            self._client = http_aio.InferenceServerClient(self._settings.triton_http_url, conn_timeout=timeout)
        try:  # Triton may come up later: not being able to connect now is no reason to fail startup
            await self._ensure_connected()
        except ApiError as exc:  # already logged by _mark_down
            log.info("triton not available at startup (%s); will retry on demand", exc.code)

    def _create_slots(self) -> None:
        prefix = f"jetssd_gw_{os.getpid()}_{id(self) & 0xFFFFFF:x}"
        try:
            self._slots = [_ShmSlot(f"{prefix}_{i}") for i in range(self._settings.triton_shm_slots)]
        except Exception as exc:
            log.warning("triton: cannot create shared-memory regions (%s): using http", exc)
            self._destroy_slots()
            self.transport = "http"
            return
        self._free = asyncio.Queue()
        for slot in self._slots:
            self._free.put_nowait(slot)

    def _destroy_slots(self) -> None:
        for slot in self._slots:
            try:
                slot.destroy()
            except Exception as exc:
                log.debug("triton: destroying %s: %s", slot.name, exc)
        self._slots = []

    async def close(self) -> None:
        if self._client is not None:
            if self._slots and self._connected:
                for slot in self._slots:
                    try:
                        await asyncio.wait_for(self._client.unregister_system_shared_memory(slot.name),
                                               self._settings.triton_probe_timeout_s)
                    except Exception as exc:
                        log.debug("triton: unregistering %s: %s", slot.name, exc)
            await self._client.close()
            self._client = None
        self._destroy_slots()

    # --------------------------------------------------------------------------------------- connection

    def _mark_down(self, reason: str) -> BackendUnavailableError:
        """Remember that Triton is unreachable; the error to raise (503 + Retry-After)."""
        if self._connected or self._down_until == 0.0:  # log the transition, not every refused request
            log.warning("triton at %s unavailable: %s", self._where, reason)
        self._connected = False
        self._models.clear()
        self._last_error = reason
        self._down_until = time.monotonic() + self._retry_after
        return BackendUnavailableError(f"Triton at {self._where} is unavailable: {reason}", self._retry_after)

    @property
    def _where(self) -> str:
        return self._settings.triton_grpc_url if self.transport == "grpc" else self._settings.triton_http_url

    async def _call(self, coroutine: Any, timeout: float) -> Any:
        """Await a client call; connection problems become :class:`BackendUnavailableError`."""
        try:
            return await asyncio.wait_for(coroutine, timeout)
        except TimeoutError:
            raise BackendUnavailableError(f"Triton at {self._where} did not answer within {timeout:g} s",
                                          self._retry_after) from None
        except Exception as exc:
            if _is_connection_error(exc):
                raise self._mark_down(f"{type(exc).__name__}: {exc}") from None
            raise

    async def _ensure_connected(self) -> None:
        """Check that the server is ready and (shm) register the regions, once per connection."""
        if self._connected:
            return
        assert self._connect_lock is not None
        async with self._connect_lock:
            if self._connected:
                return
            probe = self._settings.triton_probe_timeout_s
            if not await self._call(self._client.is_server_ready(), probe):
                raise self._mark_down("server is not ready")
            if self.transport == "shm":
                if not self._slots:
                    self._create_slots()
                if self._slots:
                    await self._register_slots()
            self._connected = True
            self._down_until = 0.0
            log.info("triton: connected to %s (transport %s)", self._where, self.transport)

    async def _register_slots(self) -> None:
        probe = self._settings.triton_probe_timeout_s
        for slot in self._slots:
            try:  # a region of that name may survive from before a reconnect
                await self._call(self._client.unregister_system_shared_memory(slot.name), probe)
            except BackendUnavailableError:
                raise
            except Exception as exc:
                log.debug("triton: unregister %s before registering: %s", slot.name, exc)
            try:
                await self._call(self._client.register_system_shared_memory(slot.name, slot.key, slot.byte_size),
                                 probe)
            except BackendUnavailableError:
                raise
            except Exception as exc:
                if self._requested == "shm":
                    raise self._mark_down(f"cannot register shared memory {slot.key}: {exc}") from exc
                log.warning("triton: shared memory not accepted (%s): using http", exc)
                self._destroy_slots()
                self.transport = "http"
                return

    async def _model_info(self, variant: str) -> _ModelInfo:
        info = self._models.get(variant)
        if info is not None:
            return info
        timeout = self._settings.triton_probe_timeout_s
        ensemble = ensemble_name(variant)
        try:
            config = await self._call(self._client.get_model_config(ensemble, **self._json_kwargs()), timeout)
            metadata = await self._call(
                self._client.get_model_metadata(SSD_PREFIX + variant, **self._json_kwargs()), timeout)
        except BackendUnavailableError:
            raise
        except Exception as exc:
            raise self._model_error(variant, exc) from None
        config = config.get("config", config)  # gRPC wraps the config
        versions = [int(v) for v in metadata.get("versions", []) if str(v).isdigit()]
        version = max(versions) if versions else self._repository[variant].version
        info = _ModelInfo(int(config.get("max_batch_size", 0)) or 1, version)
        self._models[variant] = info
        return info

    def _json_kwargs(self) -> dict[str, Any]:
        return {"as_json": True} if self.transport == "grpc" else {}

    def _model_error(self, variant: str, exc: Exception) -> ApiError:
        text = str(exc)
        if "unknown model" in text or "not ready" in text or "not found" in text or "no available" in text:
            return BackendUnavailableError(f"Triton has not loaded {ensemble_name(variant)}: {text}",
                                           self._retry_after, code="model_unavailable")
        return ApiError("backend_error", f"Triton error for {ensemble_name(variant)}: {text}", field="backend")

    # -------------------------------------------------------------------------------------------- probe

    async def status(self, variant: str) -> BackendStatus:
        if self._client is None:
            return BackendStatus(False, "backend not started")
        if variant not in self._repository:
            return BackendStatus(False, f"no model {variant!r} in {self._repository.root}")
        probe = self._settings.triton_probe_timeout_s
        try:
            await self._ensure_connected()
            if not await self._call(self._client.is_model_ready(ensemble_name(variant)), probe):
                return BackendStatus(False, f"Triton has not loaded {ensemble_name(variant)}")
        except ApiError as exc:
            return BackendStatus(False, exc.message)
        except Exception as exc:
            return BackendStatus(False, f"{type(exc).__name__}: {exc}")
        return BackendStatus(True)

    # -------------------------------------------------------------------------------------------- infer

    async def detect(self, variant: str, images: NDArray[np.float32]) -> BatchResult:
        if self._client is None:
            raise RuntimeError("TritonBackend.start() was not called")
        wait = self._down_until - time.monotonic()
        if wait > 0:
            raise BackendUnavailableError(f"Triton at {self._where} is unavailable: {self._last_error}",
                                          max(1, math.ceil(wait)))
        await self._ensure_connected()
        info = await self._model_info(variant)
        chunk = max(1, min(info.max_batch_size, SHM_SLOT_EVENTS if self.transport == "shm" else info.max_batch_size))
        t0 = time.perf_counter()
        parts = await asyncio.gather(*(self._infer(variant, images[a:a + chunk])
                                       for a in range(0, len(images), chunk)))
        t1 = time.perf_counter()
        try:
            detections = [d for jets, num in parts for d in unpack_jets(jets, num)]
        except ValueError as exc:
            raise ApiError("backend_error", f"{ensemble_name(variant)} answered malformed jets: {exc}",
                           field="backend") from None
        t2 = time.perf_counter()
        return BatchResult(detections, info.version, 1e3 * (t1 - t0), 1e3 * (t2 - t1))

    async def _infer(self, variant: str, images: NDArray[np.float32], retry: bool = True
                     ) -> tuple[NDArray[np.float32], NDArray[np.int32]]:
        try:
            if self.transport == "shm":
                return await self._infer_shm(variant, images)
            return await self._infer_once(variant, images, None)
        except ApiError:
            raise
        except Exception as exc:
            text = str(exc)
            if retry and self.transport == "shm" and "shared memory" in text:
                # Triton restarted between two requests and forgot the regions: register again, retry once.
                log.info("triton: shared-memory regions unknown to the server, registering again")
                self._connected = False
                await self._ensure_connected()
                return await self._infer(variant, images, retry=False)
            raise self._model_error(variant, exc) from None

    async def _infer_shm(self, variant: str, images: NDArray[np.float32]) -> tuple[NDArray[np.float32],
                                                                                     NDArray[np.int32]]:
        assert self._free is not None
        slot = await self._free.get()
        try:
            slot.array[:len(images)] = images
            return await self._infer_once(variant, images, slot)
        finally:
            self._free.put_nowait(slot)

    async def _infer_once(self, variant: str, images: NDArray[np.float32], slot: _ShmSlot | None
                          ) -> tuple[NDArray[np.float32], NDArray[np.int32]]:
        assert self._api is not None
        api = self._api
        image = api.InferInput(INPUT, list(images.shape), "FP32")
        if slot is not None:
            image.set_shared_memory(slot.name, images.nbytes)
        elif self.transport == "grpc":
            image.set_data_from_numpy(np.ascontiguousarray(images))
        else:
            image.set_data_from_numpy(np.ascontiguousarray(images), binary_data=True)
        if self.transport == "grpc":
            outputs = [api.InferRequestedOutput(OUTPUT_JETS), api.InferRequestedOutput(OUTPUT_NUM)]
        else:
            outputs = [api.InferRequestedOutput(OUTPUT_JETS, binary_data=True),
                       api.InferRequestedOutput(OUTPUT_NUM, binary_data=True)]
        result = await self._call(self._client.infer(ensemble_name(variant), [image], outputs=outputs),
                                  self._settings.triton_timeout_s)
        jets = result.as_numpy(OUTPUT_JETS)
        num = result.as_numpy(OUTPUT_NUM)
        if jets is None or num is None or len(jets) != len(images) or len(num) != len(images):
            raise ApiError("backend_error", f"{ensemble_name(variant)} answered without {OUTPUT_JETS}/{OUTPUT_NUM} "
                                            f"for {len(images)} event(s)", field="backend")
        return jets, num

