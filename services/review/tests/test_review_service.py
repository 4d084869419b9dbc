"""The review service over gRPC, in process, on SQLite: idempotent
submission, claims and leases, the verdict race, escalation, the export to a
real registry, bad input and scopes."""

from __future__ import annotations

import asyncio
import io
import json
import time

import grpc
import pyarrow.parquet as pq
from google.protobuf import duration_pb2, json_format
from mlmesh.registry.v1 import registry_service_pb2 as reg
from mlmesh.review.v1 import review_pb2 as pb
from mlmesh.review.v1 import review_service_pb2 as rpc
from mlmesh_chassis.metrics import REGISTRY
from mlmesh_chassis.testing import expect_error
from mlmesh_sdk.registry import RegistryClient
from reviewkit import KEY_IDS, Review, race_claims, race_verdicts, shadow_item

DENIED = grpc.StatusCode.PERMISSION_DENIED
INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


async def submit(review: Review, *items: pb.Item) -> rpc.SubmitItemsResponse:
    return await review.stubs["submitter"].SubmitItems(rpc.SubmitItemsRequest(items=items))


async def test_submit_is_idempotent_by_source_and_source_id(review: Review) -> None:
    first = await submit(
        review, shadow_item("idem-1"), shadow_item("idem-1"), shadow_item("idem-2")
    )
    assert first.created_count == 2
    assert first.items[0].name == first.items[1].name != first.items[2].name
    item = first.items[0]
    assert item.state == pb.ITEM_STATE_OPEN
    assert item.submitter_key_id == KEY_IDS["submitter"]
    assert item.context["max_abs_diff"] == "0.9"
    assert item.HasField("create_time")

    again = await submit(review, shadow_item("idem-2", primary_output="changed"))
    assert again.created_count == 0
    assert again.items[0].name == first.items[2].name
    assert again.items[0].primary_output == "7"  # the first submission stands

    # The same source id from another source is another item.
    other = await submit(review, shadow_item("idem-1", source=pb.ITEM_SOURCE_CONTENT_CHECK))
    assert other.created_count == 1
    assert other.items[0].name != item.name


async def test_bad_items_are_refused_with_field_details(review: Review) -> None:
    cases = [
        (shadow_item("bad\x01id"), "items[0].source_id"),
        (shadow_item("bad-model", model="Digits"), "items[0].model"),
        (shadow_item("bad-input", inputs="x" * 16385), "items[0].inputs"),
        (shadow_item("bad-source", source=pb.ITEM_SOURCE_UNSPECIFIED), "items[0].source"),
        (
            shadow_item("bad-context", context={f"k{i}": "v" for i in range(33)}),
            "items[0].context",
        ),
        (shadow_item("bad-context-key", context={"<script>": "v"}), "items[0].context"),
    ]
    for item, field in cases:
        details = await expect_error(submit(review, item), INVALID)
        assert details.error_info is not None
        assert details.error_info.reason == "INVALID_ARGUMENT"
        assert details.bad_request is not None
        fields = [v.field for v in details.bad_request.field_violations]
        assert any(f.startswith(field) for f in fields), (field, fields)
    await expect_error(submit(review), INVALID)  # no items
    too_many = [shadow_item(f"many-{i}") for i in range(101)]
    await expect_error(submit(review, *too_many), INVALID)
    # Nothing of a refused batch was queued.
    listed = await review.stubs["reviewera"].ListItems(rpc.ListItemsRequest(model="digits"))
    assert not [i for i in listed.items if i.source_id.startswith(("bad", "many-"))]


