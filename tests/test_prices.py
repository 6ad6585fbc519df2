"""Prices: every bundled profile states its price basis, every price has a source and a date,
a user profile may give a plain number, and malformed prices are one line (exit 2)."""
import json
import re

import pytest

from simcost.cli import main
from simcost.hardware import list_profiles, load_profile
from simcost.hardware.profile import PRICE_GIVEN, PROFILE_DIR, Device
from simcost.report import usd_per_hour

DATE = re.compile(r"\d{4}-(0[1-9]|1[0-2])(-(0[1-9]|[12]\d|3[01]))?")


def _raw(name):
    return json.loads((PROFILE_DIR / f"{name}.json").read_text())


@pytest.mark.parametrize("name", list_profiles())
def test_bundled_price_basis_source_and_date(name):
    raw = _raw(name)
    assert raw.get("price_basis") in ("rental", "owned", "none"), name
    q = raw.get("price_usd_per_hour")
    if raw["price_basis"] == "none":
        assert q is None
        assert len(raw["notes"]["price_usd_per_hour"]) > 40     # the reason, in words
    else:
        assert isinstance(q, dict), f"{name}: a bundled price is a quantity, not a plain number"
        assert q["source"] and q["source"] != PRICE_GIVEN
        assert DATE.fullmatch(q["date"]), q["date"]
        assert q["value"] > 0
        if raw["price_basis"] == "owned":      # an amortised purchase price: derived, lifetime
            assert q["derived"] is True and "lifetime" in q["note"]
    d = load_profile(name).device()
    assert d.price_basis == raw["price_basis"]
    assert (d.price_usd_per_hour is None) == (raw["price_basis"] == "none")
    if q is not None:
        assert (d.price_usd_per_hour, d.price_source, d.price_date) == \
            (q["value"], q["source"], q["date"])


def test_most_bundled_profiles_have_a_price():
    bases = [_raw(n)["price_basis"] for n in list_profiles()]
    assert bases.count("rental") >= 20 and bases.count("owned") >= 2


def _user(tmp_path, base="l40s", **changes):
    d = _raw(base)
    d["name"] = "mine"
    for k, v in changes.items():
        if v is ...:
            d.pop(k, None)
        else:
            d[k] = v
    p = tmp_path / "mine.json"
    p.write_text(json.dumps(d))
    return p


def test_plain_number_price_in_user_profile(tmp_path):
    p = _user(tmp_path, price_usd_per_hour=1.25, price_basis=...)
    prof = load_profile(str(p))
    assert prof.price_basis == "rental"                  # the default with a price
    d = prof.device()
    assert d.price_usd_per_hour == 1.25 and d.price_basis == "rental"
    assert d.price_source == PRICE_GIVEN and d.price_date is None


def test_plain_number_owned_and_none_defaults(tmp_path):
    d = load_profile(str(_user(tmp_path, price_usd_per_hour=0.2, price_basis="owned"))).device()
    assert (d.price_usd_per_hour, d.price_basis) == (0.2, "owned")
    p2 = tmp_path / "b"
    p2.mkdir()
    prof = load_profile(str(_user(p2, price_usd_per_hour=None, price_basis=...)))
    assert prof.price_basis == "none" and prof.device().price_usd_per_hour is None


