"""Overload control: the door's two rules, a saturated server's answers, and the client's back-off."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fusionserve.client import FusionClient
from fusionserve.errors import DeadlineExceededError
from fusionserve.server.admission import (
    INTERVAL_S,
    LAG_INTERVAL_S,
    LAG_READ_S,
    MAX_PUSHBACK_S,
    MIN_PUSHBACK_S,
    RECENT_S,
    SAMPLE_S,
    Admission,
    Backlog,
    OverloadedError,
)
from fusionserve.v1 import fusion_pb2 as pb
from fusionserve.v1 import fusion_pb2_grpc as pb_grpc
from tests.serving import RunningServer, ServicerServer

SLOW = 2000
"""Side of the images that make a standing queue: one takes tens of ms to decode, two threads decode."""


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def refused(door: Admission, clock: Clock) -> OverloadedError:
    """Offer a call to ``door`` now and after INTERVAL_S: the second is refused (else fail)."""
    with door.admit(1):  # the wait goes over the target: a burst may still drain
        pass
    clock.now += INTERVAL_S
    with pytest.raises(OverloadedError) as info:
        with door.admit(1):
            pass
    return info.value


def measured(target_s: float, items_per_s: float) -> tuple[Admission, Clock]:
    """A door that has measured ``items_per_s`` over one busy sample."""
    clock = Clock()
    door = Admission(target_s, clock=clock)
    with door.admit(int(items_per_s * SAMPLE_S)):
        clock.now += SAMPLE_S
    assert door.capacity == pytest.approx(items_per_s)
    return door, clock


def test_the_door_refuses_once_the_wait_inside_reaches_the_target():
    door, clock = measured(target_s=0.05, items_per_s=1000)  # 50 items ahead = 50 ms
    assert door.limit == pytest.approx(50)
    with door.admit(49):
        with door.admit(64):  # 49 items ahead: 49 ms; its own size does not count against it
            clock.now += 1.0
            with door.admit(1):  # 113 ms from now on, but a burst may drain within INTERVAL_S
                pass
            clock.now += INTERVAL_S / 2
            with door.admit(1):
                pass
            error = refused(door, clock)
            wait = f"wait about {door.estimated_wait_s() * 1000:.0f} ms to start, over the 50 ms target"
    assert "server overloaded" in str(error) and wait in str(error) and error.reason == "queue_delay"
    assert 0 < error.retry_after_s <= MAX_PUSHBACK_S
    assert door.inflight == 0  # released, refused work never held
    with door.admit(1):  # under the target again: admitted
        pass
    with door.admit(200):  # over it again soon after the last refusal: refused at once, no interval
        with pytest.raises(OverloadedError):
            with door.admit(1):
                pass
    clock.now += 2 * RECENT_S
    with door.admit(200), door.admit(1):  # long after: a burst gets its interval again
        pass


def test_an_idle_door_admits_anything_and_idle_time_does_not_lower_the_capacity():
    door, clock = measured(target_s=0.01, items_per_s=1000)
    clock.now += 60  # a minute idle
    with door.admit(500):  # over the limit of 10, but nothing else is in flight
        clock.now += 0.5
    assert door.capacity == pytest.approx(1000)  # 500 items in 0.5 s busy


def test_a_zero_target_admits_everything():
    door, _ = measured(target_s=0.0, items_per_s=1000)
    with door.admit(10_000), door.admit(10_000):
        pass


def test_the_default_door_has_no_queue_delay_rule():
    door = Admission(clock=Clock())
    assert door.target_s == 0 and door.limit is None


def test_a_call_whose_deadline_cannot_be_met_is_refused_and_one_that_can_is_admitted():
    door, clock = measured(target_s=0.0, items_per_s=1000)  # no queue-delay rule: only deadlines refuse
    assert door.service_s == pytest.approx(SAMPLE_S)  # the measuring call found the server idle
    door.service_s = 0.002  # as if lone calls took 2 ms
    with door.admit(100):  # 100 items ahead: 100 ms to drain, then at least the 2 ms of a lone call
        assert door.predicted_s(1) == pytest.approx(0.102)
        with pytest.raises(OverloadedError) as info:
            with door.admit(1, timeout_s=0.05):
                pass
        error = info.value
        assert error.reason == "deadline" and "server busy" in str(error)
        assert "in about 102 ms, after its deadline (50 ms from now)" in str(error)
        assert MIN_PUSHBACK_S <= error.retry_after_s <= MAX_PUSHBACK_S
        with door.admit(1, timeout_s=0.2):  # its deadline allows the wait
            assert door.inflight == 101
        with door.admit(32, timeout_s=0.2):  # its own 32 items at the busy rate count too
            assert door.predicted_s(32) == pytest.approx(0.1 + 0.032 + 0.032)
        with pytest.raises(OverloadedError):
            with door.admit(150, timeout_s=0.2):  # 100 ms ahead + 150 ms of its own
                pass
        with door.admit(1):  # no deadline: never refused by this rule, however deep the queue
            pass
        for _ in range(100):  # the rule does not harden: every call is judged on its own deadline
            with door.admit(1, timeout_s=0.2):
                pass
    assert door.inflight == 0


def test_while_the_loop_lags_behind_in_taking_calls_up_short_deadlines_are_refused_and_long_ones_not():
    door, _ = measured(target_s=0.0, items_per_s=1000)
    door.service_s = 0.002
    with door.admit(10):  # 10 ms of work ahead
        with door.admit(1, timeout_s=0.05):
            pass
        door.lag_s = 0.08  # the calls waiting in gRPC's accept queue: 80 ms for the loop to take up
        with pytest.raises(OverloadedError, match="in about 92 ms, after its deadline"):
            with door.admit(1, timeout_s=0.05):
                pass
        with door.admit(1, timeout_s=0.5), door.admit(1):  # a long deadline, and none: not affected
            pass
    door.lag_s = 0.08
    with pytest.raises(OverloadedError):  # nothing admitted, but the loop is behind: not idle
        with door.admit(1, timeout_s=0.05):
            pass


TICK_S = 0.02  # how often the server reads gRPC's count (server/app.py)


def test_the_loop_falling_behind_a_flood_counts_as_lag_once_it_stands():
    backlog, received, taken, now = Backlog(0, 0.0), 0, 0, 0.0
    lags = []
    for _ in range(20):  # gRPC receives 2,000 calls/s, the loop takes up 1,000/s
        received, taken, now = received + 40, taken + 20, now + TICK_S
        lags.append(backlog.read(received, taken, now))
    standing = int(LAG_INTERVAL_S / TICK_S)
    assert lags[:standing] == [0.0] * standing  # a burst the loop may yet take up: no lag
    waiting = received - taken
    assert backlog.pace == pytest.approx(1000)
    # The 400 waiting take 0.4 s to take up; the call at their head arrived at 0.2 s (the 400th of
    # 2,000 a second), has waited 0.2 s, and the lag counted is that: it trails a growing flood.
    assert lags[-1] == pytest.approx(min(waiting / 1000, now - 0.2))
    for _ in range(3):  # the flood ends; the loop catches up
        taken, now = min(received, taken + 200), now + TICK_S
        last = backlog.read(received, taken, now)
    assert last == 0.0


def test_the_count_is_read_seldom_while_calm_and_often_once_behind_and_a_flood_still_counts_soon():
    """A reading costs the loop about half a call's time (a channelz read), so a calm server reads seldom."""
    backlog, received, taken, now = Backlog(0, 0.0), 0, 0, 0.0
    for _ in range(10):  # calm: 150 calls/s, taken up as they come
        step = backlog.next_read_s
        received, now = received + int(150 * step), now + step
        taken = received
        assert backlog.read(received, taken, now) == 0.0
    assert backlog.next_read_s == LAG_INTERVAL_S
    flood_from, counted = now, None
    while counted is None:  # gRPC now receives 2,000 calls/s, the loop takes up 1,000/s
        step = backlog.next_read_s
        received, taken, now = received + round(2000 * step), taken + round(1000 * step), now + step
        if backlog.read(received, taken, now):
            counted = now
        assert now - flood_from < 1.0
    assert backlog.next_read_s == LAG_READ_S  # behind: read often, to see the lag stand and to follow it
    assert counted - flood_from <= 2 * LAG_INTERVAL_S + 1e-9  # found within one interval, standing the next
    while received > taken:  # the flood ends; the loop catches up
        taken, now = min(received, taken + 200), now + backlog.next_read_s
        backlog.read(received, taken, now)
    assert backlog.read(received, taken, now + backlog.next_read_s) == 0.0
    assert backlog.next_read_s == LAG_INTERVAL_S


