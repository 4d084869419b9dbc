"""The streaming job: windowed feature views over the event log, in Flink SQL.

Runs in the Flink environment (flinkenv.py), submitted by cluster.py as
``flink run -py job.py <job.json>``; it imports nothing from mlmesh or Feast.
Everything it does is Flink SQL, so it runs in the JVM alone (no Python
worker). The spec's format and the semantics it must share with batch.py are
in the streaming interface (docs).

Per stream source: a continuous filesystem source over the event log's
folder (JSON lines; files named with a leading '.' are skipped until
renamed), event time ``ts`` from ``_event_time_ms``. The watermark policy is
applied explicitly, before any window: an event is late if its event time is
at or behind the highest event time read before it less the delay (a running
MAX in checkpointed state, so a restore does not forget it, as Flink's own
watermark would). A late event goes to the source's late output only; every
other event to the windows. Flink's watermark (``ts - delay``, emitted after
every event) is never ahead of that policy's, so the window operators never
see, and never drop, a late event. Events must have event times >= 0.

Per view: ONE hopping window aggregation (slide = the view's step, size = its
longest window rounded up to a whole number of steps), grouped by the join
keys and the window end. Each aggregation is restricted to its own window by
``FILTER (WHERE _event_time_ms >= window end - its window)``; a row is written
only where the longest window holds an event. Windows are [end - size, end),
aligned to the epoch (table.local-time-zone is UTC). Per function:

    count           COUNT(*)                         0 on an empty window
    count_distinct  COUNT(DISTINCT col)              0 on an empty window
    sum             SUM(col); 0 where the window has events but no value
                    (pandas' sum), null on an empty window
    min, max        MIN(col), MAX(col)
    mean            CAST(SUM(col) AS DOUBLE) / COUNT(col)
    last            the value of the event with the greatest (event time,
                    _seq): MAX of "event time (20 digits) | _seq (20 digits)
                    | 'V' value or 'N'", cut back to the value

All INSERTs run as one job (one source scan per source, shared). The
filesystem sinks, with compaction on, roll their part file on every checkpoint
and make it visible when the checkpoint completes (exactly-once): a restart
from a checkpoint neither loses nor repeats a row. The job restores from a
retained checkpoint only with the same spec (the operators' state is matched
by the plan).
"""

from __future__ import annotations

import json
import sys
from typing import Any

SQL_TYPES = {"int64": "BIGINT", "double": "DOUBLE", "string": "STRING", "bool": "BOOLEAN"}
EVENT_TIME = "_event_time_ms"
# Row formats roll by size or time unless compaction is on: with it, each
# checkpoint's rows are written to one file, visible once the checkpoint
# completes (hidden dot-files until then).
SINK_OPTIONS = "'format' = 'json', 'auto-compaction' = 'true'"
SEQ = "_seq"


