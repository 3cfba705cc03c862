"""``[ignition]``: where the ignition state comes from; it switches the reporting policy to `parked`."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from agent.model.settings import LineOffset, Role, Section


class IgnitionConfig(Section):
    """Where the ignition state comes from; it switches the reporting policy to `parked`."""

    source: Literal["gpio"] = "gpio"
    chip: Annotated[str, Field(min_length=1), Role("gpiochip", "a GPIO chip")] = "pinctrl-bcm2711"
    """The GPIO chip's label (``gpioinfo`` shows it) or its path (``/dev/gpiochip0``)."""
    line: LineOffset | Annotated[str, Field(min_length=1)] = 17
    """Line offset on the chip, or the line's name."""
    active_low: bool = False
    """True when the input reads low with the ignition on (an opto-coupler pulling down)."""
    bias: Literal["as-is", "pull-up", "pull-down", "disabled"] = "as-is"
    debounce_ms: Annotated[int, Field(ge=0, le=60_000)] = 300
    """A level must hold this long to count: cranking the engine makes the line bounce."""

    @property
    def driver(self) -> str:
        """The registry name of the driver this section selects (drivers/__init__.py)."""
        return self.source
