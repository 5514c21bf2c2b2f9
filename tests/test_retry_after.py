"""The retry delay a vendor asks for is typed: a ``RetryAfter`` error carries it (the vendor
client's ``VendorHTTPError`` does), and any other exception asks for nothing, whatever its
attributes."""

from __future__ import annotations

from workers.http import VendorHTTPError
from workers.policy.retry import RetryAfter, retry_after_s


def test_a_vendor_error_carries_its_retry_after() -> None:
    error = VendorHTTPError(429, "http://vendor/x", "slow down", retry_after_s=2.5)
    assert isinstance(error, RetryAfter)
    assert retry_after_s(error) == 2.5
    assert retry_after_s(VendorHTTPError(500, "http://vendor/x", "oops")) is None


def test_only_a_retry_after_error_asks_for_a_delay() -> None:
    class Lookalike(Exception):
        retry_after_s = 30.0

    assert retry_after_s(Lookalike()) is None
    assert retry_after_s(ValueError("x")) is None

    class Busy(RetryAfter):
        def __init__(self, delay_s: float) -> None:
            super().__init__(f"busy for {delay_s} s")
            self.retry_after_s = delay_s

    assert retry_after_s(Busy(4.0)) == 4.0
