"""The request layer: one validated pydantic object per entrance (train estimate, sweep, serve
estimate, serve simulation), built by both the CLI and the Python API.

Dependencies point down: the CLI and :mod:`simcost.api` build a request here; the simulator
never imports this package back.
"""
from simcost.request.fields import (Request, parse_duration_s, parse_int_list,
                                    parse_len_range)

__all__ = ["Request", "parse_duration_s", "parse_int_list", "parse_len_range"]
