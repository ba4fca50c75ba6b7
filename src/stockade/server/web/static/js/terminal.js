// The web terminal: xterm.js on the workspace agent's reconnecting PTY over
// the tunnel WebSocket (stockade/tunnel/protocol.py): the server says
// {"type":"opened"} once the agent has the terminal, then binary messages are
// the terminal's bytes both ways and text messages are JSON control messages
// ({"type":"resize","rows":R,"cols":C}). The browser's session cookie
// authenticates the WebSocket; the server checks this page's Origin.
//
// The terminal's id is in the address (?session=ID), so a reload attaches to
// the same shell and the agent replays its recent output. The tab also
// remembers it (sessionStorage), so coming back to the terminal from the
// workspace's page resumes it too; "New terminal" opens another id.
"use strict";
(() => {
  const box = document.getElementById("terminal");
  if (!box || typeof Terminal !== "function" || typeof FitAddon !== "object") return;
  const statusLine = document.getElementById("term-status");
  const action = document.getElementById("term-action");
  const { owner, name, tunnel } = box.dataset;

  // Retries after an unexpected close: 1 s, 2 s, 4 s... at most 30 s apart,
  // then the person decides (each try is a connection in the audit log).
  const DELAYS = [1, 2, 4, 8, 15, 30, 30, 30, 30, 30];
  const ID = /^[A-Za-z0-9._-]{1,64}$/;
  const RETRIED = new Set([1001, 1005, 1006, 1011, 1012, 1013, 1014, 4409, 4504]);
  const MESSAGES = {
    4400: "The server refused the terminal's request",
    4401: "The server did not accept your session",
    4403: "You may not connect to this workspace.",
    4404: "This workspace no longer exists, or you may no longer see it.",
    4409: "The workspace's agent is not connected: the workspace may be stopped or still starting.",
    4410: "This terminal is now open in another tab or window.",
    4429: "Too many terminals are open in this workspace: end one (type exit in it), then reconnect.",
    4502: "The workspace could not open a terminal",
    4503: "The workspace could not open a terminal",
    4504: "The workspace's agent did not answer in time.",
  };

  // --- which terminal ------------------------------------------------------------------
  const storageKey = `stockade.terminal:${owner}/${name}`;
  const remembered = (() => {
    try { return sessionStorage.getItem(storageKey) || ""; } catch (err) { return ""; }
  })();
  const sessionId = box.dataset.session || (ID.test(remembered) ? remembered : box.dataset.proposed);
  try { sessionStorage.setItem(storageKey, sessionId); } catch (err) { /* private mode */ }
  const address = new URL(window.location.href);
  if (address.searchParams.get("session") !== sessionId) {
    address.searchParams.set("session", sessionId);
    window.history.replaceState(window.history.state, "", address);
  }

  // --- the terminal --------------------------------------------------------------------
  const term = new Terminal({
    cursorBlink: true,
    fontFamily: 'ui-monospace, "DejaVu Sans Mono", "Liberation Mono", Menlo, Consolas, monospace',
    fontSize: 14,
    lineHeight: 1.15,  // 1 clips underscores in common monospace fonts
    scrollback: 5000,
    theme: { background: "#0f1214", foreground: "#d6dde3", cursor: "#d6dde3" },
  });
  const fit = new FitAddon.FitAddon();
  term.loadAddon(fit);
  term.open(box);
  fit.fit();
  term.focus();

  const encoder = new TextEncoder();
  let socket = null;
  let opened = false;
  let state = "connecting";
  let attempt = 0;
  let retryTimer = null;
  let countdown = null;
  let leaving = false;

  function show(newState, text, button) {
    state = newState;
    statusLine.dataset.state = newState;
    statusLine.textContent = text;
    if (button) {
      action.textContent = button.label;
      action.onclick = button.run;
      action.hidden = false;
    } else {
      action.hidden = true;
      action.onclick = null;
    }
  }

  function tunnelUrl() {
    const scheme = window.location.protocol === "https:" ? "wss:" : "ws:";
    const query = new URLSearchParams({
      kind: "pty", id: sessionId, rows: String(term.rows), cols: String(term.cols),
    });
    return `${scheme}//${window.location.host}${tunnel}?${query}`;
  }

  function connect() {
    clearTimeout(retryTimer);
    clearInterval(countdown);
    if (socket) {
      socket.onclose = null;
      socket.close(1000);
    }
    opened = false;
    show("connecting", attempt ? `Reconnecting (try ${attempt + 1})…` : "Connecting…");
    const ws = new WebSocket(tunnelUrl());
    ws.binaryType = "arraybuffer";
    ws.onmessage = (event) => {
      if (typeof event.data !== "string") {
        term.write(new Uint8Array(event.data));
        return;
      }
      let type = "";
      try { type = JSON.parse(event.data).type; } catch (err) { return; }
      if (type === "opened" && !opened) {
        opened = true;
        attempt = 0;
        // The agent replays the shell's recent output first: start from a
        // clean screen so nothing shows twice after a reconnect.
        term.reset();
        show("connected", "Connected");
        term.focus();
      }
    };
    ws.onclose = (event) => closed(ws, event.code, event.reason);
    socket = ws;
  }

  function closed(ws, code, reason) {
    if (ws !== socket || leaving) return;
    socket = null;
    const wasOpen = opened;
    opened = false;
    const known = MESSAGES[code];
    const why = known ? (known.endsWith(".") ? known : `${known}${reason ? `: ${reason}` : ""}.`) : "";
    if (code === 1000) {
      // The relay turns every end that is not the application's into a
      // normal close: the shell exited, or the agent's side went away.
      // Reconnecting resumes the shell if it still runs, else starts one.
      term.write("\r\n\x1b[2m[The terminal closed. Press Enter to reconnect.]\x1b[0m\r\n");
      show("ended", "The terminal closed: the shell exited or the workspace ended it.", {
        label: "Reconnect", run: reconnectNow,
      });
    } else if (code === 4410) {
      // Another tab took this terminal over: coming back by ourselves would
      // take it back from there, and so on forever.
      show("taken", why, { label: "Use it here", run: reconnectNow });
    } else if (code === 4401) {
      show("stopped", why, { label: "Sign in", run: signIn });
    } else if (RETRIED.has(code) && attempt < DELAYS.length) {
      retry(why || (wasOpen ? "The connection was lost." : "Could not connect."));
    } else {
      const text = why || `The connection closed (code ${code}${reason ? `: ${reason}` : ""}).`;
      if (RETRIED.has(code)) {
        show("stopped", `${text} Gave up after ${attempt} tries.`, { label: "Reconnect", run: reconnectNow });
      } else {
        show("stopped", text, { label: "Reconnect", run: reconnectNow });
      }
    }
  }

  function retry(why) {
    let left = DELAYS[attempt];
    attempt += 1;
    const tell = () => show("waiting", `${why} Reconnecting in ${left} s…`, {
      label: "Reconnect now", run: reconnectNow,
    });
    tell();
    countdown = setInterval(() => {
      left -= 1;
      if (left > 0) tell();
    }, 1000);
    retryTimer = setTimeout(connect, left * 1000);
  }

  function reconnectNow() {
    attempt = 0;
    connect();
    term.focus();
  }

  function signIn() {
    const here = window.location.pathname + window.location.search;
    window.location.assign(`/login?next=${encodeURIComponent(here)}`);
  }

  function send(bytes) {
    if (socket && opened && socket.readyState === WebSocket.OPEN) socket.send(bytes);
  }

  term.onData((data) => {
    if (state === "ended" && data === "\r") {
      reconnectNow();
      return;
    }
    send(encoder.encode(data));
  });
  // Some mouse reports are bytes, not text.
  term.onBinary((data) => send(Uint8Array.from(data, (c) => c.charCodeAt(0) & 0xff)));
  term.onResize(({ rows, cols }) => {
    if (socket && opened && socket.readyState === WebSocket.OPEN) {
      socket.send(JSON.stringify({ type: "resize", rows, cols }));
    }
  });
  term.onTitleChange((title) => {
    document.title = title ? `${title} · Stockade` : document.title;
  });

  // Fit the terminal to its box whenever the box changes size (window
  // resizes, the status line wrapping...), once per frame at most.
  let fitting = 0;
  const refit = () => {
    if (fitting) return;
    fitting = window.requestAnimationFrame(() => {
      fitting = 0;
      fit.fit();
    });
  };
  new ResizeObserver(refit).observe(box);
  window.addEventListener("resize", refit);

  window.addEventListener("pagehide", () => {
    leaving = true;
    if (socket) socket.close(1000);
  });
  window.addEventListener("pageshow", (event) => {
    // Back from the back/forward cache: the socket was closed on the way out.
    if (event.persisted) {
      leaving = false;
      reconnectNow();
    }
  });

  connect();
})();
