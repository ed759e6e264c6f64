"""A step's plan (runner.StepPlan) as one int64 tensor: what rank 0 broadcasts to the other ranks.

Layout: each list of ints is its length then its items; a list of records is its count then each
record's scalars followed by its block table (a list). One broadcast of a few hundred to a few
thousand int64s per step, no pickling.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from kvserve.runner import StepPlan

_INT_LISTS = (
    "input_ids",
    "positions",
    "slots",
    "decode_lens",
    "window_slots",
    "window_starts",
    "sample_rows",
    "logprob_rows",
)
_RECORD_LISTS = ("key_spans", "prefills")  # records (a, b, c, table, d, e)


def pack_plan(plan: StepPlan) -> torch.Tensor:
    out: list[int] = []

    def add_list(items: list[int]) -> None:
        out.append(len(items))
        out.extend(items)

    for name in _INT_LISTS:
        add_list(getattr(plan, name))
    out.append(len(plan.decode_tables))
    for table in plan.decode_tables:
        add_list(table)
    for name in _RECORD_LISTS:
        records = getattr(plan, name)
        out.append(len(records))
        for a, b, c, table, d, e in records:
            out.extend((a, b, c, d, e))
            add_list(table)
    return torch.tensor(out, dtype=torch.int64)


def unpack_plan(packed: torch.Tensor) -> StepPlan:
    from kvserve.runner import StepPlan

    values = packed.tolist()
    at = 0

    def take(n: int) -> list[int]:
        nonlocal at
        items = values[at : at + n]
        at += n
        return items

    def take_list() -> list[int]:
        return take(take(1)[0])

    plan = StepPlan()
    for name in _INT_LISTS:
        setattr(plan, name, take_list())
    plan.decode_tables = [take_list() for _ in range(take(1)[0])]
    for name in _RECORD_LISTS:
        records = []
        for _ in range(take(1)[0]):
            a, b, c, d, e = take(5)
            records.append((a, b, c, take_list(), d, e))
        setattr(plan, name, records)
    if at != len(values):
        raise ValueError(f"a step plan of {len(values)} ints had {len(values) - at} left over")
    return plan
