"""Many connections per ERP: `erp-pipelines connections add/list/remove` (secrets on standard input
only, encrypted at rest), two Tripletex systems served as two connections of one ERP, each landing
its own tenants, the holder rule across connections, a refused credential failing only its own
connection's tenants, runs cut per connection, and the doctor reporting each connection."""

import asyncio
import dataclasses
import datetime as dt
import io
import json
from types import SimpleNamespace

import dagster as dg
import pytest
from sandbox_env import tripletex_env
from secret_scan import SecretScan

from erp_pipelines.cli import main
from erp_pipelines.connections import connections_of, stored_connections, tokens_prefix
from erp_pipelines.defs.build import build_definitions
from erp_pipelines.defs.runs import RANGE_END, RANGE_START
from erp_pipelines.model import Client, ClientStatus, add_months, months_between
from erp_pipelines.pipeline import iterate_sync, iterate_then_close, load_tenants, refresh_clients
from erp_pipelines.sandbox.common import serve
from erp_pipelines.sandbox.ledger import generate_ledger, make_org_number
from erp_pipelines.sandbox.tripletex import TripletexSandbox
from erp_pipelines.tokens import KEY_VARIABLE, TokenStore
from erp_pipelines.warehouse import Warehouse

THIS_MONTH = dt.date.today().replace(day=1)
FIRST = add_months(THIS_MONTH, -1)
STORE_KEY = TokenStore.generate_key()
FIRM = "Byrå AS"  # the second connection; slug byra-as
SLUG = "byra-as"
SECOND = {"consumer": "consumer-SECOND-c0nnection-token", "employee": "employee-SECOND-c0nnection-token"}


def second_sandbox():
    """Another accounting firm's Tripletex: other tenants, other client ids, other tokens."""
    ledger = generate_ledger(3, seed=77, first_month=FIRST, last_month=THIS_MONTH, rejected_fixtures=False,
                             client_id_base=90_000)
    return TripletexSandbox(ledger, consumer_token=SECOND["consumer"], accountant_employee_token=SECOND["employee"])


def stdin_lines(url: str, employee: str = SECOND["employee"]) -> str:
    return f"TRIPLETEX_BASE_URL={url}\nTRIPLETEX_CONSUMER_TOKEN={SECOND['consumer']}\nTRIPLETEX_EMPLOYEE_TOKEN={employee}\n"


def cli(monkeypatch, capsys, args, stdin=""):
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def world(tmp_path, monkeypatch, capsys):
    """Firm one's Tripletex as the environment's default connection; firm two's added by the CLI."""
    first = TripletexSandbox(generate_ledger(3, first_month=FIRST, last_month=THIS_MONTH, rejected_fixtures=False))
    second = second_sandbox()
    with serve(first.app, path="/v2") as url_one, serve(second.app, path="/v2") as url_two:
        env = tripletex_env(first, url_one, tmp_path, TRIPLETEX_HISTORY_START=FIRST.isoformat(),
                            **{KEY_VARIABLE: STORE_KEY})
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        code, out, err = cli(monkeypatch, capsys, ["connections", "add", "tripletex", "--name", FIRM],
                             stdin_lines(url_two))
        assert (code, err) == (0, ""), err
        yield SimpleNamespace(first=first, second=second, env=env, url_two=url_two, add_output=out,
                              warehouse=Warehouse(env["ERP_WAREHOUSE_PATH"]),
                              store=TokenStore(tmp_path / "tokens.enc", key=STORE_KEY))


def resource_connectors(env):
    return build_definitions(env).resources["tripletex"].process_config_and_initialize().connectors()


def refresh(w):
    connectors = resource_connectors(w.env)
    return asyncio.run(_closing(connectors, refresh_clients(connectors, w.warehouse)))


async def _closing(connectors, awaitable):
    try:
        return await awaitable
    finally:
        await connectors.aclose()


def load_all(w):
    connectors = resource_connectors(w.env)
    clients = list(w.warehouse.active_clients("tripletex").values())
    batches = iterate_sync(iterate_then_close(connectors, load_tenants(
        connectors, w.warehouse, clients, what=("accounts", "balances"), months=months_between(FIRST, THIS_MONTH))))
    loaded, failed = [], []
    for batch in batches:
        loaded += batch.loaded
        failed += batch.failed
    return loaded, failed


def truth(tenant):
    return sorted((b.period, b.account_number, b.opening, b.movement, b.closing)
                  for b in tenant.expected_balances(months_between(FIRST, THIS_MONTH)))


def stored_balances(warehouse, org):
    return warehouse.query("SELECT period, account_number, opening, movement, closing FROM balances "
                           "WHERE erp = 'tripletex' AND org_number = ? ORDER BY ALL", [org])


