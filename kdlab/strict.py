"""The base of every validated settings model (recipes, loss-term options): strict about what it accepts."""

from __future__ import annotations

from types import UnionType
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, field_validator


class Strict(BaseModel):
    # no NaN/inf anywhere: an infinite lr or warm-up would otherwise validate and fail (or do
    # nothing) only once training runs
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_as_number(cls, value: Any, info) -> Any:
        # YAML reads yes/no/on/off/true as booleans, which pydantic would quietly turn into 1 / 0
        if isinstance(value, bool) and _is_numeric(cls.model_fields[info.field_name].annotation):
            raise ValueError(f"expected a number, got {str(value).lower()}")
        return value


def _is_numeric(annotation: Any) -> bool:
    if get_origin(annotation) in (Union, UnionType):  # int | None
        args = get_args(annotation)
        return bool not in args and any(_is_numeric(a) for a in args)
    return annotation in (int, float)