async def test_scopes(review: Review) -> None:
    stubs = review.stubs
    details = await expect_error(
        stubs["reviewera"].SubmitItems(rpc.SubmitItemsRequest(items=[shadow_item("scope-1")])),
        DENIED,
    )
    assert details.error_info is not None and details.error_info.reason == "PERMISSION_DENIED"
    await expect_error(stubs["submitter"].ListItems(rpc.ListItemsRequest()), DENIED)
    await expect_error(stubs["user"].ListItems(rpc.ListItemsRequest()), DENIED)
    await expect_error(stubs["stranger"].GetItem(rpc.GetItemRequest(name="items/abc")), DENIED)
    report = rpc.ReportPredictionRequest(request_id="r-scope", model="digits", reason="wrong")
    await expect_error(stubs["stranger"].ReportPrediction(report), DENIED)
    await expect_error(stubs["reviewera"].ReportPrediction(report), DENIED)
    await expect_error(stubs["submitter"].ReportPrediction(report), DENIED)
    # The user's key may use digits* only: no report on another model.
    other_model = rpc.ReportPredictionRequest(request_id="r-scope", model="chat", reason="x")
    details = await expect_error(stubs["user"].ReportPrediction(other_model), DENIED)
    assert details.error_info is not None and details.error_info.metadata["model"] == "chat"
    # A user may not claim, decide or export.
    await expect_error(stubs["user"].ClaimItem(rpc.ClaimItemRequest(name="items/abc")), DENIED)
    await expect_error(
        stubs["user"].ExportDataset(rpc.ExportDatasetRequest(model="digits")), DENIED
    )


async def test_report_prediction_is_the_callers_own(review: Review) -> None:
    request = rpc.ReportPredictionRequest(
        request_id="req-42",
        model="digits",
        reason="it is a 4, <b>not</b> a 9",
        output='{"label": 9}',
        inputs="[0, 1]",
        suggested_label="4",
    )
    mine = (await review.stubs["user"].ReportPrediction(request)).item
    assert mine.source == pb.ITEM_SOURCE_USER_REPORT
    # The reporter is the verified key: no field can name another.
    assert mine.source_id == f"{KEY_IDS['user']}/req-42"
    assert mine.submitter_key_id == KEY_IDS["user"]
    assert mine.request_id == "req-42"
    assert mine.alternative_output == "it is a 4, <b>not</b> a 9"
    assert mine.primary_output == '{"label": 9}'
    assert mine.context["suggested_label"] == "4"
    again = (await review.stubs["user"].ReportPrediction(request)).item
    assert again.name == mine.name
    # Another user reporting the same request id is another report.
    theirs = (await review.stubs["otheruser"].ReportPrediction(request)).item
    assert theirs.name != mine.name
    assert theirs.source_id == f"{KEY_IDS['otheruser']}/req-42"
    bad = rpc.ReportPredictionRequest(request_id="req-43", model="digits", reason="")
    details = await expect_error(review.stubs["user"].ReportPrediction(bad), INVALID)
    assert details.bad_request is not None
    assert details.bad_request.field_violations[0].field == "reason"