def quote(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def interval(ms: int) -> str:
    """A day-time interval literal of ``ms`` milliseconds."""
    seconds, millis = divmod(ms, 1000)
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    return (
        f"INTERVAL '{days} {hours:02d}:{minutes:02d}:{seconds:02d}.{millis:03d}' "
        "DAY(3) TO SECOND(3)"
    )


def source_table(name: str, source: dict[str, Any], spec: dict[str, Any]) -> str:
    columns = [f"{quote(c)} {SQL_TYPES[t]}" for c, t in source["columns"].items()]
    return f"""CREATE TEMPORARY TABLE {quote("src_" + name)} (
  {", ".join(columns)},
  {EVENT_TIME} BIGINT,
  {SEQ} BIGINT,
  ts AS TO_TIMESTAMP_LTZ({EVENT_TIME}, 3),
  _read_at AS PROCTIME(),
  WATERMARK FOR ts AS ts - {interval(spec["watermark_delay_ms"])}
) WITH (
  'connector' = 'filesystem',
  'path' = {literal("file://" + source["path"])},
  'format' = 'json',
  'source.monitor-interval' = '{spec["monitor_interval_ms"]} ms'
)"""


def late_sink(name: str, source: dict[str, Any]) -> str:
    columns = [f"{quote(c)} {SQL_TYPES[t]}" for c, t in source["columns"].items()]
    return f"""CREATE TEMPORARY TABLE {quote("late_" + name)} (
  {", ".join(columns)}, {EVENT_TIME} BIGINT, {SEQ} BIGINT
) WITH (
  'connector' = 'filesystem',
  'path' = {literal("file://" + source["late_output"])},
  {SINK_OPTIONS}
)"""


def marked_view(name: str, source: dict[str, Any], delay_ms: int) -> str:
    """The source's events, each with ``_late``: at or behind the watermark,
    the highest event time read before it minus the delay. The highest event
    time is a running MAX over the events in the order read, kept in
    checkpointed state (Flink's own watermark is not checkpointed: after a
    restore it would start over and let an already late event in again).
    The running max includes the event itself; with a delay of at least
    1 ms that changes nothing (an event that sets a new max is never late)."""
    columns = ", ".join(quote(c) for c in source["columns"])
    return f"""CREATE TEMPORARY VIEW {quote("marked_" + name)} AS
SELECT {columns}, {EVENT_TIME}, {SEQ}, ts,
  {EVENT_TIME} <= MAX({EVENT_TIME}) OVER (
    ORDER BY _read_at ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) - {delay_ms} AS _late
FROM {quote("src_" + name)}"""


def late_insert(name: str, source: dict[str, Any]) -> str:
    columns = ", ".join(quote(c) for c in source["columns"])
    return (
        f"INSERT INTO {quote('late_' + name)} SELECT {columns}, {EVENT_TIME}, {SEQ} "
        f"FROM {quote('marked_' + name)} WHERE _late"
    )


def view_sink(view: dict[str, Any], source: dict[str, Any]) -> str:
    keys = [f"{quote(k)} {SQL_TYPES[source['columns'][k]]}" for k in view["keys"]]
    features = [f"{quote(a['name'])} {SQL_TYPES[a['type']]}" for a in view["aggregations"]]
    return f"""CREATE TEMPORARY TABLE {quote("out_" + view["name"])} (
  {", ".join([*keys, "window_end_ms BIGINT", *features])}
) WITH (
  'connector' = 'filesystem',
  'path' = {literal("file://" + view["output"])},
  {SINK_OPTIONS}
)"""


END_MS = "(EXTRACT(EPOCH FROM window_end) * 1000 + EXTRACT(MILLISECOND FROM window_end))"


def aggregate(aggregation: dict[str, Any]) -> str:
    """One aggregation over the events of its own window."""
    within = f"FILTER (WHERE {EVENT_TIME} >= {END_MS} - {int(aggregation['window_ms'])})"
    function = aggregation["function"]
    column = quote(aggregation["column"]) if aggregation["column"] else ""
    sql_type = SQL_TYPES[aggregation["type"]]
    if function == "count":
        return f"COUNT(*) {within}"
    if function == "count_distinct":
        return f"COUNT(DISTINCT {column}) {within}"
    if function == "sum":
        # pandas sums a window whose values are all null to 0.
        return (
            f"COALESCE(SUM({column}) {within}, "
            f"CASE WHEN COUNT(*) {within} > 0 THEN CAST(0 AS {sql_type}) END)"
        )
    if function in ("min", "max"):
        return f"{function.upper()}({column}) {within}"
    if function == "mean":
        return f"CAST(SUM({column}) {within} AS DOUBLE) / COUNT({column}) {within}"
    if function == "last":
        packed = (
            f"MAX(LPAD(CAST({EVENT_TIME} AS STRING), 20, '0') || "
            f"LPAD(CAST({SEQ} AS STRING), 20, '0') || "
            f"COALESCE('V' || CAST({column} AS STRING), 'N')) {within}"
        )
        return (
            f"CASE WHEN SUBSTRING({packed} FROM 41 FOR 1) = 'V' "
            f"THEN CAST(SUBSTRING({packed} FROM 42) AS {sql_type}) END"
        )
    raise ValueError(f"unknown aggregation function {function!r}")


def view_insert(view: dict[str, Any]) -> str:
    step = int(view["step_ms"])
    longest = max(int(a["window_ms"]) for a in view["aggregations"])
    size = -(-longest // step) * step
    keys = ", ".join(quote(k) for k in view["keys"])
    features = ",\n  ".join(f"{aggregate(a)} AS {quote(a['name'])}" for a in view["aggregations"])
    names = ", ".join(quote(a["name"]) for a in view["aggregations"])
    return f"""INSERT INTO {quote("out_" + view["name"])}
SELECT {keys}, window_end_ms, {names} FROM (
SELECT {keys}, CAST({END_MS} AS BIGINT) AS window_end_ms,
  COUNT(*) FILTER (WHERE {EVENT_TIME} >= {END_MS} - {longest}) AS _in_longest,
  {features}
FROM TABLE(HOP(
  (SELECT * FROM {quote("marked_" + view["source"])} WHERE NOT _late),
  DESCRIPTOR(ts), {interval(step)}, {interval(size)}))
GROUP BY {keys}, window_start, window_end
) WHERE _in_longest > 0"""


def statements(spec: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The DDL, and the INSERTs that make up the job."""
    delay = int(spec["watermark_delay_ms"])
    if delay < 1:
        raise ValueError("watermark_delay_ms must be at least 1")
    ddl, inserts = [], []
    for name, source in spec["sources"].items():
        ddl += [
            source_table(name, source, spec),
            late_sink(name, source),
            marked_view(name, source, delay),
        ]
        inserts.append(late_insert(name, source))
    for view in spec["views"]:
        ddl.append(view_sink(view, spec["sources"][view["source"]]))
        inserts.append(view_insert(view))
    return ddl, inserts


def main(path: str) -> None:
    from pyflink.table import EnvironmentSettings, TableEnvironment

    with open(path) as file:
        spec = json.load(file)
    env = TableEnvironment.create(EnvironmentSettings.in_streaming_mode())
    config = env.get_config()
    for key, value in {
        "pipeline.name": "mlmesh-features-streaming",
        "table.local-time-zone": "UTC",
        "pipeline.auto-watermark-interval": "0 ms",
        "execution.checkpointing.interval": f"{int(spec['checkpoint_interval_ms'])} ms",
        "execution.checkpointing.mode": "EXACTLY_ONCE",
        "execution.checkpointing.externalized-checkpoint-retention": "RETAIN_ON_CANCELLATION",
        "parallelism.default": "1",
    }.items():
        config.set(key, value)
    ddl, inserts = statements(spec)
    for statement in ddl:
        env.execute_sql(statement)
    job = env.create_statement_set()
    for statement in inserts:
        job.add_insert_sql(statement)
    job.execute()


if __name__ == "__main__":
    main(sys.argv[1])
