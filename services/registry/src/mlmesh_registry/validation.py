"""What the registry checks itself: only what its contracts' buf.validate
rules cannot say. The chassis checks every request against those rules
(names, tags, lengths, ranges) before a handler runs; what is left here is
list paging (the page size's default and cap, the page byte limit; page
tokens are the chassis' key tokens, mlmesh_chassis.pagination) and the
lineage size cap (a serialized size, which no rule can measure). The
update masks and the rules that need more than one field or the database
(an experiment's weights, the versions it routes to) are with the store's
aggregates.
"""

from __future__ import annotations

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
# A version's lineage, serialized (an environment lock and a source snapshot
# are tens of KiB; this leaves room for large trees).
MAX_LINEAGE_BYTES = 1024 * 1024
# A list page stops before its serialized items exceed this (far below the
# 4 MiB default gRPC message limit); next_page_token continues.
MAX_PAGE_BYTES = 1024 * 1024


def page_size(value: int) -> int:
    """The size of a list page: the default where none is asked for (0), at
    most MAX_PAGE_SIZE. (The contract refuses a negative page_size.)"""
    return min(value, MAX_PAGE_SIZE) if value > 0 else DEFAULT_PAGE_SIZE
