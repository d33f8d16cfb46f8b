"""Service settings: one typed place, each field documented, env prefix MOESCOPE_."""
from __future__ import annotations

import os

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MOESCOPE_", extra="ignore")

    store: str = Field("moescope-data", description="Store directory (Parquet segments, checkpoints, the default SQLite metadata DB), or an object-storage URL for the segments such as s3://bucket/prefix (any fsspec URL; credentials and endpoint from the AWS_* environment variables; needs database_url).")
    database_url: str | None = Field(None, description="SQLAlchemy URL of the metadata DB; default sqlite:///<store>/meta.sqlite (a store on object storage needs one, e.g. PostgreSQL).")
    broker_url: str = Field("redis://127.0.0.1:6379/0", description="Redis URL: Celery broker and the frame stream.")
    stream: str = Field("moescope:frames", description="Redis stream the probe writes frames to.")
    dead_letter_stream: str = Field("moescope:dead", description="Redis stream for frames that failed validation, with the reason.")
    api_token: str | None = Field(None, description="Bearer token required by the API for writes (alerts); reads stay open when unset, and writes are then accepted only when the server is bound to loopback.")
    host: str = Field("127.0.0.1", description="Address `moescope serve` binds to.")
    port: int = Field(8050, description="Port `moescope serve` binds to.")
    claim_idle_s: float = Field(30.0, description="A frame a worker took but has not acknowledged for this long is taken over by another worker.")
    ingest_threads: int = Field(2, ge=1, description="Stream consumer threads per `moescope worker` process.")
    ack_ttl_s: int = Field(7 * 86400, description="How long a producer's set of acknowledged (and rejected) frame ids lives in Redis after the last write.")
    debug: bool = Field(False, description="Show tracebacks instead of one-line errors on the command line.")
    compact_interval_s: float = Field(60.0, description="How often beat schedules segment compaction.")
    retention_days: float | None = Field(None, description="Drop runs older than this many days (None keeps everything).")
    alert_interval_s: float = Field(30.0, gt=0, description="How often beat (or `moescope serve --evaluate-alerts`) evaluates the alert rules.")
    webhook_allowed_hosts: list[str] = Field(default_factory=list, description="Hosts alert webhooks may post to, as glob patterns (e.g. [\"hooks.slack.com\", \"*.corp.example\"]); empty allows any host. Checked when a rule is created and at each delivery.")

    @field_validator("store", mode="before")
    @classmethod
    def _path_to_text(cls, value):
        return os.fspath(value) if isinstance(value, os.PathLike) else value


def get_settings(**overrides) -> Settings:
    return Settings(**{k: v for k, v in overrides.items() if v is not None})