# ---------------------------------------------------------------------------------------- the CLI


def test_add_list_remove_with_the_secrets_on_standard_input_only(world, monkeypatch, capsys, tmp_path):
    assert world.add_output.startswith(f"tripletex connection '{FIRM}' ({SLUG}) stored in ")
    assert "TRIPLETEX_BASE_URL, TRIPLETEX_CONSUMER_TOKEN, TRIPLETEX_EMPLOYEE_TOKEN, TRIPLETEX_RECONCILE" \
        in world.add_output  # the default of the non-secret TRIPLETEX_RECONCILE is stored too
    outputs = [world.add_output]

    # the store holds them, encrypted: the file's bytes never show a secret
    [stored] = stored_connections(world.store, "tripletex")
    assert (stored.name, stored.slug, stored.settings["TRIPLETEX_EMPLOYEE_TOKEN"]) == (FIRM, SLUG, SECOND["employee"])
    raw = world.store.path.read_bytes()
    assert all(secret.encode() not in raw for secret in SECOND.values())

    # a secret as an argument is refused, naming standard input; the value is not echoed
    code, out, err = cli(monkeypatch, capsys, ["connections", "add", "tripletex", "--name", "Other",
                                               "--set", f"TRIPLETEX_EMPLOYEE_TOKEN={SECOND['employee']}"])
    assert code == 2 and "TRIPLETEX_EMPLOYEE_TOKEN is a secret and cannot be given as an argument" in err
    assert "give it on standard input" in err
    outputs += [out, err]
    # a duplicate name, an unknown ERP, a missing required secret: refused, each naming the fix
    code, _, err = cli(monkeypatch, capsys, ["connections", "add", "tripletex", "--name", "BYRÅ as"],
                       stdin_lines(world.url_two))
    assert code == 2 and f"tripletex already has a connection named 'BYRÅ as' ({SLUG})" in err
    assert 'erp-pipelines connections remove tripletex --name "BYRÅ as"' in err
    code, _, err = cli(monkeypatch, capsys, ["connections", "add", "nosuch", "--name", "X"], stdin_lines(world.url_two))
    assert code == 2 and "unknown ERP 'nosuch'" in err
    code, _, err = cli(monkeypatch, capsys, ["connections", "add", "tripletex", "--name", "Half"],
                       f"TRIPLETEX_CONSUMER_TOKEN={SECOND['consumer']}\n")
    assert code == 2 and "TRIPLETEX_EMPLOYEE_TOKEN is not set" in err and "on standard input" in err
    outputs.append(err)

    code, out, _ = cli(monkeypatch, capsys, ["connections", "list", "tripletex", "--json"])
    rows = {row["name"]: row for row in json.loads(out)["connections"]}
    assert code == 0 and set(rows) == {"default", FIRM}
    assert (rows["default"]["source"], rows[FIRM]["source"], rows[FIRM]["run_tag"]) == (
        "environment", "store", f"tripletex/{SLUG}")
    assert rows[FIRM]["variables"] == ["TRIPLETEX_BASE_URL", "TRIPLETEX_CONSUMER_TOKEN", "TRIPLETEX_EMPLOYEE_TOKEN",
                                       "TRIPLETEX_RECONCILE"]
    outputs.append(out)

    # its connector keeps its session token under the connection's own prefix; remove deletes both
    refresh(world)
    assert world.store.names(tokens_prefix("tripletex", SLUG))
    code, out, _ = cli(monkeypatch, capsys, ["connections", "remove", "tripletex", "--name", FIRM])
    assert code == 0 and "removed with its cached tokens" in out
    assert world.store.names(tokens_prefix("tripletex", SLUG)) == []
    assert [c.name for c in connections_of("tripletex", world.env, world.store)] == ["default"]
    code, _, err = cli(monkeypatch, capsys, ["connections", "remove", "tripletex", "--name", FIRM])
    assert code == 2 and f"tripletex has no stored connection named '{FIRM}'" in err
    outputs += [out, err]

    # until the next client refresh its tenants fail, naming the connection; the others land
    loaded, failed = load_all(world)
    assert sorted(e.client.org_number for e in loaded) == sorted(t.org_number for t in world.first.ledger.valid_tenants)
    assert {str(e.error).split(" Fix: ")[0] for e in failed} == {
        f"[tripletex] tripletex connection '{SLUG}' is not configured (removed?)"}
    # its tenants show as revoked at the next client refresh; their history is kept
    _, change = refresh(world)
    assert sorted(change.revoked) == sorted(t.org_number for t in world.second.ledger.valid_tenants)

    scan = SecretScan({"second consumer token": SECOND["consumer"], "second employee token": SECOND["employee"],
                       "token store key": STORE_KEY})
    for n, text in enumerate(outputs):
        scan.text(f"connections output {n}", text)
    assert scan.findings == []


