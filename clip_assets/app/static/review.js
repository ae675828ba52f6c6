// The review page: one card at a time, judged by keyboard (y yes, n no, s skip, u undo) or the buttons.
// Each verdict is POSTed at once with a request id of its own (a retry sends the same id, so it is
// stored once); the next card is already loaded and decoded, so it shows without waiting for the
// server. document.body.dataset.nextCardMs holds the last key-to-next-card time, for the tests.
(() => {
  "use strict";
  const config = JSON.parse(document.getElementById("review-config").textContent);
  const PRELOAD = 4;        // cards whose pictures are loaded ahead
  const LOW_WATER = 6;      // fetch more cards when fewer than this are waiting
  const card = document.getElementById("card");
  const frame = document.getElementById("picture");
  const detail = document.getElementById("detail");
  const statusLine = document.getElementById("status");
  const waiting = [];       // cards to show after the current one
  const seen = new Set();   // paths shown or waiting on this page: a card is never shown twice
  const history = [];       // {card, stored: Promise<record|null>}, for undo
  let current = null, fetching = null, exhausted = false, stored = 0, sending = 0, failed = 0, sinceEstimate = 0;

  class Refused extends Error {}

  function requestId() {  // crypto.randomUUID needs a secure context; getRandomValues does not
    const bytes = new Uint8Array(16);
    crypto.getRandomValues(bytes);
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  async function post(url, body, tries = 6) {
    for (let attempt = 1; ; attempt++) {
      try {
        const response = await fetch(url, {method: "POST", headers: {"Content-Type": "application/json"},
                                            body: JSON.stringify(body)});
        const answer = await response.json().catch(() => ({}));
        if (response.ok) return answer;
        if (response.status < 500) throw new Refused(answer.error || `refused (${response.status})`);
      } catch (error) {
        if (error instanceof Refused || attempt >= tries) throw error;
      }
      await new Promise((done) => setTimeout(done, 150 * 2 ** attempt));  // the same request id again
    }
  }

  function report() {
    statusLine.textContent = `${stored} stored` + (sending ? `, ${sending} sending` : "") +
      (failed ? `, ${failed} not stored (see above)` : "") + (exhausted && !current ? "; no more images in this queue" : "");
    document.body.dataset.stored = stored;
    document.body.dataset.sending = sending;
  }

  function problem(message) {
    const line = document.getElementById("problem");
    line.textContent = message;
    line.hidden = false;
  }

  function preload() {
    for (const next of waiting.slice(0, PRELOAD)) {
      if (next.image) continue;
      next.image = new Image();
      next.image.alt = next.path;
      next.image.src = next.thumb;
      next.image.decode().catch(() => {});  // decoded before it is shown
    }
  }

  function more() {
    if (fetching || exhausted) return fetching || Promise.resolve();
    const url = `/api/review/${encodeURIComponent(config.category)}/cards?queue=${config.queue}&n=${config.batch}`;
    fetching = fetch(url).then((r) => r.json().then((answer) => {
      if (!r.ok) throw new Error(answer.error || `cards refused (${r.status})`);
      const fresh = answer.cards.filter((c) => !seen.has(c.path));
      fresh.forEach((c) => { seen.add(c.path); waiting.push(c); });
      if (!fresh.length) exhausted = true;
      preload();
    })).catch((error) => problem(`Could not fetch more images: ${error.message}`))
      .finally(() => { fetching = null; report(); });
    return fetching;
  }

  function show(started) {
    current = waiting.shift() || null;
    if (!current) {
      card.dataset.state = exhausted ? "done" : "loading";
      card.dataset.path = "";
      frame.replaceChildren();
      detail.textContent = exhausted ? "No more images to review in this queue." : "Loading…";
      report();
      if (!exhausted) more().then(() => { if (!current) show(started); });
      return;
    }
    if (!current.image) { current.image = new Image(); current.image.alt = current.path; current.image.src = current.thumb; }
    frame.replaceChildren(current.image);
    card.dataset.path = current.path;
    card.dataset.state = "ready";
    detail.textContent = current.detail || "";
    const shown = () => {
      if (started !== undefined) document.body.dataset.nextCardMs = (performance.now() - started).toFixed(1);
    };
    if (current.image.complete) requestAnimationFrame(shown); else current.image.addEventListener("load", shown, {once: true});
    preload();
    if (waiting.length < LOW_WATER) more();
    report();
  }

  function judge(verdict, started) {
    if (!current) return;
    const judged = current;
    const body = {request_id: requestId(), path: judged.path, category: config.category, verdict, queue: config.queue,
                  batch: judged.batch, model: judged.model, prompt_version: judged.prompt_version};
    sending++;
    const record = post("/api/review/verdicts", body).then(
      (answer) => { stored++; if (config.queue === "estimate" && ++sinceEstimate >= 5) refreshEstimate(); return answer.record; },
      (error) => { failed++; problem(`Not stored: ${judged.path}: ${error.message}`); return null; },
    ).finally(() => { sending--; report(); });
    history.push({card: judged, record});
    show(started);
  }

  async function undo(started) {
    const last = history.pop();
    if (!last) return;
    if (current) waiting.unshift(current);
    waiting.unshift(last.card);
    sending++;  // in flight from now on: the verdict's own request first, then the undo's (the status line counts it)
    show(started);
    try {
      const record = await last.record;
      if (!record) return;  // never stored: nothing to take back
      await post("/api/review/undo", {request_id: requestId(), record_id: record.record_id});
      stored--;
    } catch (error) {
      problem(`Undo not stored: ${last.card.path}: ${error.message}`);
    } finally {
      sending--;
      report();
    }
  }

  function refreshEstimate() {
    sinceEstimate = 0;
    fetch(`/review/${encodeURIComponent(config.category)}/estimate`).then((r) => r.ok ? r.text() : null)
      .then((html) => { if (html) document.getElementById("estimate").outerHTML = html; }).catch(() => {});
  }

  const KEYS = {y: "yes", n: "no", s: "skip"};
  document.addEventListener("keydown", (event) => {
    if (event.ctrlKey || event.metaKey || event.altKey || event.repeat) return;
    if (event.target.closest && event.target.closest("input, textarea, select")) return;
    const key = event.key.toLowerCase();
    const started = performance.now();
    if (KEYS[key]) { event.preventDefault(); judge(KEYS[key], started); }
    else if (key === "u") { event.preventDefault(); undo(started); }
  });
  document.querySelectorAll("button[data-verdict]").forEach((button) =>
    button.addEventListener("click", () => judge(button.dataset.verdict, performance.now())));
  document.getElementById("undo").addEventListener("click", () => undo(performance.now()));

  config.cards.forEach((c) => { seen.add(c.path); waiting.push(c); });
  exhausted = config.cards.length === 0;
  preload();
  show();
})();
