"""The gateway's systemd unit (contrib/systemd): its own user, hardened, and started with the
site's configuration. (No systemd here: the file is read as systemd reads its keys.)"""

from __future__ import annotations

from pathlib import Path

UNIT = Path(__file__).resolve().parents[2] / "contrib" / "systemd" / "shifter-gateway.service"


def _keys() -> dict[str, dict[str, str]]:
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] = {}
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not KEY=VALUE: {raw!r}"
        assert key not in current, f"{key} given twice"
        current[key] = value
    return sections


def test_the_gateway_unit_is_hardened():
    service = _keys()["Service"]
    assert service["User"] == "shifter" and service["Group"] == "shifter"
    assert service["ExecStart"].split()[0].endswith("/shifter-gateway")
    assert "--config /etc/shifter/shifter.yaml" in service["ExecStart"]
    expected = {
        "NoNewPrivileges": "yes",
        "CapabilityBoundingSet": "",
        "AmbientCapabilities": "",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "RestrictSUIDSGID": "yes",
        "RestrictNamespaces": "yes",
    }
    assert {k: service.get(k) for k in expected} == expected
    assert service["ReadWritePaths"] == "/var/lib/shifter"


def test_the_gateway_unit_needs_munge():
    unit = _keys()["Unit"]
    assert "munge.service" in unit["Requires"] and "munge.service" in unit["After"]
    assert _keys()["Install"]["WantedBy"] == "multi-user.target"
