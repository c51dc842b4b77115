"""Faults against real ``fusionserve serve`` processes on loopback: overload, SIGTERM under load, kill -9.

Each test prints one ``faults:`` line with its figures (``pytest -s`` shows them; docs/RELIABILITY.md
quotes them). Their long-running counterpart is ``bench/soak.py`` (sustained load for minutes).
"""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fusionserve.client import FusionClient
from fusionserve.client.loadgen import LoadSettings, run_load
from fusionserve.v1 import fusion_pb2 as pb
from fusionserve.v1 import fusion_pb2_grpc as pb_grpc
from tests.processes import OK_STREAM, ServerProcess, classify_lanes, start_all, wait_until, write_config

CLASSIFY = "/fusionserve.v1.FusionService/Classify"
OVERLOAD_FACTOR = 4.0
# Overload settings, lower than the defaults so the bounds are crisp: at most PENDING calls wait in
# gRPC's accept queue and PIPELINE items are admitted, so at most PENDING + PIPELINE one-item calls
# are ahead of any admitted call.
PENDING, PIPELINE = 32, 32


def admitted_p99_bound_s(capacity: float) -> float:
    """At most PENDING + PIPELINE = 64 calls are ahead of an admitted call: 64 / capacity seconds of
    queueing (about 0.1 s at the 500 to 800 req/s measured here). Ten times that, kept between 0.5 s
    (scheduling noise on 2 shared cores) and 2 s. With gRPC's own accept queue (up to 3000 calls,
    the behaviour before max_pending_rpcs) the p99 was 3.5 to 7.6 s here."""
    return min(2.0, max(0.5, 10 * (PENDING + PIPELINE) / capacity))


REJECTED_P99_S = 0.25
"""Shedding happens before any work (gRPC's accept queue is full, or admission refuses before
decoding): a few ms at p50, tens of ms at p99 on a quiet machine."""
RSS_SHARE_OF_UNBOUNDED = 0.25
"""Every queue is bounded (PENDING + PIPELINE calls), so a server shedding N calls grows by far less
than holding them would take (N × the request's bytes): a quarter of that at most. Measured here:
5 to 30 MiB of growth (allocator arenas and gRPC buffers) while shedding 16,000 to 22,000 calls of
about 9 KB (140 to 200 MiB if they had been queued)."""


def _request(sample: tuple[bytes, str], request_id: str = "") -> pb.ClassifyRequest:
    return pb.ClassifyRequest(items=[pb.Item(image=sample[0], text=sample[1])], request_id=request_id)


def _health(target: str) -> int:
    with grpc.insecure_channel(target) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status


def _requests_seen(srv: ServerProcess) -> dict[str, float]:
    """The server's own count of Classify calls it ran, by status code."""
    return {code: srv.metric(f'fusionserve_requests_total{{api="typed",code="{code}",model="multimodal"}}')
            for code in ("OK", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "CANCELLED", "UNAVAILABLE",
                         "INTERNAL")}  # fmt: skip


# ---- overload ---------------------------------------------------------------------------------------
def _overload(srv: ServerProcess, samples) -> dict:
    """Measure the capacity (closed loop), then offer OVERLOAD_FACTOR times it (open loop) for 3 s."""
    target = [srv.target]
    closed = LoadSettings(target, concurrency=16, duration_s=1.0, warmup_s=0.5, progress=False)
    capacity = asyncio.run(run_load(closed, samples[:64])).results["requests_per_s"]
    assert capacity > 20, capacity
    rss_before, seen_before = srv.rss_mb(), _requests_seen(srv)
    rate = OVERLOAD_FACTOR * capacity
    open_loop = LoadSettings(target, rate=rate, duration_s=3.0, warmup_s=0, timeout_s=10, progress=False)
    report = asyncio.run(run_load(open_loop, samples[:64]))
    rss_after, seen = srv.rss_mb(), _requests_seen(srv)
    latency_s, ok = report.samples["latency_s"], report.samples["ok"]
    return {
        "capacity": capacity, "report": report, "rss": (rss_before, rss_after),
        "seen": {code: seen[code] - seen_before[code] for code in seen},
        "admitted": np.sort(latency_s[ok]), "rejected": np.sort(latency_s[~ok]),
    }  # fmt: skip