async def test_claims_and_leases(review: Review) -> None:
    a, b = review.stubs["reviewera"], review.stubs["reviewerb"]
    name = (await submit(review, shadow_item("lease-1"))).items[0].name
    claimed = (await a.ClaimItem(rpc.ClaimItemRequest(name=name))).item
    assert claimed.state == pb.ITEM_STATE_CLAIMED
    assert claimed.claim_holder == KEY_IDS["reviewera"]
    assert claimed.claim_expire_time.seconds > time.time() + 500  # the 10-minute default

    details = await expect_error(b.ClaimItem(rpc.ClaimItemRequest(name=name)), PRECONDITION)
    assert details.error_info is not None
    assert details.error_info.domain == "mlmesh.review"
    assert details.error_info.metadata["claim_holder"] == KEY_IDS["reviewera"]
    assert details.error_info.metadata["state"] == "CLAIMED"
    await expect_error(
        b.SubmitVerdict(rpc.SubmitVerdictRequest(name=name, verdict=pb.VERDICT_PRIMARY_CORRECT)),
        PRECONDITION,
    )

    # The holder renews with a 1-second lease; once it ran out, anyone may claim.
    short = duration_pb2.Duration(seconds=1)
    renewed = (await a.ClaimItem(rpc.ClaimItemRequest(name=name, lease_duration=short))).item
    expires = renewed.claim_expire_time.ToMicroseconds() / 1e6
    await asyncio.sleep(max(expires - time.time(), 0.0) + 0.1)
    seen = (await b.GetItem(rpc.GetItemRequest(name=name))).item
    assert seen.state == pb.ITEM_STATE_OPEN
    assert seen.claim_holder == ""
    listed = await b.ListItems(rpc.ListItemsRequest(state=pb.ITEM_STATE_OPEN, model="digits"))
    assert name in [i.name for i in listed.items]
    taken = (await b.ClaimItem(rpc.ClaimItemRequest(name=name))).item
    assert taken.claim_holder == KEY_IDS["reviewerb"]
    # The old holder's late verdict is refused; the new holder's is recorded.
    await expect_error(
        a.SubmitVerdict(rpc.SubmitVerdictRequest(name=name, verdict=pb.VERDICT_OTHER)),
        PRECONDITION,
    )
    decided = (
        await b.SubmitVerdict(
            rpc.SubmitVerdictRequest(name=name, verdict=pb.VERDICT_ALTERNATIVE_CORRECT)
        )
    ).item
    assert decided.state == pb.ITEM_STATE_DECIDED
    assert decided.reviewer_key_id == KEY_IDS["reviewerb"]
    assert decided.claim_holder == ""
    details = await expect_error(b.ClaimItem(rpc.ClaimItemRequest(name=name)), PRECONDITION)
    assert details.error_info is not None and details.error_info.metadata["state"] == "DECIDED"

    # Bad lease durations and names.
    long = duration_pb2.Duration(seconds=3601)
    await expect_error(a.ClaimItem(rpc.ClaimItemRequest(name=name, lease_duration=long)), INVALID)
    await expect_error(a.ClaimItem(rpc.ClaimItemRequest(name="items/<x>")), INVALID)
    details = await expect_error(
        a.GetItem(rpc.GetItemRequest(name="items/0000000000000000ffffffff")),
        grpc.StatusCode.NOT_FOUND,
    )
    assert details.error_info is not None and details.error_info.reason == "NOT_FOUND"


async def test_verdict_recorded_once_when_reviewers_race(review: Review) -> None:
    lost_before = REGISTRY.get_sample_value(
        "mlmesh_review_races_lost_total", {"operation": "verdict"}
    )
    outcomes = await race_verdicts(review, "race", 8)
    # Every ABORTED loser was counted as a lost race.
    lost_after = REGISTRY.get_sample_value(
        "mlmesh_review_races_lost_total", {"operation": "verdict"}
    )
    assert (lost_after or 0.0) - (lost_before or 0.0) == outcomes["ABORTED"]


async def test_claim_granted_once_when_reviewers_race(review: Review) -> None:
    await race_claims(review, "claimrace", 6)


async def test_escalate(review: Review) -> None:
    a, b = review.stubs["reviewera"], review.stubs["reviewerb"]
    name = (await submit(review, shadow_item("esc-1"))).items[0].name
    await a.ClaimItem(rpc.ClaimItemRequest(name=name))
    await expect_error(
        b.EscalateItem(rpc.EscalateItemRequest(name=name, reason="mine now")), PRECONDITION
    )
    await expect_error(b.EscalateItem(rpc.EscalateItemRequest(name=name, reason="")), INVALID)
    escalated = (
        await a.EscalateItem(rpc.EscalateItemRequest(name=name, reason="needs a doctor"))
    ).item
    assert escalated.state == pb.ITEM_STATE_ESCALATED
    assert escalated.claim_holder == ""
    assert escalated.escalation_reason == "needs a doctor"
    listed = await b.ListItems(rpc.ListItemsRequest(state=pb.ITEM_STATE_ESCALATED))
    assert name in [i.name for i in listed.items]
    claimed = (await b.ClaimItem(rpc.ClaimItemRequest(name=name))).item
    assert claimed.state == pb.ITEM_STATE_CLAIMED
    assert claimed.escalation_reason == "needs a doctor"
    decided = (
        await b.SubmitVerdict(
            rpc.SubmitVerdictRequest(name=name, verdict=pb.VERDICT_BOTH_WRONG, correct_label="3")
        )
    ).item
    assert decided.state == pb.ITEM_STATE_DECIDED
    assert decided.escalation_reason == "needs a doctor"
    await expect_error(
        a.EscalateItem(rpc.EscalateItemRequest(name=name, reason="again")), PRECONDITION
    )


