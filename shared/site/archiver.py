"""Site-file section owned by the archiver."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ArchiverConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(500, ge=1, le=100_000)
    flush_interval_s: float = Field(1.0, gt=0, le=60)