@pytest.mark.slow
def test_overload_sheds_the_excess_fast_and_keeps_admitted_latency_bounded(repository, samples, tmp_path):
    # The embedding cache off: 64 repeated samples would all be cache hits, and a capacity past what
    # one load-generator process can offer 4 times over would measure the generator, not the server.
    config = write_config(tmp_path / "overload.json", max_pending_rpcs=PENDING, max_pipeline_items=PIPELINE,
                          max_queue_size=64, embedding_cache_mb=0)  # fmt: skip
    with ServerProcess(repository, metrics_port=0, config=config) as srv:
        runs = []
        for attempt in (1, 2):
            run = _overload(srv, samples)
            results, admitted, rejected = run["report"].results, run["admitted"], run["rejected"]
            errors, seen = results["errors"], run["seen"]
            assert set(errors) <= {"RESOURCE_EXHAUSTED", "CANCELLED", "DEADLINE_EXCEEDED"}, errors
            assert len(admitted) > run["capacity"]  # it kept serving through the overload (3 s of it)
            assert len(rejected) > len(admitted)  # 4x the capacity: most of it had to be shed
            # CANCELLED is gRPC's own shedding at a full accept queue: those calls never reached the
            # server's code, which ran exactly the OK and RESOURCE_EXHAUSTED calls the client saw.
            assert seen["OK"] == results["ok"]
            assert seen["RESOURCE_EXHAUSTED"] == errors.get("RESOURCE_EXHAUSTED", 0)
            assert seen["DEADLINE_EXCEEDED"] == seen["CANCELLED"] == seen["UNAVAILABLE"] == seen["INTERNAL"] == 0
            rss_before, rss_after = run["rss"]
            bound_s = admitted_p99_bound_s(run["capacity"])
            admitted_p99, rejected_p99 = np.percentile(admitted, 99), np.percentile(rejected, 99)
            line = (
                f"run {attempt}: overload {OVERLOAD_FACTOR:g}x of {run['capacity']:.0f} req/s for 3 s: "
                f"{results['ok']} OK, errors {errors}; admitted p50 {np.percentile(admitted, 50) * 1e3:.0f} ms "
                f"p99 {admitted_p99 * 1e3:.0f} ms (bound {bound_s * 1e3:.0f}); rejected p50 "
                f"{np.percentile(rejected, 50) * 1e3:.1f} ms p99 {rejected_p99 * 1e3:.1f} ms "
                f"(bound {REJECTED_P99_S * 1e3:.0f}); RSS {rss_before:.0f} -> {rss_after:.0f} MiB"
            )
            print(f"\nfaults: {line}")
            runs.append((admitted_p99 < bound_s and rejected_p99 < REJECTED_P99_S, line, run))
        # Latency bounds hold in the better of the two runs: a neighbour that takes the CPU for a
        # second inflates every figure on 2 cores, whereas an unbounded queue fails every run.
        if not any(ok for ok, _, _ in runs):
            pytest.fail("latency bounds missed in both runs: " + " | ".join(line for _, line, _ in runs))
        request_mb = len(_request(samples[0]).SerializeToString()) / 2**20
        for _, line, run in runs:
            rss_before, rss_after = run["rss"]
            held_if_unbounded_mb = len(run["rejected"]) * request_mb
            assert rss_after - rss_before < RSS_SHARE_OF_UNBOUNDED * held_if_unbounded_mb, (
                f"the server grew by more than a quarter of the {held_if_unbounded_mb:.0f} MiB it shed: {line}")

        assert _health(srv.target) == health_pb2.HealthCheckResponse.SERVING
        with grpc.insecure_channel(srv.target) as channel:
            reply = pb_grpc.FusionServiceStub(channel).Classify(_request(samples[0]), timeout=10)
        assert reply.results[0].label in ("match", "mismatch")


