"""The browser client (clients/browser/) in headless Chromium, against a real server.

Playwright drives Debian's Chromium (never a browser of its own). The page is loaded from the
server, as a person would load it; it speaks with its WebSocket, decodes (Opus through
WebCodecs' AudioDecoder where Chromium has it, PCM otherwise) and plays through an AudioWorklet.
Chromium runs headless with a fake audio output, so the assertions read the page's test hook,
``window.seTest``: what was decoded, what was handed to the worklet and in which order, what the
worklet reported playing, and what the page shows.
"""

import asyncio
import json
import os
import re
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(180)]

PARAGRAPH = "Hello there, friend. The weather is fine today! Shall we go out for a walk?"
LONGER = (
    "Good evening to all of you. It has been a long day at the office. "
    "The trains were late again this morning. Tomorrow should be better. "
    "Let us hope the weather holds."
)
CHROMIUM_ARGS = [
    "--autoplay-policy=no-user-gesture-required",
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
    "--no-sandbox",  # root in a container
    "--disable-gpu",
]


def chromium_path() -> str | None:
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and (found := shutil.which(name)):
            return found
    return None


@asynccontextmanager
async def browser_page(srv, query: str = "") -> AsyncIterator[tuple[Any, list[str]]]:
    """A headless Chromium page showing the server's client; also the page's errors."""
    executable = chromium_path()
    if executable is None:
        pytest.skip("no chromium: apt-get install chromium (scripts/test.sh does)")
    async_api = pytest.importorskip("playwright.async_api")
    errors: list[str] = []
    async with async_api.async_playwright() as p:
        browser = await p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1000, "height": 900})
            page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
            page.on(
                "console",
                lambda msg: errors.append(f"console: {msg.text}") if msg.type == "error" else None,
            )
            await page.goto(f"http://127.0.0.1:{srv.port}/{query}")
            yield page, errors
        finally:
            await browser.close()


async def until(page, expression: str, timeout: float = 30.0) -> Any:
    """Poll a JavaScript expression until it is truthy (page.evaluate is not subject to the
    page's Content-Security-Policy, which forbids eval)."""
    deadline = time.monotonic() + timeout
    while True:
        value = await page.evaluate(expression)
        if value:
            return value
        if time.monotonic() > deadline:
            state = await page.evaluate("JSON.stringify(window.seTest)")
            raise AssertionError(f"timed out waiting for {expression!r}; seTest = {state}")
        await asyncio.sleep(0.05)


async def se_test(page) -> dict[str, Any]:
    return json.loads(await page.evaluate("JSON.stringify(window.seTest)"))


def cancelled_streams(srv) -> float:
    return srv.service.metrics.value("stream_engine_streams_total", outcome="cancelled")


