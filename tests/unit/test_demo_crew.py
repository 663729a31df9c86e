"""The demo's crew gives up on a worker after MAX_HANDLER_FAILURES consecutive failures and
reports the failures that made it give up, however many more arrive before the main thread
looks (the broker redelivers a failing message at once)."""
import pytest

from cxr_mq.demo import MAX_HANDLER_FAILURES, Crew, DemoError


def test_failures_past_the_limit_before_a_check_report_the_limit():
    crew = Crew()
    for i in range(MAX_HANDLER_FAILURES + 3):
        crew.handler_failed("hospital-2", f"round_start: RuntimeError: failure {i}")
    with pytest.raises(DemoError) as raised:
        crew.check()
    assert str(raised.value) == (f"hospital-2 failed {MAX_HANDLER_FAILURES} times in a row: "
                                 f"round_start: RuntimeError: failure {MAX_HANDLER_FAILURES - 1}")


def test_a_success_resets_the_count_and_fewer_failures_than_the_limit_pass():
    crew = Crew()
    for _ in range(MAX_HANDLER_FAILURES - 1):
        crew.handler_failed("hospital-1", "boom")
    crew.check()
    crew.handler_succeeded("hospital-1")
    for _ in range(MAX_HANDLER_FAILURES - 1):
        crew.handler_failed("hospital-1", "boom")
    crew.check()
    crew.handler_failed("hospital-1", "boom")
    with pytest.raises(DemoError, match="hospital-1 failed 3 times in a row: boom"):
        crew.check()