async def test_list_pages_and_filters(review: Review) -> None:
    stub = review.stubs["reviewera"]
    made = await submit(review, *(shadow_item(f"page-{n}", model="pages") for n in range(7)))
    expected = [i.name for i in made.items]
    seen: list[str] = []
    token = ""
    while True:
        page = await stub.ListItems(
            rpc.ListItemsRequest(model="pages", page_size=3, page_token=token)
        )
        assert len(page.items) <= 3
        seen += [i.name for i in page.items]
        token = page.next_page_token
        if not token:
            break
    assert seen == expected  # oldest first, each once
    await stub.ClaimItem(rpc.ClaimItemRequest(name=expected[0]))
    claimed = await stub.ListItems(rpc.ListItemsRequest(model="pages", state=pb.ITEM_STATE_CLAIMED))
    assert [i.name for i in claimed.items] == [expected[0]]
    opened = await stub.ListItems(rpc.ListItemsRequest(model="pages", state=pb.ITEM_STATE_OPEN))
    assert [i.name for i in opened.items] == expected[1:]
    other = await stub.ListItems(
        rpc.ListItemsRequest(model="pages", source=pb.ITEM_SOURCE_USER_REPORT)
    )
    assert not other.items
    first = await stub.ListItems(rpc.ListItemsRequest(model="pages", page_size=2))
    details = await expect_error(
        stub.ListItems(rpc.ListItemsRequest(model="digits", page_token=first.next_page_token)),
        INVALID,
    )
    assert details.bad_request is not None
    assert details.bad_request.field_violations[0].field == "page_token"
    await expect_error(stub.ListItems(rpc.ListItemsRequest(page_token="garbage!")), INVALID)
    await expect_error(stub.ListItems(rpc.ListItemsRequest(page_size=501)), INVALID)


async def test_export_registers_a_dataset_version_with_lineage(
    review: Review, review_registry, tmp_path
) -> None:
    a = review.stubs["reviewera"]
    await expect_error(a.ExportDataset(rpc.ExportDatasetRequest(model="exportm")), PRECONDITION)
    made = await submit(
        review,
        *(
            shadow_item(f"export-{n}", model="exportm", alternative_output=f"<script>{n}</script>")
            for n in range(3)
        ),
    )
    names = [i.name for i in made.items]
    await a.SubmitVerdict(
        rpc.SubmitVerdictRequest(name=names[0], verdict=pb.VERDICT_BOTH_WRONG, correct_label="5")
    )
    await a.SubmitVerdict(
        rpc.SubmitVerdictRequest(name=names[2], verdict=pb.VERDICT_PRIMARY_CORRECT, note="ok")
    )
    exported = await a.ExportDataset(rpc.ExportDatasetRequest(model="exportm"))
    assert exported.dataset == "exportm-review-labels"
    assert exported.item_count == 2
    assert exported.version >= 1

    target, secret = review_registry
    async with RegistryClient(target, api_key=secret) as registry:
        got = await registry.stub.GetModelVersion(
            reg.GetModelVersionRequest(model=exported.dataset, version=exported.version),
            metadata=registry.metadata,
        )
        version = got.model_version
        assert version.format == "parquet-dataset"
        assert version.sha256 == exported.sha256
        lineage = json_format.MessageToDict(version.lineage.run_metadata)
        assert lineage["items"] == [names[0], names[2]]
        assert lineage["query"]["model"] == "exportm"
        assert lineage["query"]["state"] == "DECIDED"
        assert lineage["item_count"] == 2
        path = tmp_path / "labels.parquet"
        await registry.download(f"{exported.dataset}/{exported.version}", path)
    table = pq.read_table(io.BytesIO(path.read_bytes()))
    rows = table.to_pylist()
    assert [r["item"] for r in rows] == [names[0], names[2]]
    assert [r["verdict"] for r in rows] == ["BOTH_WRONG", "PRIMARY_CORRECT"]
    assert [r["correct_label"] for r in rows] == ["5", ""]
    assert rows[0]["alternative_output"] == "<script>0</script>"
    assert rows[1]["note"] == "ok"
    assert rows[0]["reviewer_key_id"] == KEY_IDS["reviewera"]
    assert json.loads(rows[0]["context"]) == {"max_abs_diff": "0.9"}
    assert rows[0]["decide_time"] is not None

    # Only one source: none of these came from user reports.
    await expect_error(
        a.ExportDataset(
            rpc.ExportDatasetRequest(model="exportm", sources=[pb.ITEM_SOURCE_USER_REPORT])
        ),
        PRECONDITION,
    )
    again = await a.ExportDataset(rpc.ExportDatasetRequest(model="exportm", max_items=1))
    assert again.version == exported.version + 1
    assert again.item_count == 1


