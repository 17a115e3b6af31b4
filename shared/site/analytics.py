"""Site-file section owned by analytics."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class AnalyticsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    average_slots_s: list[int] = Field(
        default_factory=lambda: [5, 10, 20, 30, 60], description="moving-average windows"
    )
    demand_window_s: int = Field(900, ge=60, le=3600, description="billing demand window")