def _one_line(argv, capsys):
    rc = main(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("simcost: error: "), (rc, err)
    return lines[0]


BAD = [  # (changes to a copy of l40s.json, fragment of the one-line message)
    ({"price_usd_per_hour": {"value": 0.86, "source": "RunPod"}},
     "price_usd_per_hour needs the date of its price snapshot"),
    ({"price_usd_per_hour": {"value": 0.86, "source": "RunPod", "date": "June 2026"}},
     "price_usd_per_hour.date must be a date YYYY-MM-DD or YYYY-MM"),
    ({"price_usd_per_hour": {"value": 0.86, "source": "RunPod", "date": "2026-13"}},
     "must be a date YYYY-MM-DD or YYYY-MM, got '2026-13'"),
    ({"price_usd_per_hour": {"value": 0.86, "source": "RunPod", "date": "2026-02-30"}},
     "must be a date"),
    ({"price_basis": "none"}, "price_basis none takes no price_usd_per_hour (got 0.86 USD/h)"),
    ({"price_basis": "rented"}, "price_basis must be 'rental', 'owned' or 'none'"),
    ({"price_basis": "rental", "price_usd_per_hour": None}, "price_basis rental needs"),
    ({"price_basis": "owned",
      "price_usd_per_hour": {"value": 0.5, "source": "a shop", "date": "2026-01"}},
     "an owned price is an amortised purchase price: mark"),
    ({"price_usd_per_hour": -1}, "price_usd_per_hour.value must be >= 0, got -1"),
    ({"price_usd_per_hour": "1.5"}, "price_usd_per_hour"),
    ({"price_usd_per_hour": True}, "price_usd_per_hour"),
]


@pytest.mark.parametrize("changes,expect", BAD, ids=[str(c)[:50] for c, _ in BAD])
def test_bad_price_one_line(tmp_path, capsys, changes, expect):
    p = _user(tmp_path, **changes)
    line = _one_line(["hardware", "show", str(p)], capsys)
    assert "invalid hardware profile" in line and expect in line, line
    assert "Traceback" not in line


def test_bundled_rules_refused_one_line(monkeypatch, tmp_path, capsys):
    """What a user profile may omit, a bundled one may not: price_basis, a dated quantity, the
    reason for no price."""
    import simcost.hardware.profile as hp
    folder = tmp_path / "profiles"
    folder.mkdir()
    cases = {
        "nobasis": ({"price_basis": ...}, "price_basis is missing: a bundled profile states"),
        "plain": ({"price_usd_per_hour": 0.86}, "not a plain number"),
        "noreason": ({"price_usd_per_hour": None, "price_basis": "none"},
                     "needs the reason in notes.price_usd_per_hour"),
        "nodate": ({"price_usd_per_hour": {"value": 0.86, "source": "RunPod"}},
                   "needs the date of its price snapshot"),
    }
    for name, (changes, _) in cases.items():
        d = _raw("l40s")
        d["name"] = name
        for k, v in changes.items():
            d.pop(k) if v is ... else d.__setitem__(k, v)
        (folder / f"{name}.json").write_text(json.dumps(d))
    monkeypatch.setattr(hp, "PROFILE_DIR", folder)
    hp._load_file.cache_clear()
    for name, (_, expect) in cases.items():
        line = _one_line(["hardware", "show", name], capsys)
        assert f"invalid hardware profile {name}.json" in line and expect in line, line
    # the same files given by path are user profiles: the defaults apply where they can
    assert load_profile(str(folder / "nobasis.json")).price_basis == "rental"
    assert load_profile(str(folder / "plain.json")).device().price_source == PRICE_GIVEN
    hp._load_file.cache_clear()


def test_device_positional_and_consistency():
    d = Device("x", "gpu", {"fp32": 1e12}, 1e9, 1e9, 0, 0, 2.0)     # existing callers' form
    assert (d.price_basis, d.price_source, d.price_date) == ("rental", None, None)
    assert Device("x", "gpu", {"fp32": 1e12}, 1e9, 1e9, 0, 0, None).price_basis == "none"
    with pytest.raises(ValueError):
        Device("x", "gpu", {"fp32": 1e12}, 1e9, 1e9, 0, 0, 2.0, price_basis="none")
    with pytest.raises(ValueError):
        Device("x", "gpu", {"fp32": 1e12}, 1e9, 1e9, 0, 0, None, price_basis="rental")


def test_cli_hardware_list_shows_prices(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    assert main(["hardware", "list"]) == 0
    out = capsys.readouterr().out
    assert "price/device-h" in out and "basis" in out
    for name in list_profiles():
        row = next(line for line in out.splitlines() if f" {name} " in line)
        q = _raw(name)["price_usd_per_hour"]
        if q is None:
            assert "no price" in row
        else:
            assert usd_per_hour(q["value"]) in row
            assert ("owned (amortised)" if _raw(name)["price_basis"] == "owned"
                    else "rental") in row


def test_cli_hardware_list_json(capsys):
    assert main(["hardware", "list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["profiles"]}
    assert set(rows) == set(list_profiles())
    assert rows["h100-sxm"]["price_basis"] == "rental" and rows["h100-sxm"]["price_date"]
    assert rows["rpi5"]["price_basis"] == "owned"
    none = [r for r in rows.values() if r["price_basis"] == "none"]
    assert none and all(r["price_usd_per_hour"] is None and r["price_note"] for r in none)


def test_cli_hardware_show_price(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    assert main(["hardware", "show", "tpu-v6e"]) == 0
    out = capsys.readouterr().out
    assert "$2.70/h" in out and "rental" in out and "2024-12" in out
    assert main(["hardware", "show", "tpu-v6e", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["price_basis"] == "rental" and d["price_usd_per_hour"]["date"] == "2024-12"
    assert main(["hardware", "show", "gb200"]) == 0
    assert "none" in capsys.readouterr().out


def test_usd_per_hour_format():
    assert usd_per_hour(2.99) == "$2.99/h" and usd_per_hour(0.009475) == "$0.0095/h"