# ---------------------------------------------------------------------------------------- two connections


def test_two_connections_of_one_erp_each_land_their_own_tenants(world):
    _, change = refresh(world)
    by_org = {c.org_number: c for c in world.warehouse.clients("tripletex")}
    for sandbox, slug in ((world.first, "default"), (world.second, SLUG)):
        for tenant in sandbox.ledger.valid_tenants:
            assert (by_org[tenant.org_number].connection, by_org[tenant.org_number].status) == (slug, ClientStatus.ACTIVE)
    assert len(change.active) == 6 and change.failed_connections == {}

    loaded, failed = load_all(world)
    assert failed == [] and len(loaded) == 6
    for sandbox in (world.first, world.second):
        for tenant in sandbox.ledger.valid_tenants:
            assert stored_balances(world.warehouse, tenant.org_number) == truth(tenant)
    served = world.warehouse.tenants_per_connection("tripletex")
    assert served == {("tripletex", "default"): 3, ("tripletex", SLUG): 3}


def test_a_number_reached_through_two_connections_stays_with_its_holder(world, monkeypatch, capsys):
    refresh(world)
    held = world.first.ledger.valid_tenants[0]
    twin = world.second.add_client(name="Tvilling AS", org_number=held.org_number)
    _, change = refresh(world)

    rows = {(c.connection, c.erp_client_id): c for c in world.warehouse.clients("tripletex")}
    holder = rows[("default", str(held.erp_client_id))]
    rejected = rows[(SLUG, str(twin.erp_client_id))]
    assert holder.status == ClientStatus.ACTIVE
    assert rejected.status == ClientStatus.REJECTED
    assert rejected.status_reason.startswith(
        f"organisation number {held.org_number} is held by tripletex client {held.erp_client_id} ({held.name}) "
        "of connection default: it held the number first.")
    assert [c.erp_client_id for c in change.rejected] == [str(twin.erp_client_id)]
    _, failed = load_all(world)  # the number's data comes from its holder only
    assert failed == [] and stored_balances(world.warehouse, held.org_number) == truth(held)
    code, out, _ = cli(monkeypatch, capsys, ["clients", "list", "tripletex"])
    assert code == 0 and out.splitlines()[0].split()[-1] == "CONNECTION"
    [line] = [line for line in out.splitlines() if line.startswith("tripletex  Tvilling AS")]
    assert line.split()[-1] == SLUG and " rejected " in line


def test_a_refused_credential_fails_only_its_own_connections_tenants(world, monkeypatch, capsys):
    refresh(world)
    code, _, _ = cli(monkeypatch, capsys, ["connections", "remove", "tripletex", "--name", FIRM])
    code, _, err = cli(monkeypatch, capsys, ["connections", "add", "tripletex", "--name", FIRM],
                       stdin_lines(world.url_two, employee="employee-WRONG-c0nnection-token"))
    assert code == 0, err

    loaded, failed = load_all(world)
    assert sorted(e.client.org_number for e in loaded) == sorted(t.org_number for t in world.first.ledger.valid_tenants)
    assert sorted(e.client.org_number for e in failed) == sorted(t.org_number for t in world.second.ledger.valid_tenants)
    for extract in failed:
        assert f"tripletex connection '{SLUG}'" in str(extract.error)
        assert "erp-pipelines connections remove tripletex --name byra-as" in str(extract.error)
        assert "employee-WRONG" not in str(extract.error)
    for tenant in world.first.ledger.valid_tenants:
        assert stored_balances(world.warehouse, tenant.org_number) == truth(tenant)

    # listing with the refused credential keeps that connection's clients as they were (not revoked)
    _, change = refresh(world)
    assert list(change.failed_connections) == [SLUG] and change.revoked == []
    assert {c.status for c in world.warehouse.clients("tripletex") if c.connection == SLUG} == {ClientStatus.ACTIVE}


# ---------------------------------------------------------------------------------------- Dagster and doctor