async def test_speak_then_stop_in_headless_chromium(make_server, tmp_path):
    srv = await make_server()
    async with browser_page(srv) as (page, errors):
        await until(page, "window.seTest && window.seTest.connection === 'open'")
        hook = await se_test(page)
        assert hook["state"] == "idle"
        voices = await page.eval_on_selector_all("#voice option", "os => os.map(o => o.value)")
        assert "v2/en_speaker_6" in voices
        print(f"\nchromium: WebCodecs Opus supported: {hook['opusSupported']} {hook['opusReason']}")
        format = "opus" if hook["opusSupported"] else "pcm_s16le"

        # 1. the whole paragraph at once, to the end, with early audio (previews)
        await page.fill("#text", PARAGRAPH)
        await page.select_option("#format", format)
        await page.select_option("#voice", "v2/en_speaker_6")
        await page.check("#early-audio")
        started = time.monotonic()
        await page.click("#speak")
        await until(page, "window.seTest.state === 'done'", timeout=60)
        run1 = time.monotonic() - started
        hook = await se_test(page)
        assert hook["terminal"] == "done" and hook["player"] == "worklet"
        assert hook["format"] == format and hook["sampleRate"] == 24_000
        assert hook["codec"] == ("webcodecs-opus" if format == "opus" else "pcm")
        segments = hook["segments"]
        assert sorted(segments, key=int) == ["0", "1", "2"]
        assert " ".join(segments[i] for i in ("0", "1", "2")) == PARAGRAPH
        # decoded and scheduled, in order, not silent, all of it
        assert hook["scheduledSegments"] == [0, 1, 2]
        assert hook["playedSegments"] == [0, 1, 2]  # the worklet played them, in order
        assert all(hook["decodedFrames"][i] > 10 for i in ("0", "1", "2"))
        assert hook["maxAbs"] > 0.05 and hook["peakLevel"] > 0.05
        decoded_ms = sum(hook["decodedSamples"].values()) / hook["decodedRate"] * 1000
        assert decoded_ms == pytest.approx(hook["serverAudioMs"], abs=45)
        # what the page shows
        assert hook["ttfaMs"] > 0 and hook["firstSoundMs"] >= hook["ttfaMs"]
        assert re.fullmatch(r"\d+ ms", await page.text_content("#ttfa") or "")
        assert re.fullmatch(r"\d+ ms", await page.text_content("#first-sound") or "")
        assert await page.text_content("#underruns") == str(hook["underruns"])
        assert await page.text_content("#state") == "Done"
        spans = await page.eval_on_selector_all(
            "#transcript .segment", "ss => ss.map(s => [s.dataset.index, s.textContent])"
        )
        assert spans == [[str(i), segments[str(i)]] for i in range(3)]
        assert await page.locator("#transcript .playing").count() == 0
        print(
            f"run 1 ({hook['codec']}): {run1:.1f} s, ttfa {hook['ttfaMs']} ms, first sound "
            f"{hook['firstSoundMs']} ms, underruns {hook['underruns']}, "
            f"audio {hook['serverAudioMs']} ms"
        )
        assert cancelled_streams(srv) == 0
        assert (
            srv.service.metrics.value("stream_engine_previews_total") >= 1
        )  # the first segment came early
        await page.screenshot(path=str(tmp_path / "browser-client-done.png"), full_page=True)

        # 2. streamed word by word as PCM; Stop while it plays
        await page.fill("#text", LONGER)
        await page.select_option("#format", "pcm_s16le")
        await page.check("#stream-words")
        await page.click("#speak")
        await until(page, "window.seTest.playing && window.seTest.playingSegment !== null")
        playing = await page.eval_on_selector(
            "#transcript .playing", "s => [s.dataset.index, s.getAttribute('aria-current')]"
        )
        hook = await se_test(page)
        assert hook["terminal"] is None, "the stream ended before Stop could be pressed"
        assert playing == [str(hook["playingSegment"]), "true"]  # highlighted while it plays
        # a word a message (audio may start before the last words are sent)
        assert 1 < hook["sent"].count("speak") <= len(LONGER.split())
        await page.screenshot(path=str(tmp_path / "browser-client-playing.png"), full_page=True)
        stopped_at = time.monotonic()
        await page.click("#stop")
        await until(page, "window.seTest.state === 'cancelled'", timeout=10)
        hook = await se_test(page)
        assert hook["sent"][-1] == "cancel" and hook["received"][-1] == "cancelled"
        assert hook["cancelled"] and hook["terminal"] == "cancelled"
        assert cancelled_streams(srv) == 1  # the server's word for it
        assert hook["codec"] == "pcm" and hook["scheduledSamples"] > 0
        # silent at once: the worklet dropped its buffer and renders zeros
        await until(page, "window.seTest.silentAfterStopMs !== null")
        silent_after = time.monotonic() - stopped_at
        assert silent_after < 1.0
        scheduled = hook["scheduledSamples"]
        await asyncio.sleep(0.5)
        hook = await se_test(page)
        assert hook["scheduledSamples"] == scheduled and hook["bufferedMs"] == 0
        assert hook["level"] == 0 and not hook["playing"] and hook["state"] == "cancelled"
        assert hook["flushed"] >= 1 and hook["silentAfterStopMs"] < 250
        assert await page.text_content("#state") == "Cancelled"
        assert await page.is_enabled("#speak") and await page.is_disabled("#stop")
        shot = tmp_path / "browser-client-stopped.png"
        await page.screenshot(path=str(shot), full_page=True)
        print(f"run 2 (pcm, words): silent {hook['silentAfterStopMs']} ms after Stop")
        print(f"screenshots: {tmp_path}")
        if target := os.environ.get("STREAM_ENGINE_SCREENSHOTS"):
            Path(target).mkdir(parents=True, exist_ok=True)
            for png in tmp_path.glob("*.png"):
                shutil.copy(png, target)
        assert errors == []


