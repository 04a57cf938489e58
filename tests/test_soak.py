"""Soak: many chats through gradio_client against a fresh `python app.py` on the default model
(CPU), the way a shared Space with a password is used (issue 6).

200 sequential chats and 20 concurrent ones must all complete; the server's resident memory
(VmRSS of the app's own process) must grow by less than 10% from after the warm-up to the end;
its log must hold no traceback or logged exception. Replies are kept short (MAX_NEW_TOKENS) so
the whole module runs in about two minutes on two cores; the figures are printed (pytest -s)
for the issue's closing note.

The server is this module's own, not the session's shared one: its memory figures then count
only this traffic.
"""

from __future__ import annotations

import statistics
import threading
import time

import pytest
from conftest import AppServer, running_app
from gradio_client import Client
from gradio_client.exceptions import AuthenticationError

pytestmark = pytest.mark.slow

SEQUENTIAL = 200
CONCURRENT = 20
WARM_UP = 20  # sequential chats plus one concurrent burst before the first memory reading
MAX_NEW_TOKENS = 6
RSS_GROWTH_LIMIT = 0.10
CHAT_TIMEOUT_S = 120  # one chat; a hang fails the test instead of stalling it
CREDENTIALS = ("soak", "not-a-real-password")
TOPICS = ("the sea", "Paris", "prime numbers", "a red fox", "Jupiter", "bread", "rain", "chess")


@pytest.fixture(scope="module")
def soak_server(tmp_path_factory) -> AppServer:
    flags = ["--max-seq-len", "512", "--queue-size", "64", "--auth", ":".join(CREDENTIALS)]
    with running_app(tmp_path_factory.mktemp("soak"), *flags) as server:
        yield server


def client_for(server: AppServer) -> Client:
    return Client(server.url, auth=CREDENTIALS, verbose=False)


def chat(client: Client, i: int) -> dict:
    """Chat number i: varied messages, every third with a history, sampled with a seed."""
    topic = TOPICS[i % len(TOPICS)]
    history = []
    if i % 3 == 0:
        history = [
            {"role": "user", "content": f"Tell me about {TOPICS[(i + 1) % len(TOPICS)]}."},
            {"role": "assistant", "content": "Gladly. What would you like to know?"},
        ]
    job = client.submit(
        f"In one sentence, what is special about {topic}? (#{i})",
        history,
        max_new_tokens=MAX_NEW_TOKENS,
        temperature=0.7,
        seed=i,
        api_name="/chat",
    )
    reply, stats = job.result(timeout=CHAT_TIMEOUT_S)
    assert stats["stop_reason"] in ("length", "eos"), stats
    assert 1 <= stats["new_tokens"] <= MAX_NEW_TOKENS and (reply or stats["stop_reason"] == "eos")
    return stats


def concurrent_chats(clients: list[Client], first: int) -> tuple[list[dict], float]:
    """One chat per client, all started together; (their stats, seconds until the last ended)."""
    results: list[dict | BaseException] = [None] * len(clients)
    start_together = threading.Barrier(len(clients))

    def run(k: int) -> None:
        start_together.wait()
        try:
            results[k] = chat(clients[k], first + k)
        except BaseException as err:  # reported below, with the others
            results[k] = err

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(clients))]
    start = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=CHAT_TIMEOUT_S * 2)
    elapsed = time.monotonic() - start
    failures = [r for r in results if not isinstance(r, dict)]
    assert not failures, f"{len(failures)} of {len(clients)} concurrent chats failed: {failures[:3]}"
    return results, elapsed


def test_unauthenticated_clients_are_turned_away(soak_server):
    with pytest.raises(AuthenticationError):
        Client(soak_server.url, verbose=False)


def test_soak_sequential_and_concurrent_chats(soak_server):
    log_start = len(soak_server.log())
    clients = [client_for(soak_server) for _ in range(CONCURRENT)]

    for i in range(WARM_UP):
        chat(clients[0], i)
    concurrent_chats(clients[:8], WARM_UP)
    rss_before = soak_server.rss_bytes()

    start = time.monotonic()
    latencies = []
    for i in range(SEQUENTIAL):
        begin = time.monotonic()
        chat(clients[i // 50], 1000 + i)  # a new session every 50 chats
        latencies.append(time.monotonic() - begin)
    sequential_s = time.monotonic() - start
    stats, concurrent_s = concurrent_chats(clients, 2000)
    rss_after = soak_server.rss_bytes()

    growth = rss_after / rss_before - 1
    new_tokens = sum(s["new_tokens"] for s in stats)
    print(
        f"\nsoak: {SEQUENTIAL} sequential chats in {sequential_s:.1f} s "
        f"({SEQUENTIAL / sequential_s:.2f} requests/s, median {statistics.median(latencies) * 1000:.0f} ms, "
        f"max {max(latencies) * 1000:.0f} ms)"
        f"\nsoak: {CONCURRENT} concurrent chats in {concurrent_s:.1f} s "
        f"({CONCURRENT / concurrent_s:.2f} requests/s, {new_tokens / concurrent_s:.1f} tokens/s aggregate)"
        f"\nsoak: server RSS after warm-up {rss_before / 2**20:.0f} MiB, "
        f"after {SEQUENTIAL + CONCURRENT} more chats {rss_after / 2**20:.0f} MiB ({growth:+.1%})"
    )
    assert growth < RSS_GROWTH_LIMIT, f"resident memory grew by {growth:.1%}"
    log = soak_server.log()[log_start:]
    for sign in ("Traceback", "Exception", " ERROR "):
        assert sign not in log, f"the server logged {sign!r}:\n{log[log.index(sign) - 500 :][:3000]}"
    assert log.count("api: ") >= WARM_UP + 8 + SEQUENTIAL + CONCURRENT, "every chat is logged as done"