def test_the_sensor_and_the_schedule_cut_runs_per_connection(world, tmp_path):
    (tmp_path / "dagster").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster"),
                              overrides={"concurrency": {"pools": {"default_limit": 1}}}) as instance:
        defs = build_definitions({**world.env, "ERP_TENANTS_PER_RUN": "10"})
        sensor = defs.resolve_sensor_def("tripletex_client_access_sensor")
        result = sensor(dg.build_sensor_context(instance=instance, definitions=defs, resources=defs.resources))
        for request in result.dynamic_partitions_requests:
            instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
        keys = instance.get_dynamic_partitions("tripletex_tenants")
        by_connection = {"default": [t.org_number for t in world.first.ledger.valid_tenants],
                         SLUG: [t.org_number for t in world.second.ledger.valid_tenants]}
        expected = {f"tripletex/{slug}": (orgs[0], orgs[-1]) for slug, orgs in by_connection.items()}
        assert keys == by_connection["default"] + by_connection[SLUG]
        assert {r.tags["erp/connection"]: (r.tags[RANGE_START], r.tags[RANGE_END])
                for r in result.run_requests} == expected
        assert len(result.run_requests) == 2
        # the ERP's pool gets a slot per connection
        assert instance.event_log_storage.get_concurrency_info("tripletex_api").slot_count == 2

        job = defs.resolve_implicit_global_asset_job_def()
        for request in result.run_requests:
            run = job.execute_in_process(instance=instance, asset_selection=list(request.asset_selection),
                                         tags=request.tags, run_config=request.run_config)
            assert run.success
            connection = request.tags["erp/connection"].split("/", 1)[1]
            materialised = [e.step_materialization_data.materialization for e in run.get_asset_materialization_events()]
            assert {m.partition for m in materialised} == set(by_connection[connection])
            assert {m.metadata["connection"].value for m in materialised} == {connection}

        schedule = defs.resolve_schedule_def("tripletex_daily_balances")
        context = dg.build_schedule_context(instance=instance, resources=defs.resources,
                                           scheduled_execution_time=dt.datetime(2026, 11, 21, 6))
        daily = schedule.evaluate_tick(context).run_requests
        assert {r.tags["erp/connection"]: (r.tags[RANGE_START], r.tags[RANGE_END]) for r in daily} == expected

        # the clients asset's table shows which connection serves each tenant
        run = job.execute_in_process(instance=instance, asset_selection=[dg.AssetKey(["tripletex", "clients"])])
        [table] = [e.step_materialization_data.materialization.metadata["clients"].value
                   for e in run.get_asset_materialization_events()]
        for tenant in world.second.ledger.valid_tenants:
            assert f"| {tenant.org_number} | {tenant.name} | {tenant.erp_client_id} | {SLUG} | active |" in table

        # a refused credential: that connection's run records a failure observation naming it
        world.store.put(f"connection:tripletex:{SLUG}", {**world.store.get(f"connection:tripletex:{SLUG}"),
                                                         "settings": {"TRIPLETEX_BASE_URL": world.url_two,
                                                                      "TRIPLETEX_CONSUMER_TOKEN": SECOND["consumer"],
                                                                      "TRIPLETEX_EMPLOYEE_TOKEN": "employee-WRONG-1"}})
        world.store.delete_prefix(tokens_prefix("tripletex", SLUG))  # no cached session to fall back on
        [request] = [r for r in daily if r.tags["erp/connection"] == f"tripletex/{SLUG}"]
        run = job.execute_in_process(instance=instance, asset_selection=list(request.asset_selection),
                                     tags=request.tags, raise_on_error=False)
        assert not run.success
        observed = [e.asset_observation_data.asset_observation for e in run.all_events if e.is_asset_observation]
        assert {o.partition for o in observed} == set(by_connection[SLUG])
        assert {o.metadata["connection"].value for o in observed} == {SLUG}
        assert all(f"tripletex connection '{SLUG}'" in o.description for o in observed)


def test_the_doctor_reports_each_connection(world, monkeypatch, capsys):
    code, out, _ = cli(monkeypatch, capsys, ["doctor", "tripletex"])
    assert code == 0
    assert "Tripletex (tripletex): credential OK" in out
    assert f"Tripletex (tripletex, connection {FIRM}): credential OK" in out
    code, out, _ = cli(monkeypatch, capsys, ["doctor", "tripletex", "--json"])
    document = json.loads(out)
    assert set(document["erps"]) == {"tripletex", f"tripletex/{SLUG}"}
    second = document["erps"][f"tripletex/{SLUG}"]
    assert (second["connection"], second["credential"], second["clients_reached"]) == (FIRM, "ok", 3)

    cli(monkeypatch, capsys, ["connections", "remove", "tripletex", "--name", FIRM])
    cli(monkeypatch, capsys, ["connections", "add", "tripletex", "--name", FIRM],
        stdin_lines(world.url_two, employee="employee-WRONG-c0nnection-token"))
    code, out, _ = cli(monkeypatch, capsys, ["doctor", "tripletex"])
    assert code == 2
    assert "Tripletex (tripletex): credential OK" in out
    assert f"Tripletex (tripletex, connection {FIRM}): credential REFUSED" in out
    assert "employee-WRONG" not in out


