"""dashboards/plait.json against the exporter: every series it queries is exported, every family is shown.

A Grafana panel over a metric that does not exist draws "No data" and looks like an idle job, so
a renamed gauge must fail here rather than on someone's screen. The exported names come from
the exporter's own registry (runtime/metrics.py), never from a list kept in this file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from plait.runtime.metrics import TrainingMetrics

DASHBOARD = Path(__file__).resolve().parent.parent / "dashboards" / "plait.json"

# Families deliberately left off the dashboard, each with the reason. Empty: every gauge has a panel.
NOT_ON_DASHBOARD: frozenset[str] = frozenset()

# PromQL functions (case-sensitive) and aggregation operators (case-insensitive, like keywords), as of
# Prometheus 3.x; an identifier followed by "(" must be one of them.
FUNCTIONS = frozenset("""
    abs absent absent_over_time acos acosh asin asinh atan atanh avg_over_time ceil changes clamp clamp_max
    clamp_min cos cosh count_over_time day_of_month day_of_week day_of_year days_in_month deg delta deriv
    double_exponential_smoothing end exp floor histogram_avg histogram_count histogram_fraction
    histogram_quantile histogram_stddev histogram_stdvar histogram_sum holt_winters hour idelta increase info
    irate label_join label_replace last_over_time ln log10 log2 mad_over_time max_over_time min_over_time
    minute month pi predict_linear present_over_time quantile_over_time rad rate resets round scalar sgn sin
    sinh sort sort_by_label sort_by_label_desc sort_desc sqrt start stddev_over_time stdvar_over_time
    sum_over_time tan tanh time timestamp vector year
""".split())
AGGREGATIONS = frozenset(
    "avg bottomk count count_values group limit_ratio limitk max min quantile stddev stdvar sum topk".split())
# Keywords are case-insensitive; those in LABEL_LISTS take a parenthesised list of label names.
KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan",
                      "by", "without", "on", "ignoring", "group_left", "group_right"})
LABEL_LISTS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})

IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
NUMBER = re.compile(r"\.?[0-9][A-Za-z0-9_.]*")  # 0.5, 1e3, 0x1f and durations such as 5m or 1h30m
VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+")  # Grafana: $job, ${job:regex}
NAME_MATCHER = re.compile(r"""__name__\s*=\s*(?:"((?:[^"\\]|\\.)*)"|'((?:[^'\\]|\\.)*)'|`([^`]*)`)""")


def _skip_string(expr: str, i: int) -> int:
    """The index after the string literal that opens at ``expr[i]`` (backslash escapes, except in backticks)."""
    quote = expr[i]
    i += 1
    while i < len(expr):
        if expr[i] == "\\" and quote != "`":
            i += 2
            continue
        if expr[i] == quote:
            return i + 1
        i += 1
    raise ValueError(f"unterminated string in {expr!r}")


def _skip_group(expr: str, i: int, close: str) -> int:
    """The index after the ``close`` that ends the group opening at ``expr[i]``; strings may hold ``close``."""
    opening = expr[i]
    depth = 0
    while i < len(expr):
        c = expr[i]
        if c in "\"'`":
            i = _skip_string(expr, i)
            continue
        depth += c == opening
        depth -= c == close
        i += 1
        if depth == 0:
            return i
    raise ValueError(f"unbalanced {opening!r} in {expr!r}")