def test_calls_grpc_never_handed_over_stop_counting_as_waiting_and_a_later_flood_still_counts():
    backlog, received, taken, now = Backlog(0, 0.0), 0, 0, 0.0
    received, taken, now = 40, 10, now + TICK_S  # gRPC shed 30 of a burst of 40 from its accept queue
    backlog.read(received, taken, now)
    for _ in range(3):  # quiet: nothing received, nothing taken up, the 30 still over
        now += TICK_S
        lag = backlog.read(received, taken, now)
    assert lag == 0.0 and backlog.next_read_s == LAG_INTERVAL_S
    for _ in range(50):  # light load afterwards, taken up as it comes: no lag
        received, taken, now = received + 3, taken + 3, now + TICK_S
        assert backlog.read(received, taken, now) == 0.0
    for _ in range(20):  # a flood: 2,000 calls/s received, 1,000 taken up
        received, taken, now = received + 40, taken + 20, now + TICK_S
        lag = backlog.read(received, taken, now)
    assert lag == pytest.approx(0.2, rel=0.05)  # its own head call's wait (400 waiting), not 430's


def test_a_loop_starved_again_and_again_under_steady_load_is_taken_for_as_far_behind_as_its_calls_wait():
    """Calls keep arriving while the loop is held up again and again (an export in its process): the
    backlog never empties for seconds, yet no call waits longer than one hold."""
    backlog, received, taken, now = Backlog(0, 0.0), 0, 0, 0.0
    worst = 0.0
    for _ in range(8):  # 8 s: 150 calls/s arrive all along
        for _ in range(40):  # held up for 0.8 s: nothing taken up
            received, now = received + 3, now + TICK_S
            worst = max(worst, backlog.read(received, taken, now))
        for _ in range(10):  # 0.2 s of catching up, a few calls always in transit
            received, now = received + 3, now + TICK_S
            taken = received - 5
            worst = max(worst, backlog.read(received, taken, now))
    assert worst <= 0.8 + 3 * TICK_S  # one hold (to a reading or two), not the 8 s the backlog was never empty