def test_an_erp_with_stored_connections_only_is_enabled(world, monkeypatch):
    env = {k: v for k, v in world.env.items() if not k.startswith("TRIPLETEX_") and k != "ERP_SOURCES"}
    for name in set(world.env) - set(env):
        monkeypatch.delenv(name)
    defs = build_definitions(env)
    assert defs.resolve_sensor_def("tripletex_client_access_sensor") is not None
    connectors = defs.resources["tripletex"].process_config_and_initialize().connectors()
    assert list(connectors) == [SLUG]
    listed, _ = asyncio.run(_closing(connectors, refresh_clients(connectors, world.warehouse)))
    assert sorted(c.org_number for c in listed) == sorted(t.org_number for t in world.second.ledger.valid_tenants)


def test_a_warehouse_from_before_connections_gets_the_column_with_default(tmp_path):
    import duckdb

    path = tmp_path / "old.duckdb"
    with duckdb.connect(str(path)) as con:  # the clients table as files before connections have it
        con.execute("""CREATE TABLE clients (erp VARCHAR NOT NULL, org_number VARCHAR NOT NULL,
            erp_client_id VARCHAR NOT NULL, name VARCHAR, status VARCHAR NOT NULL, status_reason VARCHAR,
            first_seen_at TIMESTAMP NOT NULL, last_seen_at TIMESTAMP NOT NULL, revoked_at TIMESTAMP,
            last_extracted_at TIMESTAMP, last_error VARCHAR, last_error_at TIMESTAMP)""")
        con.execute("INSERT INTO clients VALUES ('tripletex', '912345674', '80001', 'Gammel AS', 'ok', NULL, "
                    "now(), now(), NULL, NULL, NULL, NULL)")
    [client] = Warehouse(path).clients("tripletex")
    assert (client.org_number, client.connection, client.status) == ("912345674", "default", ClientStatus.ACTIVE)


def test_a_client_id_reached_through_two_connections_changes_only_through_the_one_named(tmp_path, monkeypatch,
                                                                                          capsys):
    """Two firms' keys reaching the same client company: one registry row per connection. Activate
    and deactivate change the row of the connection named, never the other one's."""
    monkeypatch.setenv("ERP_WAREHOUSE_PATH", str(tmp_path / "warehouse.duckdb"))
    warehouse = Warehouse(tmp_path / "warehouse.duckdb")
    org = make_org_number(4711)
    shared = Client("tripletex", org, "4711", "Felles Kunde AS")
    warehouse.record_clients("tripletex", [shared, dataclasses.replace(shared, connection=SLUG)], auto_activate=True)

    def statuses():
        return {c.connection: c.status for c in warehouse.clients("tripletex")}

    assert statuses() == {"default": ClientStatus.ACTIVE, SLUG: ClientStatus.REJECTED}

    code, _, err = cli(monkeypatch, capsys, ["clients", "activate", "tripletex", org, "--client-id", "4711"])
    assert code == 1 and "tripletex client 4711 is reached through 2 connections" in err
    assert "connection byra-as" in err and "--connection NAME" in err
    assert statuses() == {"default": ClientStatus.ACTIVE, SLUG: ClientStatus.REJECTED}

    code, out, err = cli(monkeypatch, capsys, ["clients", "activate", "tripletex", org, "--client-id", "4711",
                                               "--connection", FIRM])
    assert (code, err) == (0, ""), err
    assert "rejected -> active; took organisation number" in out
    assert statuses() == {"default": ClientStatus.INACTIVE, SLUG: ClientStatus.ACTIVE}  # the number moved
    [moved] = [c for c in warehouse.clients("tripletex") if c.connection == "default"]
    assert moved.status_reason.endswith(f"erp-pipelines clients activate tripletex {org} --client-id 4711 "
                                        "--connection default")

    code, out, err = cli(monkeypatch, capsys, ["clients", "deactivate", "tripletex", org, "--client-id", "4711",
                                               "--connection", SLUG])
    assert (code, err) == (0, "") and "active -> inactive" in out, err
    assert statuses() == {"default": ClientStatus.INACTIVE, SLUG: ClientStatus.INACTIVE}
    code, out, err = cli(monkeypatch, capsys, ["clients", "activate", "tripletex", org, "--connection", "default"])
    assert (code, err) == (0, "") and "inactive -> active" in out, err
    assert statuses() == {"default": ClientStatus.ACTIVE, SLUG: ClientStatus.INACTIVE}
