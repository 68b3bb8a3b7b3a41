"""The one place a session is made: local Spark with Delta, listening on loopback only."""

from __future__ import annotations

import ipaddress
import struct
from pathlib import Path


def _listening_addresses(port: int) -> set[str]:
    """Local addresses of the sockets listening on `port`, from the kernel's own tables (Linux)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        path = Path(table)
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(_address(address))
    return found


def _address(hex_address: str) -> str:
    """/proc/net/tcp{,6} write addresses as 32-bit words in host (little-endian) order."""
    words = [int(hex_address[i:i + 8], 16) for i in range(0, len(hex_address), 8)]
    ip = ipaddress.ip_address(b"".join(struct.pack("<I", w) for w in words))
    mapped = getattr(ip, "ipv4_mapped", None)  # Java listens on IPv6 sockets: ::ffff:127.0.0.1
    return str(mapped or ip)


def test_local_spark_listens_on_loopback_only(spark):
    """Without the binding, Spark picks the machine's network address and opens its ports there."""
    assert spark.conf.get("spark.driver.host") == "127.0.0.1"
    assert spark.conf.get("spark.driver.bindAddress") == "127.0.0.1"
    port = int(spark.conf.get("spark.driver.port"))
    # Not 0.0.0.0 / :: (every interface), nor the machine's own address.
    assert _listening_addresses(port) == {"127.0.0.1"}