async def test_metrics_count_states_verdicts_and_races(review: Review) -> None:
    from mlmesh_review.db import review_database
    from mlmesh_review.queue import ReviewQueue

    def sample(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    verdicts_before = sample(
        "mlmesh_review_verdicts_total", verdict="OTHER", source="LOW_CONFIDENCE"
    )
    made = await submit(
        review,
        *(
            shadow_item(f"metric-{n}", model="metrics", source=pb.ITEM_SOURCE_LOW_CONFIDENCE)
            for n in range(3)
        ),
    )
    a = review.stubs["reviewera"]
    await a.ClaimItem(rpc.ClaimItemRequest(name=made.items[0].name))
    await a.SubmitVerdict(
        rpc.SubmitVerdictRequest(name=made.items[1].name, verdict=pb.VERDICT_OTHER)
    )
    # The service's gauges, read now from its database (it refreshes them
    # every few seconds by itself).
    database = review_database(review.settings.database)
    try:
        queue = ReviewQueue(database)
        await queue.refresh_stats()
        counts = {s: sample("mlmesh_review_items", state=s) for s in ("OPEN", "CLAIMED", "DECIDED")}
        assert counts == {
            state: float(count) for state, count in queue.depth.items() if state in counts
        }
        assert counts["CLAIMED"] >= 1 and counts["DECIDED"] >= 1 and counts["OPEN"] >= 1
    finally:
        await database.close()
    assert (
        sample("mlmesh_review_verdicts_total", verdict="OTHER", source="LOW_CONFIDENCE")
        == verdicts_before + 1
    )
    assert (
        sample("mlmesh_review_items_submitted_total", source="LOW_CONFIDENCE", outcome="created")
        >= 3
    )


async def test_decided_items_are_read_in_pages(review: Review) -> None:
    from mlmesh_review.db import review_database
    from mlmesh_review.queue import ReviewQueue

    a = review.stubs["reviewera"]
    made = await submit(review, *(shadow_item(f"paged-{n}", model="paged") for n in range(5)))
    names = [i.name for i in made.items]
    for name in reversed(names):  # decided newest first: the export's order is by decision
        await a.SubmitVerdict(rpc.SubmitVerdictRequest(name=name, verdict=pb.VERDICT_OTHER))
    database = review_database(review.settings.database)
    try:
        queue = ReviewQueue(database)
        pages = [
            [f"items/{r.id}" for r in page]
            async for page in queue.decided_pages("paged", [], 0, 10, page_size=2)
        ]
        assert [len(p) for p in pages] == [2, 2, 1]
        assert [n for page in pages for n in page] == list(reversed(names))
        limited = [p async for p in queue.decided_pages("paged", [], 0, 3, page_size=2)]
        assert [len(p) for p in limited] == [2, 1]
    finally:
        await database.close()
    exported = await a.ExportDataset(rpc.ExportDatasetRequest(model="paged"))
    assert exported.item_count == 5


async def test_list_pages_are_bounded_by_their_text_not_only_their_count(
    review: Review, monkeypatch
) -> None:
    """Large items (a user's report may carry ~36K characters, a source's
    ~130K) make shorter pages: a page of 500 such items would pass the 16 MiB
    message limit. The budget is lowered here so that a few items show it."""
    from mlmesh_review import queue

    monkeypatch.setattr(queue, "PAGE_CHARS", 100_000)
    big = "é" * 16_000
    made = await submit(
        review,
        *(
            shadow_item(f"big-{n}", model="bigpages", inputs=big, primary_output=big)
            for n in range(5)
        ),
    )
    expected = [i.name for i in made.items]
    stub = review.stubs["reviewera"]
    seen: list[str] = []
    sizes: list[int] = []
    token = ""
    while True:
        page = await stub.ListItems(
            rpc.ListItemsRequest(model="bigpages", page_size=500, page_token=token)
        )
        sizes.append(len(page.items))
        seen += [i.name for i in page.items]
        assert all(i.inputs == big for i in page.items)
        token = page.next_page_token
        if not token:
            break
    assert seen == expected  # every item once, oldest first
    assert sizes == [3, 2]  # 32K characters each: three fit in 100K
    # One item larger than the budget still makes a page (of one).
    monkeypatch.setattr(queue, "PAGE_CHARS", 10)
    one = await stub.ListItems(rpc.ListItemsRequest(model="bigpages", page_size=500))
    assert [i.name for i in one.items] == expected[:1] and one.next_page_token


async def test_sources_cannot_submit_user_reports(review: Review) -> None:
    """A user report's source id names its reporter: a source submitting one
    could take a user's report in advance. Only ReportPrediction makes them."""
    squat = shadow_item(f"{KEY_IDS['user']}/req-squat", source=pb.ITEM_SOURCE_USER_REPORT)
    fine = shadow_item("fine-1", model="squat")
    details = await expect_error(submit(review, fine, squat), INVALID)
    assert details.bad_request is not None
    assert [v.field for v in details.bad_request.field_violations] == ["items[1].source"]
    # Nothing of the batch was written, and the user's own report is theirs.
    listed = await review.stubs["reviewera"].ListItems(rpc.ListItemsRequest(model="squat"))
    assert not listed.items
    report = rpc.ReportPredictionRequest(request_id="req-squat", model="digits", reason="wrong")
    mine = (await review.stubs["user"].ReportPrediction(report)).item
    assert mine.submitter_key_id == KEY_IDS["user"]


async def test_one_key_cannot_fill_the_queue_with_reports(review: Review) -> None:
    """A key's undecided reports are capped (100 by default): the next one
    is RESOURCE_EXHAUSTED with a QuotaFailure naming the key, until a
    reviewer decides one."""
    user = review.stubs["otheruser"]

    def report(n: int) -> rpc.ReportPredictionRequest:
        return rpc.ReportPredictionRequest(request_id=f"flood-{n}", model="digits", reason="x")

    refused = None
    for n in range(150):
        try:
            await user.ReportPrediction(report(n))
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            refused = n
            break
    assert refused is not None, "150 reports were all queued"
    details = await expect_error(
        user.ReportPrediction(report(refused)), grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    assert details.quota_failure is not None
    assert details.quota_failure.violations[0].subject == f"key:{KEY_IDS['otheruser']}"
    listed = await review.stubs["reviewera"].ListItems(
        rpc.ListItemsRequest(source=pb.ITEM_SOURCE_USER_REPORT, page_size=500)
    )
    waiting = [
        i
        for i in listed.items
        if i.submitter_key_id == KEY_IDS["otheruser"] and i.state != pb.ITEM_STATE_DECIDED
    ]
    assert len(waiting) == 100
    await review.stubs["reviewera"].SubmitVerdict(
        rpc.SubmitVerdictRequest(name=waiting[0].name, verdict=pb.VERDICT_OTHER)
    )
    await user.ReportPrediction(report(refused))  # room again