def test_a_loop_held_up_for_a_moment_is_not_taken_for_a_loop_seconds_behind():
    """While the loop is held up (another process has the CPU) it takes nothing up: a pace near zero."""
    backlog, received, taken, now = Backlog(0, 0.0), 0, 0, 0.0
    for _ in range(50):  # calm: 150 calls/s, taken up as they come
        received, now = received + 3, now + TICK_S
        taken = received
        assert backlog.read(received, taken, now) == 0.0
    held_from = now
    for _ in range(50):  # held up for a second: calls keep coming, the loop takes up none
        received, now = received + 3, now + TICK_S
        lag = backlog.read(received, taken, now)
    assert 0 < lag <= now - held_from  # no call has waited longer than that
    door, _ = measured(target_s=0.0, items_per_s=1000)
    door.lag_s = lag
    with door.admit(1, timeout_s=10.0):  # a 10 s deadline is met: the 150 waiting calls take the loop 0.15 s
        pass


def test_a_call_into_an_idle_server_is_admitted_whatever_its_deadline_unless_it_has_passed():
    door, _ = measured(target_s=0.0, items_per_s=10)  # a slow server: 100 ms an item
    with door.admit(1, timeout_s=0.001):  # nothing ahead of it: this is its best chance
        pass
    with pytest.raises(DeadlineExceededError, match="deadline passed before it could start"):
        with door.admit(1, timeout_s=0.0):
            pass


def test_a_lone_calls_time_is_measured_and_calls_amid_others_do_not_change_it():
    clock = Clock()
    door = Admission(clock=clock)
    with door.admit(1):
        clock.now += 0.004
    assert door.service_s == pytest.approx(0.004)
    with door.admit(1):
        clock.now += 0.001
        with door.admit(1):  # not lone: its time says nothing of a lone call's
            clock.now += 1.0
    assert door.service_s == pytest.approx(0.7 * 0.004 + 0.3 * 1.001)


