"""The base page's task table: its query (filter, sort, page) checked, and one page of rows.

The plain view — sequence order, no filter — reads just its page from the registry
(`Manager.task_summaries` with limit and offset), so its cost does not grow with the base. Any
other order or a filter needs every task's summary: those come from the report cache
(taps_cl.serving.ui.cache), are filtered and sorted here, and then cut to the page.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Optional

from registry.entities import TaskSummary
from taps_cl.errors import TapsError

PER_PAGE = 50  # rows of a page unless `per_page` says otherwise
MAX_PER_PAGE = 500
STATUSES = ("ready", "training")


class BadQuery(TapsError):
    """A query parameter the pages do not accept (answered with 400)."""


def group_of(t: TaskSummary) -> Optional[str]:
    """The similarity group a task belongs to, for methods that put tasks in groups."""
    group = t.method_config.get("group")
    return group if isinstance(group, str) and group else None


# Sort keys of the table's columns; a task without a value (None) sorts last either way.
SORTS: dict[str, Callable[[TaskSummary], Any]] = {
    "position": lambda t: t.position,
    "name": lambda t: t.name,
    "method": lambda t: t.method,
    "group": group_of,
    "layers": lambda t: t.active_layers,
    "params": lambda t: t.task_params if t.sha256 is not None else None,  # and × base
    "bytes": lambda t: t.bytes if t.sha256 is not None else None,
    "accuracy": lambda t: t.test_accuracy,
    "status": lambda t: t.status,
    "created": lambda t: t.created_at,
}


@dataclass(frozen=True)
class TableQuery:
    """What the table shows: filters (all must hold), the sort column and order, the page."""

    q: str = ""  # part of the task's name (case-insensitive)
    method: str = ""  # exactly this method
    status: str = ""  # "ready" or "training"
    group: str = ""  # exactly this group
    sort: str = "position"
    order: str = "asc"
    page: int = 1
    per_page: int = PER_PAGE

    @classmethod
    def parse(cls, params: Mapping[str, str]) -> TableQuery:
        """The query from URL parameters; BadQuery naming the parameter that is wrong."""
        sort = params.get("sort", "position")
        if sort not in SORTS:
            raise BadQuery(f"sort must be one of {', '.join(SORTS)}, got {sort!r}")
        order = params.get("order", "asc")
        if order not in ("asc", "desc"):
            raise BadQuery(f"order must be asc or desc, got {order!r}")
        status = params.get("status", "")
        if status not in ("", *STATUSES):
            raise BadQuery(f"status must be {' or '.join(STATUSES)}, got {status!r}")
        return cls(q=params.get("q", "").strip(), method=params.get("method", "").strip(),
                   status=status, group=params.get("group", "").strip(), sort=sort,
                   order=order, page=whole(params, "page", 1, 1),
                   per_page=whole(params, "per_page", PER_PAGE, 1, MAX_PER_PAGE))

    @property
    def in_sequence(self) -> bool:
        """Sequence order without filters: the page can be read alone."""
        return self.sort == "position" and self.order == "asc" and not self.filtered

    @property
    def filtered(self) -> bool:
        return bool(self.q or self.method or self.status or self.group)

    @property
    def offset(self) -> int:
        return (self.page - 1) * self.per_page

    def params(self, **changes: Any) -> dict[str, str]:
        """This query's non-default parameters with `changes`: the links of the table."""
        changed = replace(self, **changes)
        default = TableQuery()
        return {k: str(getattr(changed, k)) for k in ("q", "method", "status", "group", "sort",
                                                      "order", "page", "per_page")
                if getattr(changed, k) != getattr(default, k)}

    def keep(self, t: TaskSummary) -> bool:
        """Whether task `t` passes the filters."""
        return ((not self.q or self.q.lower() in t.name.lower())
                and (not self.method or t.method == self.method)
                and (not self.status or t.status == self.status)
                and (not self.group or group_of(t) == self.group))

    def rows(self, summaries: Sequence[TaskSummary]) -> list[TaskSummary]:
        """Every task that passes the filters, in this query's order (None values last)."""
        kept = [t for t in summaries if self.keep(t)]
        key = SORTS[self.sort]
        known = [t for t in kept if key(t) is not None]
        unknown = [t for t in kept if key(t) is None]
        known.sort(key=lambda t: (key(t), t.name), reverse=self.order == "desc")
        return known + unknown


@dataclass(frozen=True)
class TablePage:
    """One page of the table and where it lies among the matching tasks."""

    query: TableQuery
    rows: tuple[TaskSummary, ...]
    matching: int  # tasks that pass the filters
    total: int  # tasks of the base

    @property
    def pages(self) -> int:
        return max(1, math.ceil(self.matching / self.query.per_page))


def table_page(query: TableQuery, total: int,
               page_of_sequence: Callable[[int, int], list[TaskSummary]],
               every_summary: Callable[[], Sequence[TaskSummary]]) -> TablePage:
    """The page `query` asks for. `page_of_sequence(limit, offset)` reads a page in sequence
    order; `every_summary()` gives all of the base's tasks (for another order or a filter)."""
    if query.in_sequence:
        rows = page_of_sequence(query.per_page, query.offset) if query.offset < total else []
        return TablePage(query, tuple(rows), total, total)
    matching = query.rows(every_summary())
    return TablePage(query, tuple(matching[query.offset:query.offset + query.per_page]),
                     len(matching), total)


def whole(params: Mapping[str, str], name: str, default: int, least: int,
          most: Optional[int] = None) -> int:
    """Integer parameter `name` in [least, most]; BadQuery otherwise."""
    text = params.get(name)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise BadQuery(f"{name} must be a whole number, got {text!r}") from None
    if value < least or (most is not None and value > most):
        bounds = f"at least {least}" if most is None else f"between {least} and {most}"
        raise BadQuery(f"{name} must be {bounds}, got {value}")
    return value


def flag(params: Mapping[str, str], name: str, default: bool) -> bool:
    """Boolean parameter `name` (1/0, true/false, yes/no); BadQuery otherwise."""
    text = params.get(name)
    if text is None or text == "":
        return default
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise BadQuery(f"{name} must be 1 or 0, got {text!r}")