# ---- SIGTERM under load -----------------------------------------------------------------------------
async def _unary_worker(call, samples, lane: int, outcomes: list[tuple[float, str]], stop: asyncio.Event | None):
    """Closed loop; stops at its first refusal, or (``stop`` given) keeps going until ``stop`` is set."""
    n = lane
    while stop is None or not stop.is_set():
        sent = time.monotonic()
        try:
            await call(_request(samples[n % 64]), timeout=10)
            outcomes.append((sent, "OK"))
        except grpc.aio.AioRpcError as e:
            outcomes.append((sent, e.code().name))
            if stop is None:
                return
            await asyncio.sleep(0.01)  # the server is going: do not spin
        n += 8


async def _stream_worker(channel, samples, window: int) -> tuple[list[str], dict[str, str], str]:
    """One stream, ``window`` requests in flight, until the server refuses one in-band."""
    call = pb_grpc.FusionServiceStub(channel).ClassifyStream(timeout=30)
    sent: list[str] = []
    answers: dict[str, str] = {}
    slots = asyncio.Semaphore(window)
    refused = asyncio.Event()

    async def write() -> None:
        n = 0
        while not refused.is_set():
            await slots.acquire()
            if refused.is_set():
                break
            sent.append(str(n))
            await call.write(_request(samples[n % 64], str(n)))
            n += 1
        await call.done_writing()

    writer = asyncio.get_running_loop().create_task(write())
    async for response in call:
        code = response.error.code if response.HasField("error") else "OK"
        answers[response.request_id] = "TWICE" if response.request_id in answers else code
        if code != "OK":
            refused.set()
        slots.release()
    await writer
    return sent, answers, (await call.code()).name


@pytest.mark.slow
def test_sigterm_under_load_answers_every_request_and_exits_zero(repository, samples):
    grace_s, drain_delay_s = 8.0, 0.5  # drain_delay_s: the server's default

    async def scenario(srv: ServerProcess):
        polite: list[list[tuple[float, str]]] = [[] for _ in range(3)]
        persistent: list[tuple[float, str]] = []
        stop = asyncio.Event()
        separate = [("grpc.use_local_subchannel_pool", 1)]
        async with grpc.aio.insecure_channel(srv.target) as unary, \
                grpc.aio.insecure_channel(srv.target, options=separate) as streaming:  # fmt: skip
            call = unary.unary_unary(CLASSIFY, pb.ClassifyRequest.SerializeToString, pb.ClassifyResponse.FromString)
            workers = [asyncio.create_task(_unary_worker(call, samples, lane, polite[lane], None)) for lane in range(3)]
            workers.append(asyncio.create_task(_unary_worker(call, samples, 3, persistent, stop)))
            stream = asyncio.create_task(_stream_worker(streaming, samples, window=8))
            await asyncio.sleep(1.0)
            srv.terminate()
            signalled = time.monotonic()
            while srv.proc.poll() is None and time.monotonic() - signalled < grace_s + 10:
                await asyncio.sleep(0.02)
            exited_after_s = time.monotonic() - signalled
            stop.set()
            await asyncio.gather(*workers)
            return polite, persistent, await stream, signalled, exited_after_s

    with ServerProcess(repository, "--shutdown-grace-s", str(grace_s)) as srv:
        polite, persistent, (sent, answers, stream_status), signalled, exited_after_s = asyncio.run(scenario(srv))
    assert srv.proc.returncode == 0
    assert exited_after_s < grace_s

    # Clients that stop at their first refusal (as a health-checking client moves away): every call
    # they sent was answered OK or refused with UNAVAILABLE; the calls in flight at the signal finished.
    for outcomes in polite:
        codes = [code for _, code in outcomes]
        assert codes[-1] == "UNAVAILABLE" and set(codes[:-1]) == {"OK"}, codes
    # The stream: every request answered once (OK, or in-band UNAVAILABLE once draining began).
    assert stream_status == "OK"  # ended by the client, not broken by the server
    assert sorted(answers, key=int) == sent  # none lost
    stream_codes = {code: list(answers.values()).count(code) for code in set(answers.values())}
    assert set(stream_codes) <= {"OK", "UNAVAILABLE"} and stream_codes.get("OK", 0) > 0, stream_codes
    # A client that keeps sending through the end of the drain delay, when gRPC itself stops: calls it
    # sends in that instant can be reset by gRPC before the server sees them (CANCELLED, which the
    # client library retries). Nothing sent before that instant gets anything but OK or UNAVAILABLE.
    codes = {code: sum(c == code for _, c in persistent) for code in {c for _, c in persistent}}
    assert set(codes) <= {"OK", "UNAVAILABLE", "CANCELLED"}, codes
    assert all(sent_at >= signalled + drain_delay_s / 2 for sent_at, code in persistent if code == "CANCELLED")
    polite_codes = [code for outcomes in polite for _, code in outcomes]
    print(
        f"\nfaults: SIGTERM under load: polite unary {polite_codes.count('OK')} OK + "
        f"{polite_codes.count('UNAVAILABLE')} UNAVAILABLE, persistent unary {codes}, "
        f"stream {len(sent)} sent, answers {stream_codes}; "
        f"exit 0 after {exited_after_s:.2f} s (grace {grace_s:g} s)"
    )