def _flood(target: str, n: int, side: int = SLOW, callers: int = 32) -> list[tuple[str, float, tuple]]:
    """``n`` one-item calls, ``callers`` at a time, without retries: (code, seconds, trailing metadata) of each."""
    channel = grpc.insecure_channel(target, options=[("grpc.enable_retries", 0)])
    stub = pb_grpc.FusionServiceStub(channel)
    png = _png(side)

    def call(_: int) -> tuple[str, float, tuple]:
        started = time.perf_counter()
        try:
            stub.Classify(pb.ClassifyRequest(items=[pb.Item(image=png, text="a red square")]))
            return "OK", time.perf_counter() - started, ()
        except grpc.RpcError as e:
            return e.code().name, time.perf_counter() - started, tuple(e.trailing_metadata() or ())

    with concurrent.futures.ThreadPoolExecutor(callers) as pool:
        return list(pool.map(call, range(n)))


def _png(side: int = 32) -> bytes:
    import numpy as np

    from fusionserve.preprocess import encode_png

    return encode_png(np.full((side, side, 3), 200, np.uint8))



def test_a_saturated_server_refuses_with_pushback_and_stays_healthy(repository):
    # The queue-delay rule on (50 ms). Batches of one item, and images that take tens of ms each to
    # decode: 32 callers make a queue of about half a second (the cache off: every call decodes).
    with RunningServer(repository, max_batch_size=1, embedding_cache_mb=0, queue_delay_target_ms=50) as srv:
        _flood(srv.target, 32)  # the door measures the capacity
        shed_before = _shed(srv)
        health = health_pb2_grpc.HealthStub(srv.channel())
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            statuses = pool.submit(lambda: [health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                                            for _ in range(20)])  # fmt: skip
            results = _flood(srv.target, 320)
        assert set(statuses.result()) == {health_pb2.HealthCheckResponse.SERVING}
        codes = [code for code, _, _ in results]
        assert codes.count("OK") > 0 and codes.count("RESOURCE_EXHAUSTED") > 0, codes
        assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}
        for code, _, trailer in results:
            if code == "RESOURCE_EXHAUSTED":
                pushback = dict(trailer)["grpc-retry-pushback-ms"]
                assert 1 <= int(pushback) <= MAX_PUSHBACK_S * 1000
        assert _shed(srv) - shed_before == codes.count("RESOURCE_EXHAUSTED")


def _shed(srv: RunningServer, reason: str = "queue_delay") -> float:
    value = srv.server.metrics.registry.get_sample_value("fusionserve_shed_requests_total", {"reason": reason})
    return value or 0.0


def test_a_stream_under_overload_gets_in_band_refusals_and_lives_on(repository):
    # The queue-delay rule on; batches of one item, slow images, 64 requests of one stream in flight.
    with RunningServer(repository, max_batch_size=1, max_stream_inflight=64, embedding_cache_mb=0,
                       queue_delay_target_ms=50) as srv:  # fmt: skip
        _flood(srv.target, 32)
        stub = pb_grpc.FusionServiceStub(srv.channel())
        item = pb.Item(image=_png(SLOW), text="a red square")
        requests = [pb.ClassifyRequest(request_id=str(i), items=[item]) for i in range(400)]
        answers = list(stub.ClassifyStream(iter(requests), timeout=60))
        assert sorted(a.request_id for a in answers) == sorted(r.request_id for r in requests)
        refused = [a for a in answers if a.error.code == "RESOURCE_EXHAUSTED"]
        served = [a for a in answers if not a.error.code]
        assert refused and served, [a.error.code for a in answers][:20]
        assert all("server overloaded" in a.error.message for a in refused)
        # The stream lived on: answers after the first refusal were served too.
        first = answers.index(refused[0])
        assert any(not a.error.code for a in answers[first + 1 :])