async def test_jitter_buffer_and_players_in_chromium(make_server):
    """The jitter buffer joins chunks without gaps, counts underruns, resamples, flushes to
    silence; both players (AudioWorklet, ScriptProcessor fallback) render pushed audio. The
    page passes its ?token= on to the WebSocket."""
    srv = await make_server(token="s3cret")
    async with browser_page(srv, "?token=s3cret") as (page, errors):
        await until(page, "window.seTest && window.seTest.connection === 'open'")
        urls = await page.evaluate(
            """async () => {
            const { websocketUrl } = await import('/connection.js');
            return [
              websocketUrl(location),
              websocketUrl(new URL('https://example.org:8443/a/b.html?x=1&token=a%20b#top')),
              websocketUrl(new URL('http://example.org/')),
            ];
        }"""
        )
        assert urls == [
            f"ws://127.0.0.1:{srv.port}/v1/tts?token=s3cret",
            "wss://example.org:8443/v1/tts?token=a+b",
            "ws://example.org/v1/tts",
        ]
        result = await page.evaluate(
            """async () => {
            const { JitterBuffer } = await import('/jitter-buffer.js');
            const out = {};
            const ramp = (n, from) => Float32Array.from({ length: n }, (_, i) => (from + i) / 1000);
            // gapless: three chunks of odd sizes come out as one run, then an underrun
            const b = new JitterBuffer(24000, { prebufferMs: 20 });  // 480 frames
            b.push(ramp(100, 0), 24000, 1, 0);
            b.push(ramp(150, 100), 24000, 1, 0);
            const block = new Float32Array(128);
            let ev = b.render(block);
            out.waited = block.every((v) => v === 0) && ev.length === 0;  // under the prebuffer
            b.push(ramp(250, 250), 24000, 1, 1);
            const got = [];
            const events = [];
            for (let k = 0; k < 5; k++) {
              events.push(...b.render(block).map((e) => e.type + e.segment));
              got.push(...block);
            }
            out.gapless = got.slice(0, 500).every((v, i) => Math.abs(v - i / 1000) < 1e-6);
            out.paddedAfter = got.slice(500).every((v) => v === 0);
            out.events = events;
            out.underruns = b.underruns;
            out.played = b.playedFrames;
            // the end of a stream drains without an underrun
            b.push(ramp(50, 0), 24000, 2, 0);
            b.end(2);
            out.drain = b.render(block).map((e) => e.type);
            out.underrunsAfterEnd = b.underruns;
            // 48 kHz into 24 kHz: half as many frames
            const r = new JitterBuffer(24000, { prebufferMs: 0 });
            r.push(new Float32Array(960).fill(0.5), 48000, 3, 0);
            r.end(3);
            let n = 0;
            for (let k = 0; k < 5; k++) {
              r.render(block);
              n += block.filter((v) => v === 0.5).length;
            }
            out.resampled = n;
            // flush: a short fade, then silence
            const f = new JitterBuffer(24000, { prebufferMs: 0 });
            f.push(new Float32Array(4800).fill(0.5), 24000, 4, 0);
            f.render(block);
            f.flush();
            const a = new Float32Array(128);
            f.render(a);
            out.fade = [a[0], a[95], a[96], a[127]];
            f.render(a);
            out.silentAfterFlush = a.every((v) => v === 0) && f.bufferedMs === 0;
            // both players render what they are given
            const { Player } = await import('/player.js');
            out.players = {};
            for (const forceScript of [false, true]) {
              const seen = { peak: 0, events: [] };
              const p = await Player.create(24000, (e) => {
                if (e.type === 'status') seen.peak = Math.max(seen.peak, e.peak);
                else seen.events.push(e.type);
              }, { forceScript });
              await p.resume();
              p.push(new Float32Array(7200).fill(0.25), 24000, 9, 0);
              p.end(9);
              const t0 = performance.now();
              while (!seen.events.includes('drained') && performance.now() - t0 < 3000) {
                await new Promise((r) => setTimeout(r, 20));
              }
              out.players[p.kind] = { peak: seen.peak, events: seen.events, rate: p.sampleRate };
              await p.context.close();
            }
            return out;
        }"""
        )
        assert result["waited"]
        assert result["gapless"] and result["paddedAfter"]
        assert result["events"] == ["start0", "segment1", "underrun1"]
        assert result["underruns"] == 1 and result["played"] == 500
        assert result["drain"] == ["start", "drained"] and result["underrunsAfterEnd"] == 1
        assert result["resampled"] == 480
        first, last_faded, after, end = result["fade"]
        assert 0 < last_faded < first <= 0.5 and after == 0 and end == 0
        assert result["silentAfterFlush"]
        for kind in ("worklet", "script"):
            player = result["players"][kind]
            assert player["events"] == ["start", "drained"], player
            assert player["peak"] == pytest.approx(0.25) and player["rate"] == 24_000
        assert errors == []


async def test_static_files(make_server):
    srv = await make_server()
    base = f"http://127.0.0.1:{srv.port}"

    def get(path: str) -> tuple[int, str, str]:
        try:
            with urllib.request.urlopen(base + path, timeout=10) as r:
                return r.status, r.headers["Content-Type"], r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.headers["Content-Type"], e.read().decode()

    status, ctype, body = await asyncio.to_thread(get, "/")
    assert status == 200 and ctype.startswith("text/html") and 'src="app.js"' in body
    for path, expected in [
        ("/app.js", "text/javascript"),
        ("/player-worklet.js", "text/javascript"),
        ("/style.css", "text/css"),
    ]:
        status, ctype, _ = await asyncio.to_thread(get, path)
        assert status == 200 and ctype.startswith(expected), path
    for path in [
        "/README.md",  # not an allowed type
        "/../pyproject.toml",
        "/%2e%2e/pyproject.toml",
        "/..%2fpyproject.toml",
        "/.hidden.js",
        "/sub/app.js",
        "/nothere.js",
        "//etc/passwd",
    ]:
        status, _, _ = await asyncio.to_thread(get, path)
        assert status == 404, path
