"""Hold under pressure: a real server whose KV pool is a few MiB, far below what the load wants,
under waves of concurrent streamed completions that share one long system prompt with
different questions and output lengths (the ordinary day of a kiosk). Every request finishes,
with the tokens it gets alone; /health stays 200 throughout; a second wave works as well as the
first; the pool ends free. The first cut died here: waiting sequences pinned cached prefix
blocks until a lone running sequence could not get one, and the engine loop raised."""

from __future__ import annotations

import asyncio
import random
import time

import httpx

from tests.test_server import ServerProcess, metric, metric_samples, read_sse

SYSTEM = ("You are the voice of a ticket machine at a railway station. Answer in one short "
          "sentence, name the platform when you know it, and never invent a train.")
QUESTIONS = ["When is the next train to Leeds?", "Where can I buy a ticket?", "Is the café open?",
             "Which platform for York?", "Can I bring a bicycle?", "How do I get a refund?",
             "Is there step-free access?", "What time is it?", "Where are the toilets?",
             "Is the 9:15 delayed?", "Do you take cash?", "Where is the taxi rank?"]


def _stream_body(prompt: list[int], max_tokens: int) -> dict:
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}


async def _wave(sock: str, bodies: list[dict]) -> tuple[list[dict], list[int]]:
    """All streams at once, /health polled meanwhile; returns each stream's text and finish
    reason, and every /health status seen."""
    transport = httpx.AsyncHTTPTransport(uds=sock, limits=httpx.Limits(max_connections=200))
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost",
                                 timeout=600) as c:
        done = asyncio.Event()
        health: list[int] = []

        async def poll() -> None:
            while not done.is_set():
                health.append((await c.get("/health")).status_code)
                await asyncio.sleep(0.2)

        async def one(body: dict) -> dict:
            async with c.stream("POST", "/v1/completions", json=body) as resp:
                assert resp.status_code == 200, await resp.aread()
                events = await read_sse(resp)
            errors = [e["error"] for e in events if "error" in e]
            assert not errors, f"the stream ended with an error: {errors}"
            assert events[-1] == {"done": True}, events[-3:]
            text = "".join(ch["text"] for e in events[:-1] for ch in e["choices"])
            finish = [ch["finish_reason"] for e in events[:-1] for ch in e["choices"]
                      if ch["finish_reason"]]
            return {"text": text, "finish_reason": finish[-1] if finish else None}

        poller = asyncio.create_task(poll())
        try:
            outs = await asyncio.gather(*(one(b) for b in bodies))
        finally:
            done.set()
            await poller
    return outs, health


def test_small_pool_shared_system_prompt_waves(smollm2_bundle, tmp_path):
    # 6.5 MiB of fp32 KV: 8 usable blocks of 16 tokens, while each wave wants 24 sequences of up
    # to ~110 tokens at once: requests wait, running ones are preempted and recomputed. (The
    # first cut's engine died on this within ~40 steps.)
    sock = tmp_path / "p.sock"
    srv = ServerProcess(smollm2_bundle.path, sock, "--kv-memory", "6.5MiB", "--block-size", "16",
                        "--max-num-seqs", "16", "--max-num-batched-tokens", "64")
    try:
        srv.wait_healthy()
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)),
                          base_url="http://localhost", timeout=600) as http:
            system = http.post("/v1/tokenize", json={"prompt": SYSTEM}).json()["tokens"]
            assert len(system) > 32, "the shared prefix should span blocks"
            rng = random.Random(8)

            def bodies(n: int, salt: int) -> list[dict]:
                out = []
                for i in range(n):
                    q = http.post("/v1/tokenize", json={
                        "prompt": f" Passenger {salt + i}: {QUESTIONS[i % len(QUESTIONS)]}",
                        "add_special_tokens": False}).json()["tokens"]
                    out.append(_stream_body(system + q, rng.randint(3, 60)))
                return out

            first, second = bodies(24, 0), bodies(24, 100)
            # References, one at a time on the idle server: what each request gets alone.
            refs = {}
            for i in (0, 7, 19):
                r = http.post("/v1/completions", json={**first[i], "stream": False}).json()
                refs[i] = r["choices"][0]["text"]
            t0 = time.monotonic()
            outs, health = asyncio.run(_wave(str(sock), first))
            t1 = time.monotonic()
            outs2, health2 = asyncio.run(_wave(str(sock), second))
            t2 = time.monotonic()
            print(f"waves of 24 on an 8-block pool: {t1 - t0:.1f} s and {t2 - t1:.1f} s")
            for out in outs + outs2:
                assert out["finish_reason"] == "length", out
            for i, want in refs.items():
                assert outs[i]["text"] == want, (i, outs[i]["text"], want)
            assert set(health + health2) == {200}, (health, health2)
            m = metric_samples(http.get("/metrics").text)
            assert metric(m, "edgert_preemptions_total") > 0, "the pool should have run short"
            assert metric(m, "edgert_prefix_cache_hits_total") > 0, "the prompt should be shared"
            assert metric(m, "edgert_requests_total", finish_reason="length") >= 48
            assert metric(m, "edgert_kv_blocks", state="used") == 0
            assert metric(m, "edgert_engine_alive") == 1
            assert http.get("/health").json()["status"] == "ok"
    finally:
        code = srv.stop()
    assert code == 0, srv.log[-3000:]
    assert "Traceback" not in srv.log, srv.log[-3000:]
