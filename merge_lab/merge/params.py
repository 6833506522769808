"""Parameter resolution: a recipe value becomes one scalar for one tensor.

A value may be
- a scalar (`0.5`, `true`, `"mean"`),
- a layer gradient: a list of numbers interpolated across the decoder layers
  (`[0.2, 0.8]` goes from 0.2 at the first layer to 0.8 at the last),
- a list of conditionals `[{filter: self_attn, value: 0.3}, {value: 0.7}]`: the first whose
  `filter` is a substring of the tensor name (or that has no filter, or `*`) gives the value,
  which may itself be a gradient.

Gradient position, as in mergekit: t = layer / (num_layers - 1) for tensors in a layer (1 when
there is a single layer) and t = 0 for tensors outside the layers (embeddings, final norm, head).
"""

from __future__ import annotations

from typing import Any, Union

ParamValue = Union[float, int, bool, str, list, dict]


def gradient_position(layer: int | None, num_layers: int) -> float:
    if layer is None:
        return 0.0
    return layer / (num_layers - 1) if num_layers > 1 else 1.0


def resolve(value: ParamValue, tensor_name: str, t: float) -> Any:
    """The scalar that `value` takes for this tensor (None when no conditional matches)."""
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, (bool, str, int, float)) or value is None:
        return value
    if not value:
        return None
    if all(isinstance(v, dict) for v in value):
        for cond in value:
            flt = cond.get("filter")
            if flt is None or flt == "*" or flt in tensor_name:
                return resolve(cond.get("value"), tensor_name, t)
        return None
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        if len(value) == 1:
            return value[0]
        scaled = t * (len(value) - 1)
        i0 = int(scaled)
        i1 = min(len(value) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * value[i0] + frac * value[i1]
    if all(isinstance(v, (bool, str)) for v in value):
        return value[int(t * (len(value) - 1))]
    raise ValueError(f"cannot interpret {value!r}: use a scalar, a list of numbers, or a list of {{filter, value}}")


def check_shape(value: ParamValue) -> str | None:
    """Why `value` is not a valid parameter setting, or None when it is."""
    try:
        resolve(value, "", 0.0)
        if isinstance(value, (list, dict)):
            conds = value if isinstance(value, list) else [value]
            for c in conds:
                if isinstance(c, dict):
                    extra = set(c) - {"filter", "value"}
                    if extra:
                        return f"a conditional takes only 'filter' and 'value', not {sorted(extra)}"
                    if "value" not in c:
                        return "a conditional needs a 'value'"
                    inner = check_shape(c["value"])
                    if inner:
                        return inner
    except ValueError as e:
        return str(e)
    return None
