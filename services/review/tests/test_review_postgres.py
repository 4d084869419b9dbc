"""The review queue on the machine's PostgreSQL: the same races as on
SQLite (one verdict and one claim per item), through the real migrations."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from mlmesh.review.v1 import review_service_pb2 as rpc
from mlmesh_chassis.testing import fresh_postgres_database
from reviewkit import Review, race_claims, race_verdicts, shadow_item, start_review, stop_review

pytestmark = pytest.mark.postgres


@pytest.fixture(scope="module")
async def review_pg(tmp_path_factory, review_registry) -> AsyncIterator[Review]:
    target, secret = review_registry
    with fresh_postgres_database("mlmesh_review") as url:
        running = await start_review(
            tmp_path_factory.mktemp("review-pg"), target, secret, database_url=url
        )
        yield running
        await stop_review(running)


async def test_verdict_race_on_postgres(review_pg: Review) -> None:
    outcomes = await race_verdicts(review_pg, "pgrace", 8)
    assert sum(outcomes.values()) == 8


async def test_claim_race_on_postgres(review_pg: Review) -> None:
    await race_claims(review_pg, "pgclaim", 6)


async def test_submit_is_idempotent_on_postgres(review_pg: Review) -> None:
    submit = review_pg.stubs["submitter"].SubmitItems
    first = await submit(rpc.SubmitItemsRequest(items=[shadow_item("pg-1"), shadow_item("pg-1")]))
    again = await submit(rpc.SubmitItemsRequest(items=[shadow_item("pg-1")]))
    assert first.created_count == 1 and again.created_count == 0
    assert first.items[0].name == first.items[1].name == again.items[0].name


async def test_list_pages_on_postgres(review_pg: Review) -> None:
    # The page's size expression (length of the texts) on PostgreSQL.
    submit = review_pg.stubs["submitter"].SubmitItems
    made = await submit(
        rpc.SubmitItemsRequest(
            items=[shadow_item(f"pgpage-{n}", model="pgpages") for n in range(3)]
        )
    )
    list_items = review_pg.stubs["reviewera"].ListItems
    first = await list_items(rpc.ListItemsRequest(model="pgpages", page_size=2))
    rest = await list_items(
        rpc.ListItemsRequest(model="pgpages", page_size=2, page_token=first.next_page_token)
    )
    assert [i.name for i in [*first.items, *rest.items]] == [i.name for i in made.items]
    assert not rest.next_page_token