def _next_char(expr: str, i: int) -> str:
    while i < len(expr) and expr[i].isspace():
        i += 1
    return expr[i] if i < len(expr) else ""


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects.

    Skipped: string literals, label matchers ``{...}``, ranges and subqueries ``[...]``, label
    lists after by/without/on/ignoring/group_left/group_right, numbers and durations, keywords,
    comments and Grafana variables. An equality ``__name__="..."`` matcher counts as a name. A
    call of anything but a known function raises ValueError, so ``rat(...)`` is caught too, and
    so do unbalanced brackets and unterminated strings.
    """
    names: set[str] = set()
    i = depth = 0
    while i < len(expr):
        c = expr[i]
        if c.isspace():
            i += 1
        elif c == "#":
            end = expr.find("\n", i)
            i = len(expr) if end < 0 else end
        elif c in "\"'`":
            i = _skip_string(expr, i)
        elif c == "{":
            end = _skip_group(expr, i, "}")
            names.update("".join(m.groups(default="")) for m in NAME_MATCHER.finditer(expr, i, end))
            i = end
        elif c == "[":
            i = _skip_group(expr, i, "]")
        elif c == "$" and (m := VARIABLE.match(expr, i)):
            i = m.end()
        elif m := NUMBER.match(expr, i):
            i = m.end()
        elif m := IDENT.match(expr, i):
            word, i = m.group(), m.end()
            call = _next_char(expr, i) == "("
            if word.lower() in LABEL_LISTS and call:
                i = _skip_group(expr, expr.index("(", i), ")")
            elif word.lower() in KEYWORDS or word.lower() in AGGREGATIONS:
                pass  # an aggregation may put its by/without clause before "(": sum by (job) (x)
            elif call:
                if word not in FUNCTIONS:
                    raise ValueError(f"unknown PromQL function {word!r} in {expr!r}")
            else:
                names.add(word)
        else:  # operators, parentheses, commas, @
            depth += (c == "(") - (c == ")")
            if depth < 0 or c in "]}":
                raise ValueError(f"unbalanced {c!r} in {expr!r}")
            i += 1
    if depth:
        raise ValueError(f"unclosed '(' in {expr!r}")
    return names


def variable_exprs(variable: dict) -> list[str]:
    """The PromQL inside a Grafana query variable: label_values(SELECTOR, LABEL) selects SELECTOR."""
    if variable.get("type") != "query":
        return []
    query = variable.get("query")
    text = query.get("query", "") if isinstance(query, dict) else query or ""
    if m := re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", text, re.S):
        return [m.group(1)]
    if m := re.fullmatch(r"\s*query_result\((.*)\)\s*", text, re.S):
        return [m.group(1)]
    if re.fullmatch(r"\s*(label_names\(.*\)|metrics\(.*\)|label_values\(\s*\w+\s*\))\s*", text, re.S):
        return []
    raise ValueError(f"unrecognised query in variable {variable.get('name')!r}: {text!r}")


def all_panels(panels: list[dict]) -> Iterator[dict]:
    """Every panel, those nested in collapsed rows included."""
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def dashboard_exprs(dashboard: dict) -> list[tuple[str, str]]:
    """(where, expr) for every target of every panel and every query variable."""
    found = [(f"panel {p['id']} {p.get('title')!r} target {t.get('refId')}", t["expr"])
             for p in all_panels(dashboard["panels"]) for t in p.get("targets", []) if t.get("expr")]
    found += [(f"variable {v['name']!r}", e) for v in dashboard.get("templating", {}).get("list", [])
              for e in variable_exprs(v)]
    return found


# The series names of a family, by type, as the text exposition format writes them.
SERIES_SUFFIXES = {
    "gauge": ("",),
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
    "stateset": ("",),
    "unknown": ("",),
}


def _coordinator_registry():
    """The coordinator's registry over a job with reports and a named straggler (so every family has samples)."""
    from plait.runtime.control.metrics import CoordinatorMetrics
    from plait.runtime.control.state import JobState

    state = JobState("dashboard-test", 2)
    ids = [state.register(rank=r, world=2, node=r, pid=1 + r, host="h", attempt=0) for r in range(2)]
    for step in range(1, 8):
        for r in range(2):
            state.heartbeat(rank=r, member_id=ids[r], step=step, phase="hooks", step_s=1.0,
                            comm_s=0.5 if r == 0 else 0.0, compute_s=0.5 if r == 0 else 1.0)
    assert state.stragglers()["stragglers"]
    return CoordinatorMetrics(state).registry


def exported_families() -> dict[str, set[str]]:
    """Family name -> its series names, from the registries plait serves (labelled families included):
    rank 0's (MetricsHook) and the coordinator's (every rank's numbers)."""
    families = [*TrainingMetrics("dashboard-test").registry.collect(), *_coordinator_registry().collect()]
    return {f.name: {f.name + s for s in SERIES_SUFFIXES[f.type]} for f in families}


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_the_exporter_registers_the_families_this_test_reasons_about():
    families = exported_families()
    assert "plait_loss" in families and "plait_precision_amax" in families  # labelled families are listed too
    assert "plait_straggler" in families and "plait_hangs" in families  # and the coordinator's
    assert NOT_ON_DASHBOARD <= families.keys(), "an exclusion names a family the exporter no longer has"


def test_dashboard_is_grafana_json_with_unique_panel_ids(dashboard):
    assert dashboard["schemaVersion"] >= 39 and dashboard["uid"] and dashboard["title"]
    ids = [p["id"] for p in all_panels(dashboard["panels"])]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(i for i in ids if ids.count(i) > 1)}"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for panel in all_panels(dashboard["panels"]):
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            assert panel.get("targets"), f"panel {panel['title']!r} queries nothing"


