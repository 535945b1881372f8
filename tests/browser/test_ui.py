"""The Dagster UI, as a user sees it in Chromium: the lineage, a tenant's partition, a failed
tenant's partition, the sensors and schedule, and the checks. Each test saves its page into docs/
(the README's UI tour), so the screenshots show the UI of today."""

from collections import Counter, defaultdict

import dagster as dg
import pytest
from playwright.sync_api import expect

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

BALANCES = dg.AssetKey(["tripletex", "balances"])


def open_page(page, dagster_ui, path: str) -> None:
    page.goto(dagster_ui.url + path)
    expect(page.get_by_role("link", name="Catalog")).to_be_visible()  # the app shell has rendered


def save(page, path) -> None:
    """The page once its queries have answered (asset statuses load after the graph is drawn)."""
    page.wait_for_load_state("networkidle")
    page.screenshot(path=path)


def asset_path(key) -> str:
    return "/assets/" + "/".join(key.path)


def test_every_asset_and_the_reporting_models_are_in_the_lineage(page, dagster_ui, docs_dir):
    specs = list(dagster_ui.defs.resolve_all_asset_specs())
    groups = {spec.group_name for spec in specs}
    assert "reporting" in groups and len([s for s in specs if s.group_name == "reporting"]) >= 2

    open_page(page, dagster_ui, "/asset-groups")
    expect(page.get_by_text("Global asset lineage")).to_be_visible()
    page.get_by_role("button", name="settings", exact=True).click()
    page.get_by_role("menuitem", name="Expand all groups").click()
    page.keyboard.press("Escape")

    graph = page.locator("svg foreignObject")  # the graph's nodes: group boxes and asset nodes
    for group in groups:
        expect(graph.get_by_text(group, exact=True).first).to_be_visible()
    # a node shows the last part of its key: every key's node, as many times as keys end that way
    for name, count in Counter(spec.key.path[-1] for spec in specs).items():
        expect(graph.get_by_text(name, exact=True)).to_have_count(count)
    # every unpartitioned asset was materialised in setup: its node turns green once statuses load
    unpartitioned = [spec for spec in specs if spec.partitions_def is None]
    expect(graph.locator("[style*='--minimal-bg: var(--color-background-green)']")).to_have_count(len(unpartitioned))
    save(page, docs_dir / "ui-lineage.png")


def test_a_tenants_partition_shows_its_materialisation_metadata(page, dagster_ui, docs_dir):
    tenant = dagster_ui.loaded[0]
    landed = dagster_ui.landed[tenant.org_number]

    open_page(page, dagster_ui, f"{asset_path(BALANCES)}?view=partitions&partition={tenant.org_number}")
    expect(page.get_by_text("Latest materialization")).to_be_visible()
    expect(page.get_by_text("Materialized", exact=True)).to_be_visible()
    metadata = page.get_by_role("row")
    expect(metadata.filter(has_text="tenant").filter(has_text=tenant.name).first).to_be_visible()
    expect(metadata.filter(has_text="balance_rows").first).to_contain_text(str(landed["rows"]))
    expect(metadata.filter(has_text="months").first).to_contain_text(landed["months"])
    expect(metadata.filter(has_text="preview").first).to_contain_text("closing")
    save(page, docs_dir / "ui-partition.png")


def test_a_failed_tenants_partition_shows_its_name_and_fix(page, dagster_ui, docs_dir):
    blocked, failure = dagster_ui.blocked, dagster_ui.failure
    assert failure["tenant"] == blocked.name and "API-tilgang" in failure["fix"]

    open_page(page, dagster_ui, f"{asset_path(BALANCES)}?view=partitions&partition={blocked.org_number}")
    page.get_by_role("button", name="View all historical events").click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_contain_text(f"Historical events for {blocked.org_number}")
    expect(dialog).to_contain_text("Observation")
    dialog.get_by_role("button", name="arrow_drop_down").click()  # unfolds the event: description and metadata
    rows = dialog.get_by_role("row")
    expect(rows.filter(has_text="tenant").filter(has_text=blocked.name).first).to_be_visible()
    expect(rows.filter(has_text="error").filter(has_text=failure["error"]).first).to_be_visible()
    expect(rows.filter(has_text="outcome").filter(has_text=failure["outcome"]).first).to_be_visible()
    expect(rows.filter(has_text="fix").filter(has_text=failure["fix"]).first).to_be_visible()
    save(page, docs_dir / "ui-failed-partition.png")


def test_the_sensors_and_the_schedule_are_listed(page, dagster_ui, docs_dir):
    sensors = [sensor.name for sensor in dagster_ui.defs.sensors]
    schedules = [schedule.name for schedule in dagster_ui.defs.schedules]
    assert sensors and schedules

    open_page(page, dagster_ui, "/automation")
    for name in sensors:
        expect(page.locator(f'a[href$="/sensors/{name}"]')).to_contain_text(name)
    times = {schedule.name: "06:00" if schedule.name.endswith("_daily_balances") else "03:30"
             for schedule in dagster_ui.defs.schedules}  # the balances, and the run retention
    for name in schedules:
        expect(page.locator(f'a[href$="/schedules/{name}"]')).to_contain_text(name)
        expect(page.locator(f'a[href$="/schedules/{name}"]')).to_contain_text(f"Scheduled At {times[name]}")
    save(page, docs_dir / "ui-automation.png")


def test_the_checks_show_their_results(page, dagster_ui, docs_dir):
    checks = defaultdict(list)
    for check_key in dagster_ui.defs.resolve_asset_graph().asset_check_keys:
        checks[check_key.asset_key].append(check_key.name)
    assert BALANCES in checks

    for key, names in checks.items():
        open_page(page, dagster_ui, f"{asset_path(key)}?view=checks")
        expect(page.get_by_text(f"Checks ({len(names)})")).to_be_visible()
        for name in names:  # long names show shortened in the middle, the full name beside
            expect(page.get_by_text(name, exact=True).first).to_be_attached()
        expect(page.get_by_text("Succeeded", exact=True)).to_have_count(len(names))

    open_page(page, dagster_ui, f"{asset_path(BALANCES)}?view=checks")
    page.get_by_text("trial_balance", exact=True).first.click()
    expect(page.get_by_text("This is a blocking asset check.", exact=False)).to_be_visible()
    expect(page.get_by_text("Passed", exact=True)).to_be_visible()
    checked = page.get_by_role("row").filter(has_text="tenants_checked").first
    expect(checked).to_contain_text(str(len(dagster_ui.loaded)))
    save(page, docs_dir / "ui-checks.png")
