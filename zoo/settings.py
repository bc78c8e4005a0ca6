"""The one base of every declared set of options: catalog sections, architecture and data set
options, metric family settings, phase rules, benchmark method parameters. Strict (an unknown
field is an error naming it, not ignored) and frozen (options are hashed into ids and settings
hashes, so they must not change after validation). A number must be finite: inf or nan is refused."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # a number is finite