def test_every_queried_series_is_exported(dashboard):
    exported = set().union(*exported_families().values())
    exprs = dashboard_exprs(dashboard)
    assert len(exprs) > 10
    unknown = [(where, name) for where, expr in exprs for name in sorted(metric_names(expr) - exported)]
    assert not unknown, f"series the exporter does not export: {unknown}"
    assert all(metric_names(expr) for _, expr in exprs), "an expression selects no metric"


def test_every_exported_family_is_on_the_dashboard(dashboard):
    queried = set().union(*(metric_names(expr) for _, expr in dashboard_exprs(dashboard)))
    missing = sorted(name for name, series in exported_families().items()
                     if name not in NOT_ON_DASHBOARD and not series & queried)
    assert not missing, f"exported but on no panel (add one, or an explained exclusion above): {missing}"


def test_the_job_variable_lists_a_label_the_exporter_sets(dashboard):
    job = next(v for v in dashboard["templating"]["list"] if v["name"] == "job")
    (expr,) = variable_exprs(job)
    (family,) = metric_names(expr)
    families = [*TrainingMetrics("dashboard-test").registry.collect(), *_coordinator_registry().collect()]
    labels = {k for f in families if f.name == family for s in f.samples for k in s.labels}
    assert "job" in labels


@pytest.mark.parametrize(("expr", "names"), [
    ('plait_loss{job=~"$job"}', {"plait_loss"}),
    ("rate(http_requests_total[5m])", {"http_requests_total"}),
    ('sum by (job, le) (rate(x_bucket{job="a"}[$__rate_interval]))', {"x_bucket"}),
    ('histogram_quantile(0.99, sum without (instance) (rate(lat_bucket[5m])))', {"lat_bucket"}),
    ("max by (job, layer) (a) / on (job) group_left (layer) avg(b)", {"a", "b"}),
    ('count_values("loss", plait_loss) or on() vector(0)', {"plait_loss"}),
    ('label_replace(up, "dst", "$1 by", "src", "(.*)")', {"up"}),
    ('a{module=~"layers\\\\.0\\\\..*", tensor!="dy"} > bool 0.5 and b offset 1h30m', {"a", "b"}),
    ("avg_over_time(a[10m:1m] @ start()) # trailing comment mentions not_a_metric", {"a"}),
    ('{__name__="plait_mfu", job="x"} * 1e3 + SUM BY (job) (c)', {"plait_mfu", "c"}),
    ("job:plait_loss:mean5m", {"job:plait_loss:mean5m"}),
    ("topk(10, plait_precision_overflow{job=~\"$job\"})", {"plait_precision_overflow"}),
])
def test_tokenizer_finds_the_metric_names(expr, names):
    assert metric_names(expr) == names


def test_tokenizer_reports_made_up_metrics():
    exported = set().union(*exported_families().values())
    for expr, bogus in [
        ('plait_tokens_per_sec{job=~"$job"}', "plait_tokens_per_sec"),  # a typo of plait_tokens_per_second
        ("rate(plait_steps[5m])", "plait_steps"),
        ("plait_loss / on (job) plait_memory_bytes", "plait_memory_bytes"),
        ('histogram_quantile(0.9, sum by (le) (rate(plait_step_seconds_bucket[5m])))', "plait_step_seconds_bucket"),
        ('max by (job) (plait_comm_bytes_total{op="all_reduce"})', "plait_comm_bytes_total"),
    ]:
        assert bogus in metric_names(expr) - exported, expr


def test_tokenizer_rejects_unknown_functions_and_broken_syntax():
    for expr in ["rat(plait_step[5m])", 'plait_loss{job="x}', "sum(rate(a[5m])", "a[5m", "a) + (b"]:
        with pytest.raises(ValueError):
            metric_names(expr)


def test_variable_queries_are_parsed():
    assert variable_exprs({"type": "query", "query": "label_values(plait_step{a=\"b\"}, job)"}) == ['plait_step{a="b"}']
    assert variable_exprs({"type": "query", "query": {"query": "query_result(max(plait_step))"}}) == ["max(plait_step)"]
    assert variable_exprs({"type": "query", "query": "label_values(job)"}) == []
    assert variable_exprs({"type": "datasource", "query": "prometheus"}) == []
    with pytest.raises(ValueError):
        variable_exprs({"name": "x", "type": "query", "query": "lable_values(plait_step, job)"})
