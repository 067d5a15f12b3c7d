"""The phone-number detector: common national and international formats fire; dates, versions, IPs,
order numbers, card numbers and other digit runs do not. Also how it combines with the other detectors."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.policy import load_policies
from gateway.routing.detectors import detect, has_card_number, has_phone
from gateway.routing.resolve import RouteInput, resolve_policy

PHONES = [
    "call +44 20 7946 0958",                 # international, spaces
    "+1 (415) 555-0100",
    "+4915112345678",                         # international, no separators
    "+33 1 23 45 67 89",
    "+44 (0)20 7946 0958",                    # the UK's (0) trunk hint
    "0044 20 7946 0958",                      # 00 instead of +
    "+352 123 456",                           # a short country's number: the + makes it a phone
    "(415) 555-0100",                         # North American
    "(415)555-0100",
    "415-555-0100",
    "call me at 415.555.0100, thanks",
    "1-800-555-0199",
    "4155550123",                             # bare 10-digit North American
    "tel:4155550123",
    "07700 900123",                           # UK mobile
    "Tel: 07700 900123.",
    "07700900123",                            # UK mobile, bare
    "020 7946 0958",                          # UK London
    "020-7946-0958",
    "030 12345678",                           # DE Berlin
    "Telefon: 030 1234 5678",
    "(030) 12345678",
    "030/12345678",
    "030-12345678",
    "0151 12345678",                          # DE mobile, 12 digits
    "089 1234567",                            # DE Munich, 10 digits
    "my number is 0301234567",                # bare national with a trunk 0
    "01 23 45 67 89",                         # FR
    "06 12 34 56 78",
    "01.23.45.67.89",                         # FR, dotted
    "ring 0301234567, or 07700 900123.",
]

NOT_PHONES = [
    "version 1.2.3 of 2024", "release 2.31.4567", "v10.0.19045.3570", "build 0.10.12345",   # versions
    "1.0.4155550123", "v4155550123",
    "01.02.2024", "01.02.2024 10:30", "at 12:30 on 01.02.2024", "date 31.12.2023 23:59",   # dates and times
    "02/01/2024", "2023/12/31", "12/31/2023 11:59", "2024-01-02 10:30:00",
    "192.168.100.200", "10.0.0.1", "ip 010.020.030.040", "2001:0db8:85a3:0000:0000:8a2e:0370:7334",   # IPs
    "order 12345", "555-0100", "12345678", "total 123 456 789", "(12) 34", "+12345", "+1 2",   # short
    "order ORD-4155550123", "order A4155550123B", "INV4155550123", "#4155550123",          # order numbers
    "uuid 0301234567-abcd", "SKU 123-4567-89012", "order 2024-0012-3456",
    "ISBN 0-306-40615-2", "ISBN 978-0-306-40615-7",
    "4111 1111 1111 1111", "4111111111111111", "4111-1111-1111-1111", "5555 5555 5555 4444",   # cards
    "4000 0566 5566 5556", "card 4000 0012 3456 7890", "3782 822463 10005",
    "415555012345", "ts 1712345678901", "00123456789", "order 0012345678", "id 0000000000",   # digit runs
    "1234567890", "1700000000",               # bare 10 digits that no North American number can be
    "pi is 3.14159265358979", "3.4155550123", "0.0301234567", "4155550123.50",              # decimals
]


@pytest.mark.parametrize("text", PHONES)
def test_phone_numbers_fire(text: str) -> None:
    assert has_phone(text)
    assert has_phone(f"Please call {text} tomorrow")            # inside a sentence as well


@pytest.mark.parametrize("text", NOT_PHONES)
def test_other_numbers_do_not(text: str) -> None:
    assert not has_phone(text)


def test_card_numbers_are_the_card_detector_s() -> None:
    text = "pay with 4111 1111 1111 1111"
    assert has_card_number(text) and not has_phone(text)
    assert detect(frozenset({"phone", "card_number"}), text) == ["card_number"]
    assert detect(frozenset({"personal_data"}), "ring 07700 900123 or mail a@b.io") == ["email", "phone"]
    assert detect(frozenset({"personal_data"}), "release 2.31.4567 on 01.02.2024") == []


def test_a_personal_data_rule_keeps_a_national_number_local(tmp_path: Path) -> None:
    (tmp_path / "policies.yaml").write_text("""
models:
  hosted:
    deployments: [{provider: simulated, name: hosted-a, model: h-1, price: {input_per_mtok: 1, output_per_mtok: 2}}]
  local:
    deployments: [{provider: simulated, name: local-a, model: l-1, price: {input_per_mtok: 0, output_per_mtok: 0}}]
routes:
  - {name: private, match: {contains: [personal_data]}, candidates: [local]}
""")
    policies = load_policies(str(tmp_path))

    def route(text: str) -> str:
        body = {"model": "hosted", "messages": [{"role": "user", "content": text}]}
        return resolve_policy(policies, RouteInput("default", "hosted", "chat", body), pick=0.0).route

    assert route("Ruf mich an: 030 12345678") == "private"
    assert route("my mobile is 07700 900123") == "private"
    assert route("invoice 2024-0012-3456 from 01.02.2024, v2.31.4567") == "default"
