"""Service settings from ``JETSSD_*`` environment variables (pydantic-settings).

One :class:`Settings` object configures the gateway, its backends and the Triton launcher; every field is
also an environment variable (``JETSSD_`` + the upper-case field name, e.g. ``JETSSD_GATEWAY_PORT=9000``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Backend = Literal["triton", "local", "dsp"]
BACKENDS: tuple[Backend, ...] = ("triton", "local", "dsp")
TritonTransport = Literal["auto", "shm", "http", "grpc"]


def default_model_repository() -> Path:
    """The repository's ``model_repository/`` for a source checkout, else ``./model_repository``."""
    checkout = Path(__file__).resolve().parents[2] / "model_repository"
    return checkout if checkout.is_dir() else Path("model_repository")


class Settings(BaseSettings):
    """Gateway, backend and Triton settings; see the field descriptions (also in ``docs``)."""

    model_config = SettingsConfigDict(env_prefix="JETSSD_", env_ignore_empty=True, extra="ignore")

    # --- where things are ---------------------------------------------------------------------------------
    model_repository: Path = Field(
        default_factory=default_model_repository,
        description="Triton model repository holding pfjet_ssd_<variant>/<version>/.")
    gateway_host: str = Field(
        default="127.0.0.1", description="Interface the gateway listens on (0.0.0.0 in a container).")
    gateway_port: int = Field(default=8080, ge=1, le=65535, description="Gateway HTTP port.")
    triton_host: str = Field(default="127.0.0.1", description="Host of the Triton server.")
    triton_http_port: int = Field(default=8000, ge=1, le=65535, description="Triton HTTP/REST port.")
    triton_grpc_port: int = Field(default=8001, ge=1, le=65535, description="Triton gRPC port.")
    triton_metrics_port: int = Field(default=8002, ge=1, le=65535, description="Triton Prometheus metrics port.")

    # --- request defaults -----------------------------------------------------------------------------------
    default_backend: Backend = Field(default="triton", description="Backend of requests that name none.")
    default_model: str = Field(default="twn", description="Model variant of requests that name none (pruned TWN).")

    # --- Triton client --------------------------------------------------------------------------------------
    triton_transport: TritonTransport = Field(
        default="auto",
        description="How images reach Triton: 'shm' (system shared memory, same host only, control over HTTP), "
                    "'http' (binary tensor data), 'grpc'; 'auto' = shm when Triton is on this host and accepts "
                    "the region, else http.")
    triton_timeout_s: float = Field(default=30.0, gt=0, description="Timeout of one Triton inference call, seconds.")
    triton_probe_timeout_s: float = Field(default=1.0, gt=0, description="Timeout of Triton health probes, seconds.")
    triton_retry_after_s: int = Field(
        default=2, ge=1,
        description="Retry-After of a 503 when Triton is unreachable; also how long the gateway waits before it "
                    "tries an unreachable Triton again (a successful /readyz probe ends the wait at once).")
    triton_shm_slots: int = Field(
        default=4, ge=1, description="Shared-memory regions, i.e. Triton calls in flight at once (16 events each).")
    fallback_to_local: bool = Field(
        default=False,
        description="When Triton is unreachable, answer from the local backend (SONIC's CPU fallback); the response "
                    "then says backend 'local', fallback_from 'triton', and has the header X-JetSSD-Fallback.")

    # --- local backend --------------------------------------------------------------------------------------
    local_threads: int = Field(
        default=1, ge=1,
        description="ONNX Runtime intra-op threads per local model. 1 on the shared 2-core machine: 2 threads were "
                    "slower whenever another process held a core.")
    local_max_concurrency: int = Field(
        default=1, ge=1, description="Local inferences at once; more requests wait (ORT already uses the cores).")
    local_preload: bool = Field(default=True, description="Load every local model at startup (else on first use).")
    local_batch_size: int = Field(default=16, ge=1, description="Events per ONNX Runtime run of the local backend.")

    # --- dsp backend (fixed-point SensPro emulator, docs/dsp.md) ----------------------------------------------
    dsp_max_concurrency: int = Field(
        default=1, ge=1, description="DSP emulations at once; more requests wait (each uses one core).")
    dsp_batch_size: int = Field(
        default=4, ge=1, description="Events per emulator run (its buffers are reused, ~60 MB per event).")

    # --- limits ---------------------------------------------------------------------------------------------
    max_events_per_request: int = Field(default=64, ge=1, description="Events in one request (413 above).")
    max_candidates_per_event: int = Field(
        default=50_000, ge=1,
        description="PF candidates or sparse pixels in one event (413 above); μ = 50 events have about 2.5k.")
    max_body_bytes: int = Field(
        default=32 * 1024 * 1024, ge=1024,
        description="Request body size (413 above). 32 MiB: ~300 PF-candidate events at μ = 50, or 16 dense "
                    "float32 images (1.96 MB each in base64).")

    @field_validator("default_model")
    @classmethod
    def _variant_name(cls, value: str) -> str:
        if not value.isidentifier():
            raise ValueError(f"not a model variant name: {value!r}")
        return value

    @property
    def triton_http_url(self) -> str:
        """``host:port`` of Triton's HTTP endpoint (tritonclient's URL form)."""
        return f"{self.triton_host}:{self.triton_http_port}"

    @property
    def triton_grpc_url(self) -> str:
        """``host:port`` of Triton's gRPC endpoint."""
        return f"{self.triton_host}:{self.triton_grpc_port}"
