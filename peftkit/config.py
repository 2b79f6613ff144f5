"""The base of every recipe section, shared by recipe.py and the per-method / per-task `Config` classes."""

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """Unknown keys are errors, never silently ignored; assignments are validated too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