# ---- two replicas, kill -9 one under load -----------------------------------------------------------
@pytest.mark.slow
def test_kill_9_of_one_of_two_replicas_loses_no_call_and_no_stream_item(repository, samples):
    replicas = start_all(repository, 2, metrics_ports=[0, 0])
    stop = threading.Event()
    answered: list[float] = []  # completion times of unary calls
    failures: list[BaseException] = []
    stream_items = 1500
    seen: list[int] = []
    killed: list[tuple[ServerProcess, float]] = []
    try:
        with FusionClient([r.target for r in replicas], timeout_s=20) as client:

            threads = classify_lanes(client, samples[:64], 3, stop, answered, failures)
            items = (samples[i % 64] for i in range(stream_items))
            for result in client.classify_stream(items, window=8):
                assert result.ok, result.error
                seen.append(result.index)
                if len(seen) == stream_items // 3:
                    # kill -9 the replica that carries the stream: no drain, no goodbye
                    victim = max(replicas, key=lambda r: r.metric(OK_STREAM))
                    victim.kill()
                    killed.append((victim, time.monotonic()))
            wait_until(lambda: sum(t > killed[0][1] for t in answered) >= 20, 10)
            stop.set()
            for t in threads:
                t.join(30)
            victim = killed[0][0]
            survivor = next(r for r in replicas if r is not victim)
            resumed = survivor.metric(OK_STREAM)  # stream requests the survivor answered
    finally:
        stop.set()
        for r in replicas:
            r.close()
    killed_at = killed[0][1]
    assert not failures, failures[:3]
    assert sorted(seen) == list(range(stream_items))  # every item exactly once: nothing lost, nothing twice
    assert resumed > 0  # the stream went on on the survivor
    after = sum(t > killed_at for t in answered)
    assert after >= 20  # unary calls went on, on the survivor
    assert victim.proc.returncode == -9 and survivor.proc.returncode == 0
    print(
        f"\nfaults: kill -9 of 1 of 2 replicas: {len(answered)} unary calls OK ({after} after the kill), "
        f"stream of {stream_items} items: each once ({resumed:.0f} answered by the survivor); no failure"
    )