class Refusing(pb_grpc.FusionServiceServicer):
    """Refuses the first ``refusals`` calls with a pushback, then answers; records when calls came."""

    def __init__(self, refusals: int, pushback_ms: int) -> None:
        self.refusals, self.pushback_ms = refusals, pushback_ms
        self.arrivals: list[float] = []

    async def Classify(self, request, context):
        self.arrivals.append(time.monotonic())
        if len(self.arrivals) <= self.refusals:
            context.set_trailing_metadata((("grpc-retry-pushback-ms", str(self.pushback_ms)),))
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "server overloaded")
        return pb.ClassifyResponse(results=[pb.Result(label="match", label_index=1, probabilities=[0.2, 0.8])],
                                   labels=["mismatch", "match"])  # fmt: skip


@pytest.mark.parametrize("refusals, answered", [(2, True), (10, False)])
def test_the_client_waits_for_the_pushback_and_retries_at_most_four_times(refusals, answered):
    servicer = Refusing(refusals, pushback_ms=200)
    server = ServicerServer(servicer)
    try:
        with FusionClient(server.target, timeout_s=10, health_check=False) as client:
            if answered:
                assert client.classify(_png(), "a red square").label == "match"
            else:
                with pytest.raises(Exception, match="RESOURCE_EXHAUSTED"):
                    client.classify(_png(), "a red square")
    finally:
        server.stop()
    gaps = [b - a for a, b in zip(servicer.arrivals, servicer.arrivals[1:], strict=False)]
    assert len(servicer.arrivals) == (refusals + 1 if answered else 5)  # gRPC's cap: 5 attempts
    assert all(gap >= 0.18 for gap in gaps), gaps  # waited for the server's 200 ms, not its own 0.1 s backoff


def test_a_request_over_the_message_limit_fails_at_once_in_the_client():
    servicer = Refusing(0, pushback_ms=0)
    server = ServicerServer(servicer)
    try:
        with FusionClient(server.target, timeout_s=10, health_check=False,
                          max_message_bytes=10_000) as client:  # fmt: skip
            started = time.monotonic()
            with pytest.raises(Exception, match="INVALID_ARGUMENT.*over the 10000 byte message limit"):
                client.classify(_png(), "x" * 20_000)
            assert time.monotonic() - started < 0.5  # not retried as a RESOURCE_EXHAUSTED would be
    finally:
        server.stop()
    assert servicer.arrivals == []


def test_calls_that_arrive_while_the_loop_stands_still_wait_and_are_all_answered(repository):
    # The defaults: 256 callers send while the event loop stands still for a second; gRPC holds their
    # calls until the loop takes them up, and every one is answered (never CANCELLED, never refused).
    with RunningServer(repository) as srv:
        blocked = threading.Event()
        srv.loop.call_soon_threadsafe(lambda: (blocked.set(), time.sleep(1.0)))
        blocked.wait()
        results = _flood(srv.target, 512, 32, callers=256)
    assert [code for code, _, _ in results] == ["OK"] * 512


def test_calls_grpc_sheds_from_its_accept_queue_are_counted(repository):
    # A short accept queue (the default is far longer): the event loop stands still while 40 calls
    # arrive; gRPC holds 8 and sheds the rest (CANCELLED, gRPC's code, which is why the default is
    # long) before any code of ours sees them; its own count of calls received still has them all.
    with RunningServer(repository, max_pending_rpcs=8) as srv:
        def received() -> float:
            value = srv.server.metrics.registry.get_sample_value("fusionserve_grpc_calls_received")
            assert value is not None, "the server did not find its channelz id"
            return value

        before = received()
        blocked = threading.Event()
        srv.loop.call_soon_threadsafe(lambda: (blocked.set(), time.sleep(1.5)))
        blocked.wait()
        results = _flood(srv.target, 40, 32)
        codes = [code for code, _, _ in results]
        assert codes.count("CANCELLED") >= 30 and set(codes) <= {"OK", "CANCELLED"}, codes
        assert received() - before == 40
        # The shed calls never reach the loop: they must not count as calls waiting for it, for ever.
        time.sleep(0.5)  # the loop's readings see the burst, then see it stand still
        for _ in range(20):  # a second
            assert srv.server.core.admission.lag_s == 0, f"a lag of {srv.server.core.admission.lag_s:.1f} s"
            time.sleep(0.05)
